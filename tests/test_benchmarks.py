"""Benchmarks: statistics, backends, reports, latency and quality runs on the tiny preset, the
offline guard of the perceptual metrics, and gpu_check.sh's syntax and CPU fallback."""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, shared_data

sys.path.insert(0, str(REPO))  # `benchmarks` is a folder of scripts, not an installed package
from benchmarks import _common as C  # noqa: E402
from benchmarks import _quality as Q  # noqa: E402
from benchmarks._backends import TimingPlan, measure, parse_backends  # noqa: E402
from benchmarks._report import enrich, merge, ratio, render  # noqa: E402
from tolerance import ELEMENTWISE, NETWORK, PIPELINE, assert_close

GPU_CHECK = REPO / "benchmarks" / "gpu_check.sh"


# ---- statistics and options --------------------------------------------------------------

def test_summarize_median_and_p90_of_known_samples():
    s = C.summarize([float(v) for v in range(10, 0, -1)])  # 1..10, unordered
    assert s["median_ms"] == 5.5
    assert s["p90_ms"] == pytest.approx(9.1)  # linear interpolation between 9 and 10
    assert (s["min_ms"], s["max_ms"], s["n"]) == (1.0, 10.0, 10)
    with pytest.raises(ValueError, match="no timing samples"):
        C.summarize([])


def test_parse_sizes_and_lists():
    assert C.parse_sizes("512,768x512") == [(512, 512), (768, 512)]
    assert C.parse_int_list("1,8", "--batch") == [1, 8]
    for bad in ("0", "a", "5x6x7"):
        with pytest.raises(ValueError, match="size"):
            C.parse_sizes(bad)
    with pytest.raises(ValueError, match="--batch"):
        C.parse_int_list("1,x", "--batch")


def test_peak_table_known_and_unknown_devices():
    assert C.peak_tflops("NVIDIA H100 80GB HBM3", "fp16") == 989.0
    assert C.peak_tflops("NVIDIA H200", "fp32") == 67.0
    assert C.peak_tflops("NVIDIA A100-SXM4-80GB", "bf16") == 312.0
    assert C.peak_tflops("NVIDIA H100 PCIe", "fp16") is None  # other clocks: not guessed
    assert C.peak_tflops("AMD EPYC", "fp32") is None
    assert C.peak_tflops(None, "fp32") is None


def test_parse_backends_refuses_gpu_only_on_cpu_and_unknown_names():
    assert [b.name for b in parse_backends("eager,ort", "cpu")] == ["eager", "ort"]
    with pytest.raises(ValueError, match="need --device cuda"):
        parse_backends("eager,eager-fp16", "cpu")
    with pytest.raises(ValueError, match="unknown backends"):
        parse_backends("eager,tensorflow", "cuda")


def test_measure_counts_warmup_and_stops_at_budget():
    calls = []
    rec = measure(lambda: calls.append(1), TimingPlan(warmup=2, runs=5, budget_s=60,
                                                       cuda=False))
    assert len(calls) == 7 and rec["n"] == 5 and not rec["truncated"]
    assert rec["first_call_ms"] is not None and rec["peak_host_rss_bytes"] > 0
    rec = measure(lambda: time.sleep(0.02), TimingPlan(0, 50, budget_s=0.01, cuda=False))
    assert rec["n"] == 1 and rec["truncated"] and rec["median_ms"] >= 20


# ---- reports ----------------------------------------------------------------------------

def _rec(backend, module, ms, batch=1, precision="fp32", device="cuda"):
    return {"backend": backend, "kind": backend.split("-")[0], "module": module,
            "median_ms": ms, "p90_ms": ms, "n": 3,
            "runs_asked": 3, "size": [512, 512], "batch": batch, "precision": precision,
            "device": device, "truncated": False, "peak_gpu_bytes": 2 ** 30,
            "peak_host_rss_bytes": None}


def _doc(recs, machine="NVIDIA H100 80GB HBM3"):
    return {"kind": "sodiff-latency", "created": "2026-01-01T00:00:00Z", "command": "x",
            "machine": {"name": machine, "device": "cuda", "gpu": machine},
            "versions": {"torch": "2.x"}, "model": {"description": "preset sd21"},
            "settings": {"warmup": 3, "runs": 10, "compile": ["unet"]},
            "flops": {"512x512": {"unet": 800e9, "pipeline": 4600e9}},
            "measurements": recs, "errors": []}


H100 = {"gpu": "NVIDIA H100 80GB HBM3", "tf32_cudnn": True, "tf32_matmul": False}


def test_enrich_achieved_fraction_of_peak():
    # 989 GFLOP in 10 ms at batch 1 = 98.9 TFLOP/s = 10% of the H100's fp16 peak.
    rec = enrich(_rec("eager-fp16", "unet", 10.0, precision="fp16"), int(989e9), H100)
    assert rec["tflops_per_s"] == pytest.approx(98.9)
    assert rec["peak_fraction"] == pytest.approx(0.1)
    assert rec["images_per_s"] == pytest.approx(100.0)
    # fp32 with PyTorch's default TF32 convolutions is held against the TF32 peak (494).
    fp32 = enrich(_rec("eager", "unet", 10.0), int(494e9), H100)
    assert fp32["peak_precision"] == "tf32" and fp32["peak_fraction"] == pytest.approx(0.1)
    strict = enrich(_rec("eager", "unet", 10.0), int(67e9), {**H100, "tf32_cudnn": False})
    assert strict["peak_fraction"] == pytest.approx(0.1)  # the plain fp32 peak, 67
    cpu = enrich(_rec("eager", "unet", 10.0, device="cpu"), int(989e9), {"gpu": None})
    assert cpu["peak_fraction"] is None and cpu["tflops_per_s"] == pytest.approx(98.9)


def test_ratio_and_markdown_table_against_eager_fp32():
    recs = [enrich(_rec("eager", "unet", 40.0), 800e9, H100),
            enrich(_rec("eager-fp16", "unet", 10.0, precision="fp16"), 800e9, H100),
            enrich(_rec("eager", "pipeline", 100.0), 4600e9, H100),
            enrich(_rec("eager-fp16", "pipeline", 25.0, precision="fp16"), 4600e9, H100)]
    index = {(tuple(r["size"]), r["batch"], r["backend"], r["module"]): r for r in recs}
    assert ratio(recs[1], index) == pytest.approx(4.0)
    md = render(_doc(recs))
    assert "| Module | PyTorch fp32 | PyTorch fp16 |" in md
    assert "| unet | 40.00 ms | 10.00 ms (x4.00) |" in md
    assert "| Throughput | 10.00 img/s | 40.00 img/s |" in md
    assert "**Pipeline**" in md and "1.00 GiB GPU" in md


def test_merge_keeps_every_backend_and_refuses_other_machines():
    a = _doc([enrich(_rec("compiled-fp16", "unet", 8.0, precision="fp16"), 800e9, H100)])
    b = _doc([enrich(_rec("eager", "unet", 40.0), 800e9, H100)])
    merged = merge([a, b], "merge")
    assert {r["backend"] for r in merged["measurements"]} == {"eager", "compiled-fp16"}
    # Columns follow the backend registry, the fp32 baseline first, whatever the file order.
    assert "| Module | PyTorch fp32 | compiled fp16 |" in render(merged)
    with pytest.raises(ValueError, match="different machines"):
        merge([a, _doc([], machine="NVIDIA A100")], "merge")


# ---- the PyTorch side ---------------------------------------------------------------------

def test_benchmark_pipeline_is_the_models_forward(tiny_model):
    import torch
    from benchmarks._torch_bench import Components
    model = tiny_model.merge_lora()
    lq = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        ref = model(lq).restored
        out = Components(model).pipeline(lq)
    assert_close(out, ref, PIPELINE)


def test_flop_counts_of_the_tiny_preset():
    from benchmarks._torch_bench import count_flops
    from sodiff.config import TINY
    f64, f128 = count_flops(TINY, 64, 64), count_flops(TINY, 128, 128)
    assert set(f64) == set(C.MODULES)
    assert all(v > 0 for v in f64.values())
    parts = sum(v for k, v in f64.items() if k != C.PIPELINE)
    assert f64[C.PIPELINE] == pytest.approx(parts, rel=1e-3)
    # Convolutions scale with the pixel count, attention faster; SAIPE sees a fixed size.
    assert 4 * f64["vae_decoder"] <= f128["vae_decoder"] < 16 * f64["vae_decoder"]
    assert f128["saipe"] == f64["saipe"]


def _latency_settings(tmp_path, **kw):
    from benchmarks.latency import LatencySettings
    base = dict(preset="tiny", random_weights=True, checkpoint=None, base=None, engine=None,
                sizes=((64, 64),), batches=(1,), backends=("eager",), device="cpu",
                warmup=0, runs=2, budget_s=60.0, modules=C.MODULES, compile=("unet",),
                flops=True, threads=1, onnx_dir=None, out=tmp_path, name="lat")
    base.update(kw)
    return LatencySettings(**base)


def test_latency_run_writes_json_and_table(tmp_path):
    from benchmarks.latency import run_latency
    doc = run_latency(_latency_settings(tmp_path, batches=(1, 2)), "test")
    saved = json.loads((tmp_path / "lat.json").read_text())
    assert len(saved["measurements"]) == 2 * len(C.MODULES)
    assert all(len(r["samples_ms"]) == 2 for r in saved["measurements"])
    assert saved["machine"]["cpu_count"] == os.cpu_count() and saved["versions"]["torch"]
    md = (tmp_path / "lat.md").read_text()
    assert "### 64x64, batch 2" in md and "| Throughput |" in md
    assert doc["flops"]["64x64"]["unet"] > 0


def test_latency_settings_errors_name_the_values(tmp_path):
    from benchmarks.latency import validate_settings
    with pytest.raises(ValueError, match="nothing to time"):
        validate_settings(_latency_settings(tmp_path, preset=None))
    with pytest.raises(ValueError, match="--preset tiny needs --random-weights"):
        validate_settings(_latency_settings(tmp_path, random_weights=False))
    with pytest.raises(ValueError, match="need --device cuda"):
        validate_settings(_latency_settings(tmp_path, backends=("compiled-fp16",)))
    with pytest.raises(ValueError, match=r"unknown modules \['vae'\]"):
        validate_settings(_latency_settings(tmp_path, modules=("vae",)))
    from benchmarks._torch_bench import check_size
    from sodiff.config import TINY
    with pytest.raises(ValueError, match="size 62x64 is not a multiple"):
        check_size(TINY, 62, 64)


@pytest.mark.slow
def test_onnxruntime_backend_matches_pytorch_and_reports_ratio(tmp_path):
    """Exports the tiny preset with the export library, then times eager and ORT."""
    import torch
    from benchmarks._engine_bench import EngineRunner, numpy_inputs
    from benchmarks._torch_bench import Components, make_inputs
    from benchmarks.latency import run_latency
    s = _latency_settings(tmp_path, backends=("eager", "ort"), onnx_dir=tmp_path / "onnx")
    doc = run_latency(s, "test")
    assert not doc["errors"], doc["errors"]
    ort_pipe = [r for r in doc["measurements"] if r["backend"] == "ort"
                and r["module"] == "pipeline"]
    assert len(ort_pipe) == 1
    assert "onnxruntime fp32" in (tmp_path / "lat.md").read_text()
    # The ORT pipeline chain computes what the PyTorch pipeline computes (same seed 0 weights
    # as the export's random init).
    torch.manual_seed(0)
    from sodiff.config import TINY
    from sodiff.model import SODiff
    model = SODiff(TINY).eval().merge_lora()
    runner = EngineRunner(tmp_path / "onnx" / "tiny-ort-fp32", "ort", "cpu")
    inputs = make_inputs(TINY, 64, 64, 1, "cpu", torch.float32)
    with torch.no_grad():
        ref = Components(model).pipeline(*inputs["pipeline"]).numpy()
    out = runner.pipeline(*numpy_inputs(inputs)["pipeline"])
    runner.close()
    assert_close(out, ref, PIPELINE)


# ---- quality ------------------------------------------------------------------------------

README_CLASSIC5 = {10: (27.82, 0.760, 25.21), 20: (30.12, 0.834, 27.50)}


def _quality_settings(tmp_path, **kw):
    from benchmarks.quality import QualitySettings
    base = dict(mode="jpeg-only", checkpoint=None, base=None, engine=None, device="cpu",
                data=kw.pop("data", None) or shared_data(), sets=("Classic5",), qfs=(10, 20), limit=None, iqa=(),
                grid_images=2, grid_qf=10, out=tmp_path, name="q")
    base.update(kw)
    return QualitySettings(**base)


def test_quality_jpeg_only_reproduces_the_data_readme(tmp_path):
    from benchmarks.quality import run_quality
    doc = run_quality(_quality_settings(tmp_path))
    for qf, (p, s, pb) in README_CLASSIC5.items():
        sm = doc["summary"]["Classic5"][str(qf)]
        assert sm["jpeg"]["psnr"] == pytest.approx(p, abs=0.02)
        assert sm["jpeg"]["ssim"] == pytest.approx(s, abs=0.001)
        assert sm["jpeg"]["psnr_b"] == pytest.approx(pb, abs=0.02)
        assert sm["header_qf_exact"] == 1.0 and sm["images"] == 5
    assert (tmp_path / "q.md").read_text().count("| 10 | 5 |") == 1
    assert (tmp_path / "q_grid.png").is_file()


def _small_grey_set(root: Path, h: int = 48, w: int = 64) -> Path:
    """A one-image 'Classic5' of h x w pixels: the tiny preset's UNet attends over every
    latent cell, so whole 512x512 images take minutes on two cores."""
    from PIL import Image
    y, x = np.mgrid[0:h, 0:w]
    img = (128 + 60 * np.sin(x / 5.0) * np.cos(y / 7.0)).astype(np.uint8)
    (root / "Classic5").mkdir(parents=True)
    Image.fromarray(img).save(root / "Classic5" / "waves.png")
    return root


def test_quality_with_a_random_tiny_checkpoint(tmp_path, tiny_model):
    from benchmarks.quality import run_quality
    from sodiff import checkpoint
    checkpoint.save(tiny_model, tmp_path / "ckpt")
    doc = run_quality(_quality_settings(tmp_path, mode="checkpoint", checkpoint=tmp_path / "ckpt",
                                        data=_small_grey_set(tmp_path / "data"), qfs=(10,),
                                        grid_images=1))
    sm = doc["summary"]["Classic5"]["10"]
    assert math.isfinite(sm["restored"]["psnr"]) and 0 < sm["restored"]["ssim"] < 1
    # An untrained QF head outputs its initial bias, 50, for every image: |50 - 10| = 40.
    assert sm["predictor_qf_mae"] == pytest.approx(40.0, abs=1e-3)
    from PIL import Image
    with Image.open(tmp_path / "q_grid.png") as im:  # jpeg | restored | reference
        assert im.size[0] == 3 * 48 * Q.GRID_SCALE


@pytest.mark.slow
def test_quality_through_the_runtime_matches_pytorch(tmp_path, tiny_model):
    """The same random checkpoint, restored by PyTorch and by the runtime from its export."""
    from benchmarks.quality import run_quality
    from export.options import ExportOptions
    from export.pipeline import run_export
    from sodiff import checkpoint
    checkpoint.save(tiny_model, tmp_path / "ckpt")
    run_export(ExportOptions(out=tmp_path / "engine", checkpoint=tmp_path / "ckpt",
                             samples=1), log=lambda m: None)
    # 64x64, the engine's static shape: neither side pads, so both see the same pixels.
    data = _small_grey_set(tmp_path / "data", 64, 64)
    common = dict(data=data, qfs=(10,), grid_images=0)
    torch_doc = run_quality(_quality_settings(tmp_path / "t", mode="checkpoint",
                                              checkpoint=tmp_path / "ckpt", **common))
    # The paper's model on both sides: the runtime's JPEG constraint is its own step.
    engine_doc = run_quality(_quality_settings(tmp_path / "e", mode="engine",
                                               engine=tmp_path / "engine",
                                               jpeg_constraint=False, **common))
    t, e = (d["summary"]["Classic5"]["10"] for d in (torch_doc, engine_doc))
    assert e["predictor_qf_mae"] == pytest.approx(t["predictor_qf_mae"], abs=0.01)
    assert e["restored"]["psnr"] == pytest.approx(t["restored"]["psnr"], abs=0.02)


def test_score_hand_computed_psnr_b():
    # 16x16 grey: reference flat 0; output with a step of 10 at the 7|8 column boundary.
    # MSE = 10^2 * 128/256 = 50; BEF = 37.5 (see test_metrics); PSNR-B = 10 log10(255^2/87.5).
    ref = np.zeros((16, 16), np.uint8)
    out = ref.copy()
    out[:, 8:] = 10
    s = Q.score(out, ref)
    assert s["psnr"] == pytest.approx(10 * math.log10(255 ** 2 / 50))
    assert s["psnr_b"] == pytest.approx(10 * math.log10(255 ** 2 / 87.5))


def test_grey_protocol_round_trip_and_uint8_rounding():
    grey = np.random.default_rng(0).integers(0, 256, (20, 24), dtype=np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    assert np.array_equal(Q.to_grey(rgb), grey)
    assert list(Q.to_uint8(np.array([-1.0, 0.0, 1.0, 2.0]))) == [0, 128, 255, 255]


def test_identity_restorer_scores_like_the_jpeg():
    ref = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    rec, images = Q.evaluate_image(ref, 30, False, lambda x, _: Q.Restored(x.copy(), 31.0))
    assert rec["restored"] == rec["jpeg"] and rec["header_qf"] == 30
    assert rec["predicted_qf"] == 31.0 and set(images) == {"jpeg", "restored", "reference"}


def test_summary_of_qf_errors():
    from benchmarks.quality import summarize
    recs = [{"qf": 10, "header_qf": 10, "predicted_qf": 12.0, "jpeg": {"psnr": 20.0}},
            {"qf": 10, "header_qf": None, "predicted_qf": 7.0, "jpeg": {"psnr": 30.0}}]
    sm = summarize(recs)
    assert sm["predictor_qf_mae"] == 2.5 and sm["header_qf_exact"] == 0.5
    assert sm["jpeg"]["psnr"] == 25.0 and "restored" not in sm


def test_no_network_blocks_downloads_and_restores_afterwards():
    import torch.hub
    original = socket.create_connection
    with Q.no_network():
        with pytest.raises(Q.NetworkBlocked):
            socket.create_connection(("127.0.0.1", 9))
        with pytest.raises(Q.NetworkBlocked):
            torch.hub.download_url_to_file("https://example.invalid/w.pth", "/tmp/never")
        assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert socket.create_connection is original


def test_iqa_metrics_are_skipped_unless_on_disk():
    import torch.hub

    def create(name, device):
        if name == "lpips":
            torch.hub.download_url_to_file("https://example.invalid/lpips.pth", "/tmp/x")
        return lambda *imgs: torch.tensor(0.5)

    loaded, skipped = Q.load_iqa(("lpips", "musiq"), "cpu", create=create)
    assert list(loaded) == ["musiq"] and skipped["lpips"].startswith("weights not on disk")
    img = np.zeros((16, 16), np.uint8)
    assert Q.iqa_scores(loaded, img, img, "cpu") == {"musiq": 0.5}


def test_crop_grid_geometry():
    assert Q.crop_box((482, 627)) == (160, 232, 320, 392)  # centred, on the 8x8 grid
    rows = [{"jpeg": np.zeros((40, 48), np.uint8), "reference": np.zeros((40, 48), np.uint8)}]
    grid = Q.image_grid(rows, ("jpeg", "reference"))
    assert grid.size == (2 * 40 * Q.GRID_SCALE, Q.GRID_LABEL_H + 40 * Q.GRID_SCALE)


# ---- gpu_check.sh -------------------------------------------------------------------------

def _gpu_check(tmp_path, *args, total_s=None):
    env = {**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    env.pop("OUT", None)
    if total_s is not None:
        env["GPU_CHECK_TOTAL_S"] = str(total_s)
    return subprocess.run(["bash", str(GPU_CHECK), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_gpu_check_syntax():
    assert subprocess.run(["bash", "-n", str(GPU_CHECK)]).returncode == 0


def test_gpu_check_skips_steps_past_its_budget(tmp_path):
    out = tmp_path / "out"
    r = _gpu_check(tmp_path, "--dry-run", str(out), total_s=0)
    assert r.returncode == 1
    log = (out / "gpu_check.log").read_text()
    assert "[eager] skipped" in log and "no measurements were written" in log


@pytest.mark.slow
def test_gpu_check_cpu_fallback_writes_the_merged_report(tmp_path):
    out = tmp_path / "out"
    r = _gpu_check(tmp_path, "--dry-run", str(out))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    md = (out / "latency_tiny_cpu.md").read_text()
    assert "| **Pipeline** |" in md and "onnxruntime fp32" in md and "onnxruntime fp16" in md
    doc = json.loads((out / "latency_tiny_cpu.json").read_text())
    # Every GPU column's CPU stand-in ran: compiled (with --channels-last), the onnxruntime
    # precisions through the runtime's bound path (int8: the Q/DQ graphs TensorRT would build).
    assert {r["backend"] for r in doc["measurements"]} == {"eager", "compiled", "ort",
                                                             "ort-fp16", "ort-int8"}
    assert {r["module"] for r in doc["measurements"] if r["backend"] == "compiled"} == {
        "predictor", "vae_encoder", "vae_decoder", "pipeline"}
    log = (out / "gpu_check.log").read_text()
    assert "float16 MatMul+Add on CPUExecutionProvider through IO binding" in log


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_engine_pipeline_keeps_tensors_on_the_bound_path(tmp_path, dtype):
    """The benchmark's onnxruntime pipeline is the runtime's device-resident chain: on the
    identity engine it returns its input, no intermediate goes back through the host, and a
    component's timed call runs on inputs uploaded beforehand."""
    from benchmarks._engine_bench import EngineRunner
    from fixtures.runtime_engines import identity_engine
    eng = identity_engine(tmp_path / "eng", dtype=dtype, static=True, shape_max=(32, 32))
    runner = EngineRunner(eng, "ort", "cpu")
    try:
        assert all(c.resident for c in runner.engines.components.values())
        image = np.random.default_rng(0).uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32)
        out = runner.pipeline(image)
        assert_close(out, image, ELEMENTWISE, dtype=dtype)  # a float16 engine rounds once
        assert sum(c.hops for c in runner.engines.components.values()) == 0
        call = runner.callable("vae_decoder", {"vae_decoder": (image,)})
        got = call()["image"]
        assert not got.on_host and got.dtype == np.dtype(dtype)  # an OrtValue, not numpy
    finally:
        runner.close()


def test_channels_last_runner_computes_the_same(tiny_model):
    """--channels-last changes the memory layout only: NHWC conv weights, same outputs."""
    import torch
    from benchmarks._torch_bench import TorchRunner, make_inputs
    plain = TorchRunner(tiny_model, "eager", "fp32", "cpu")
    nhwc = TorchRunner(tiny_model, "eager", "fp32", "cpu", channels_last=True)
    conv = next(m for m in nhwc.comp.model.vae.modules() if isinstance(m, torch.nn.Conv2d)
                and m.kernel_size != (1, 1))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    inputs = make_inputs(tiny_model.cfg, 32, 32, 1, "cpu", torch.float32)
    for name in ("vae_encoder", "pipeline"):
        a, b = plain.callable(name, inputs)(), nhwc.callable(name, inputs)()
        assert_close(a, b, PIPELINE if name == "pipeline" else NETWORK, msg=name)


def test_latency_times_the_bundled_checkpoint(tmp_path):
    """--checkpoint weights/tiny (whose predictor starts from decaying logits) counts its
    parameters on the meta device and times it: this crashed on Tensor.item() once."""
    from benchmarks.latency import run_latency
    ckpt = REPO / "weights" / "tiny"
    doc = run_latency(_latency_settings(tmp_path, preset=None, random_weights=False,
                                        checkpoint=ckpt, modules=("predictor", "pipeline"),
                                        flops=False, runs=1), "test")
    assert not doc["errors"], doc["errors"]
    assert doc["model"]["params"]["predictor"] > 0
    assert {r["module"] for r in doc["measurements"]} == {"predictor", "pipeline"}


# ---- gate ---------------------------------------------------------------------------------

def test_gate_benchmark_writes_every_weight_and_resumes(tmp_path):
    import json

    from click.testing import CliRunner

    from benchmarks.gate import main
    from export.gate import WEIGHTS
    from fixtures.runtime_engines import edit_manifest, identity_engine
    engine = identity_engine(tmp_path / "engine")
    edit_manifest(engine, lambda m: m.update(gate={"form": "blend", "qf": [10, 90],
                                                   "weight": [1.0, 0.0], "source": None}))
    data = _small_grey_set(tmp_path / "data")
    args = ["--engine", str(engine), "--sets", "Classic5", "--qf", "10,90", "--data", str(data),
            "--out", str(tmp_path / "out"), "--name", "g"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "out" / "g.json").read_text())
    rows = doc["gain_db"]["Classic5"]["90"]["waves.png"]
    assert len(rows) == len(WEIGHTS) and rows[0] == 0.0  # weight 0: the JPEG itself
    table = (tmp_path / "out" / "g.md").read_text()
    assert "| Classic5 | 90 | 1 |" in table and "| 0 | +0.00 / +0.00 |" in table
    (tmp_path / "data" / "Classic5" / "waves.png").unlink()  # resumed: nothing to read again
    from PIL import Image
    Image.fromarray(np.zeros((48, 64), np.uint8)).save(tmp_path / "data" / "Classic5" /
                                                       "waves.png")
    fit = tmp_path / "gate.json"
    assert CliRunner().invoke(main, args + ["--fit", str(fit)]).exit_code == 0
    assert json.loads((tmp_path / "out" / "g.json").read_text())["gain_db"] == doc["gain_db"]
    gate = json.loads(fit.read_text())
    assert gate["qf"] == [10, 90] and gate["source"]["sets"] == {"Classic5": 1}
    assert gate["weight"][1] <= gate["weight"][0]
