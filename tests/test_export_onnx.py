"""End-to-end ONNX export of the tiny preset, checked independently of the exporter's own
parity code: each graph against the original (unmerged) PyTorch model on random and real
inputs, the five graphs chained against the PyTorch pipeline, the lint, the manifest, re-runs
and crash safety."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from conftest import SHARED_DATA
from export import pipeline
from export.cli import main
from export.errors import ComponentExportError
from export.lint import lint_file
from export.options import ExportOptions
from export.pipeline import run_export
from export.samples import fit, list_images, load_image, to_tensor
from sodiff import base as base_mod
from sodiff.checkpoint import load, save
from sodiff.config import TINY
from sodiff.model import SODiff, resize_for_saipe
from tolerance import PIPELINE, assert_close, assert_differs, excess

LIVE1 = SHARED_DATA / "LIVE1_color"
COMPONENTS = ("saipe", "predictor", "vae_encoder", "unet", "vae_decoder")
needs_live1 = pytest.mark.skipif(not LIVE1.is_dir(), reason=f"real images absent: {LIVE1}")


def make_checkpoint(folder: Path) -> Path:
    """A tiny checkpoint whose LoRA and timestep head are not at their zero init."""
    torch.manual_seed(0)
    m = SODiff(TINY)
    with torch.no_grad():
        for name, p in m.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
        m.predictor.timestep_head.weight.normal_(0, 0.5)
    return save(m, folder)


def make_calibration(folder: Path, n: int = 2) -> Path | None:
    """LIVE1 images cropped to 64x64 (top-left: the JPEG grid stays aligned)."""
    if not LIVE1.is_dir():
        return None
    from PIL import Image
    folder.mkdir()
    for p in list_images(LIVE1)[:n]:
        with Image.open(p) as im:
            im.convert("RGB").crop((0, 0, 64, 64)).save(folder / f"{p.stem}.png")
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    ckpt = make_checkpoint(root / "ckpt")
    calib = make_calibration(root / "calib")
    logs: list[str] = []
    opts = ExportOptions(out=root / "eng", checkpoint=ckpt, calibration=calib)
    path = run_export(opts, log=logs.append)
    return {"root": root, "ckpt": ckpt, "calib": calib, "opts": opts, "logs": logs,
            "manifest": json.loads(path.read_text()), "model": load(ckpt).eval()}


def session(path: Path):
    import onnxruntime as ort
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run(eng: Path, name: str, **feeds: torch.Tensor) -> list[np.ndarray]:
    return session(eng / f"{name}.onnx").run(None, {k: v.numpy() for k, v in feeds.items()})


def real_images(n: int, size: tuple[int, int]) -> torch.Tensor:
    return torch.cat([fit(to_tensor(load_image(p)), size) for p in list_images(LIVE1)[:n]])


def check_components_against_torch(eng: Path, model: SODiff, x: torch.Tensor) -> dict:
    """Each output's error as a multiple of the tolerance policy's bound (tests/tolerance.py)
    for onnxruntime against PyTorch; x is [B,3,H,W] at any multiple of pad_multiple."""
    g = torch.Generator().manual_seed(1)
    b = x.shape[0]
    with torch.no_grad():
        xs = resize_for_saipe(x, 64)
        prompt = model.saipe(xs)[0]
        tau, qf, _ = model.predictor(x)
        z = base_mod.encode_mean(model.vae, x, 1.0)
        t_rand = torch.rand(b, generator=g) * 999
        clean = model.denoise(z, t_rand, prompt)
        dec = base_mod.decode(model.vae, clean, 1.0)
    got = {"saipe": run(eng, "saipe", image=xs)[0],
           "vae_encoder": run(eng, "vae_encoder", image=x)[0],
           "unet": run(eng, "unet", latent=z, timestep=t_rand, prompt=prompt)[0],
           "vae_decoder": run(eng, "vae_decoder", clean_latent=clean)[0]}
    t_onnx, qf_onnx = run(eng, "predictor", image=x)
    ref = {"saipe": prompt, "vae_encoder": z, "unet": clean, "vae_decoder": dec}
    ratios = {k: excess(got[k], ref[k], PIPELINE) for k in got}
    ratios["timestep"], ratios["qf"] = excess(t_onnx, tau, PIPELINE), excess(qf_onnx, qf, PIPELINE)
    return ratios


def test_manifest_describes_every_component(exported):
    m = exported["manifest"]
    eng = exported["opts"].out
    assert m["format"] == "sodiff-engine" and m["format_version"] == 1
    assert m["random_weights"] is False and m["preset"] == "tiny"
    assert list(m["components"]) == list(COMPONENTS)
    assert m["timestep"]["mode"] == "predicted" and len(m["timestep"]["qf_table"]["tau"]) == 11
    assert m["image"]["pad_multiple"] == TINY.pad_multiple
    assert m["image"]["latent_channels"] == TINY.latent_channels
    for name, c in m["components"].items():
        assert (eng / c["file"]).is_file() and Path(c["file"]).name == c["file"]
        assert c["parity"]["passed"] and c["parity"]["max_abs"] <= c["parity"]["tolerance"], \
            (name, c["parity"])
        assert c["fp16"]["at_risk"] is False and c["fp16"]["max_abs_activation"] > 0
        graph = onnx.load(str(eng / c["file"]), load_external_data=False).graph
        assert [i.name for i in graph.input] == [i["name"] for i in c["inputs"]]
        assert [o.name for o in graph.output] == [o["name"] for o in c["outputs"]]
    assert m["components"]["unet"]["inputs"][1] == {"name": "timestep", "dtype": "float32",
                                                   "shape": ["B"]}
    if exported["calib"] is not None:
        assert m["components"]["unet"]["parity"]["sources"] == {"random": 2, "real": 2}


def test_components_match_pytorch_on_random_inputs_of_another_size(exported):
    """Batch 2 at 32x48 (the graphs were traced at batch 1, 64x64): dynamic axes work."""
    x = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(5)) * 2 - 1
    ratios = check_components_against_torch(exported["opts"].out, exported["model"], x)
    assert all(r <= 1 for r in ratios.values()), ratios


@needs_live1
def test_components_match_pytorch_on_real_images(exported):
    ratios = check_components_against_torch(exported["opts"].out, exported["model"],
                                            real_images(2, (64, 64)))
    assert all(r <= 1 for r in ratios.values()), ratios


def chain(eng: Path, x: torch.Tensor) -> np.ndarray:
    """The five graphs in order, as the runtime runs them."""
    (prompt,) = run(eng, "saipe", image=resize_for_saipe(x, 64))
    tau, _ = run(eng, "predictor", image=x)
    (z,) = run(eng, "vae_encoder", image=x)
    (clean,) = session(eng / "unet.onnx").run(None, {"latent": z, "timestep": tau,
                                                      "prompt": prompt})
    return run(eng, "vae_decoder", clean_latent=torch.from_numpy(clean))[0]


@pytest.mark.parametrize("source", ["random", "real"])
def test_chain_matches_pytorch_pipeline(exported, source):
    if source == "real" and not LIVE1.is_dir():
        pytest.skip(f"real images absent: {LIVE1}")
    x = real_images(2, (64, 64)) if source == "real" else \
        torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(9)) * 2 - 1
    with torch.no_grad():
        ref = exported["model"](x).decoded.numpy()
    assert_close(chain(exported["opts"].out, x), ref, PIPELINE)


def test_exported_unet_carries_the_lora(exported):
    model, eng = exported["model"], exported["opts"].out
    z, prompt = torch.randn(1, TINY.latent_channels, 16, 16), torch.randn(1, 77, 64)
    t = torch.tensor([400.0])
    (got,) = run(eng, "unet", latent=z, timestep=t, prompt=prompt)
    no_lora = load(exported["ckpt"]).eval()
    with torch.no_grad():
        for name, p in no_lora.unet.named_parameters():
            if "lora_B" in name:
                p.zero_()
        base = no_lora.denoise(z, t, prompt).numpy()
        with_lora = model.denoise(z, t, prompt).numpy()
    assert_close(got, with_lora, PIPELINE)
    assert_differs(base, with_lora, PIPELINE)


def test_lint_passes_every_exported_component(exported):
    assert exported["manifest"]["lint"]["passed"]
    for name in COMPONENTS:
        problems, _ = lint_file(exported["opts"].out / f"{name}.onnx", name)
        assert problems == [], problems


def test_rerun_skips_unchanged_and_force_rebuilds(exported, tmp_path):
    eng, opts = exported["opts"].out, exported["opts"]
    before = {p.name: p.stat().st_mtime_ns for p in eng.glob("*.onnx")}
    logs: list[str] = []
    run_export(ExportOptions(**{**opts.__dict__, "components": ("unet", "vae_decoder"),
                                "force": False}), log=logs.append)
    assert sum("[skip]" in line for line in logs) == 2
    assert {p.name: p.stat().st_mtime_ns for p in eng.glob("*.onnx")} == before
    logs.clear()
    run_export(ExportOptions(**{**opts.__dict__, "components": ("vae_decoder",),
                                "force": True}), log=logs.append)
    assert not any("[skip]" in line for line in logs)
    assert (eng / "vae_decoder.onnx").stat().st_mtime_ns != before["vae_decoder.onnx"]


def test_cli_export_then_a_crash_leaves_no_manifest(exported, tmp_path, monkeypatch):
    eng = tmp_path / "eng"
    r = CliRunner().invoke(main, ["--checkpoint", str(exported["ckpt"]), "--out", str(eng),
                                  "--components", "vae_decoder"])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str(eng / "manifest.json")  # stdout: the manifest, for scripts
    for stage in ("[model]", "[timestep]", "[samples]", "[trace] vae_decoder",
                  "[onnx] vae_decoder", "[parity] vae_decoder", "[lint]", "[done]"):
        assert stage in r.stderr, stage  # progress per stage on stderr
    opts = ExportOptions(out=eng, checkpoint=exported["ckpt"], components=("vae_decoder",))

    def crash(*args, **kwargs):
        raise ComponentExportError("vae_decoder", "clean-up", "simulated crash")

    monkeypatch.setattr(pipeline, "finish_component", crash)
    with pytest.raises(ComponentExportError):
        run_export(ExportOptions(**{**opts.__dict__, "force": True}), log=lambda m: None)
    assert not (eng / "manifest.json").exists()
    assert not list(eng.glob(".raw-*")), "traced graphs of the failed run were left behind"


def test_graph_io_dims_use_the_manifest_symbols(exported):
    """A plain InferenceSession user sees the manifest's shapes: every input and output dim is
    a fixed int or one of B, H, W, h, w (not `floor(H/2 - 1/2) + 1`), as the manifest says."""
    eng, comps = exported["root"] / "eng", exported["manifest"]["components"]
    for name, c in comps.items():
        sess = session(eng / c["file"])
        for got, want in ((sess.get_inputs(), c["inputs"]), (sess.get_outputs(), c["outputs"])):
            assert [(t.name, list(t.shape)) for t in got] == \
                [(w["name"], w["shape"]) for w in want], name
