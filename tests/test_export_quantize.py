"""8-bit exports of the bundled model: the Q/DQ graphs' structure, the manifest's record, the
quality check and its refusal, determinism, and that the runtime restores with the dir."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from export import quality
from export.errors import OptionError
from export.options import ExportOptions
from export.pipeline import run_export
from export.plan import resolve_plan
from export.quantize import KEEP_HALF

SHAPE = (64, 64)
HALF_IO = {"latent", "prompt", "clean_latent"}


def _export(out: Path, *precisions: str, **kw) -> dict:
    from export.options import parse_precisions
    default, overrides = parse_precisions(precisions)
    opts = ExportOptions(out=out, shape=SHAPE, precision=default, precision_overrides=overrides,
                         calibration_count=16, **kw)
    return json.loads(run_export(opts, log=lambda s: None).read_text())


@pytest.fixture(scope="module")
def int8(tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "eng"
    return _export(out, "int8"), out


@pytest.fixture(scope="module")
def fp8(tmp_path_factory):
    out = tmp_path_factory.mktemp("fp8") / "eng"
    return _export(out, "unet=fp8"), out


def _qdq(path: Path):
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    types = {t.name: t.data_type for t in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    return model, inits, types, nodes


@pytest.mark.parametrize("which,qtype", [("int8", TensorProto.INT8),
                                         ("fp8", TensorProto.FLOAT8E4M3FN)])
def test_qdq_graph_is_symmetric_typed_and_per_channel(request, which, qtype):
    _, out = request.getfixturevalue(which)
    model, inits, types, nodes = _qdq(out / "unet.onnx")
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 19
    assert len(nodes) > 50
    users = {i: n for n in model.graph.node for i in n.input}
    weights = 0
    for n in nodes:
        zp = n.input[2]
        assert types[zp] == qtype and not inits[zp].astype(float).any(), n.name
        assert types[n.input[1]] == TensorProto.FLOAT16, n.name  # float16 scales, opset 19
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:  # a weight
            w, scale, user = inits[n.input[0]], inits[n.input[1]], users[n.output[0]]
            axis = {"Conv": 0, "Gemm": 0, "MatMul": w.ndim - 1}[user.op_type]
            attr = next((a.i for a in n.attribute if a.name == "axis"), 1)
            assert scale.shape == (w.shape[axis],) and attr == axis, n.name
            assert types[n.input[0]] == qtype  # stored 8-bit, not float with a Q/DQ pair
            weights += 1
        elif n.op_type == "QuantizeLinear":
            assert inits[n.input[1]].size == 1, n.name  # activations: one scale
    assert weights > 20
    # Nothing quantized on the float32 islands or in the layers kept in float16; the rest is.
    dequantized = {o for n in nodes if n.op_type == "DequantizeLinear" for o in n.output}
    weights = set(inits) | {n.output[0] for n in nodes
                            if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    computed = [n for n in model.graph.node if n.op_type in ("Conv", "MatMul", "Gemm")]
    for n in computed:
        attention = n.op_type == "MatMul" and not any(i in weights for i in n.input)
        kept = "time_embedding" in n.name or KEEP_HALF.match(n.name) or attention
        assert any(i in dequantized for i in n.input) != bool(kept), n.name


def test_manifest_records_precision_recipe_calibration_and_quality(int8):
    m, out = int8
    comps = m["components"]
    assert {n: c["precision"] for n, c in comps.items()} == {
        "saipe": "fp32", "predictor": "fp32", "vae_encoder": "int8", "unet": "int8",
        "vae_decoder": "int8"}
    for n in ("vae_encoder", "unet", "vae_decoder"):
        q = comps[n]["quantization"]
        assert q["precision"] == "int8" and q["calibrator"] == "MinMax" and q["symmetric"]
        assert "onnxruntime" in q["cpu_execution"]
        assert q["calibration"]["source"] == "scikit-image photos"
        assert q["calibration"]["crops"] == 16 and len(q["calibration"]["sha256"]) == 64
        assert set(q["calibration"]["held_out"]).isdisjoint({"astronaut", "coffee"})
        qual = q["quality"]
        assert set(qual["loss_db"]) == {10, 40} or set(qual["loss_db"]) == {"10", "40"}
        assert qual["passed"] and qual["bound_db"] == quality.BOUNDS_DB[n]["int8"]
        assert comps[n]["parity"]["gating"] is False
        assert {i["dtype"] for i in comps[n]["inputs"] if i["name"] != "timestep"} == \
            {"float16"}
    assert "quantization" not in comps["saipe"]
    assert m["lint"]["passed"]


def test_runtime_restores_with_the_8bit_dirs(int8, fp8, tmp_path):
    from PIL import Image

    from runtime import Restorer
    from sodiff.jpeg import compress
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:96, 0:80]
    clean = np.stack([(x * 3) % 256, (y * 2) % 256, (x + y) % 256], -1).astype(np.uint8)
    clean = np.clip(clean + rng.normal(0, 4, clean.shape), 0, 255).astype(np.uint8)
    src = tmp_path / "in.jpg"
    src.write_bytes(compress(clean, 10)[1])
    outs = []
    for _, eng in (int8, fp8):
        with Restorer(eng) as r:
            r.restore_file(src, tmp_path / f"{eng.parent.name}.png")
        outs.append(np.asarray(Image.open(tmp_path / f"{eng.parent.name}.png")))
    jpeg = np.asarray(Image.open(src).convert("RGB"))
    for o in outs:
        assert o.shape == clean.shape and not np.array_equal(o, jpeg)


def test_two_exports_write_the_same_quantized_graph(fp8, tmp_path):
    m, _ = fp8
    again = _export(tmp_path / "again", "unet=fp8")
    assert again["components"]["unet"]["sha256"] == m["components"]["unet"]["sha256"]
    assert again["components"]["unet"]["quantization"]["calibration"]["sha256"] == \
        m["components"]["unet"]["quantization"]["calibration"]["sha256"]


def test_a_component_over_its_bound_is_refused_unless_forced(tmp_path, monkeypatch):
    monkeypatch.setitem(quality.BOUNDS_DB, "unet", {"int8": -1.0, "fp8": -1.0})
    with pytest.raises(quality.QualityError, match=r"unet in int8 loses -?\d+\.\d+ dB"):
        _export(tmp_path / "eng", "unet=int8")
    assert not (tmp_path / "eng" / "manifest.json").exists()
    assert not list((tmp_path / "eng").glob(".raw-*"))  # the twins are gone either way
    m = _export(tmp_path / "eng", "unet=int8", force=True)
    assert m["components"]["unet"]["quantization"]["quality"]["passed"] is False


def test_global_8bit_precision_quantizes_the_default_set():
    onnx_int8 = resolve_plan(ExportOptions(out=Path("x"), precision="int8")).precision
    assert onnx_int8 == {"saipe": "fp32", "predictor": "fp32", "vae_encoder": "int8",
                         "unet": "int8", "vae_decoder": "int8"}
    trt_fp8 = resolve_plan(ExportOptions(out=Path("x"), target="trt", precision="fp8",
                                         precision_overrides=(("vae_decoder", "fp32"),))
                           ).precision
    assert trt_fp8 == {"saipe": "fp16", "predictor": "fp16", "vae_encoder": "fp16",
                       "unet": "fp8", "vae_decoder": "fp32"}


@pytest.mark.parametrize("count", [0, 5000])
def test_calibration_count_is_bounded(count):
    with pytest.raises(OptionError, match="--calibration-count"):
        resolve_plan(ExportOptions(out=Path("x"), precision="int8", calibration_count=count))


def _photos(folder: Path, n: int) -> Path:
    from PIL import Image
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(n):
        y, x = np.mgrid[0:40 + 8 * i, 0:56]
        im = np.stack([x * 4, y * 3, (x + y) * 2], -1) % 256 + rng.integers(0, 9, (*x.shape, 3))
        Image.fromarray(im.astype(np.uint8)).save(folder / f"p{i}.png")
    return folder


def test_calibration_folder_gives_deterministic_crops_and_a_held_out_part(tmp_path):
    from export.calibration import CALIBRATION_QFS, calibration_set
    folder = _photos(tmp_path / "cal", 6)
    a = calibration_set(folder, 5, (32, 48), seed=0)
    assert [c.shape for c in a.crops] == [(32, 48, 3)] * 5
    assert a.qfs == list(CALIBRATION_QFS[:5])
    assert [n for n, _ in a.held_out] == ["p5.png"]  # the last quarter, never calibrated on
    assert a.source == "calibration folder cal"
    assert calibration_set(folder, 5, (32, 48), seed=0).sha256 == a.sha256
    assert calibration_set(folder, 5, (32, 48), seed=1).sha256 != a.sha256


def test_a_calibration_folder_of_one_image_is_refused(tmp_path):
    from export.calibration import calibration_set
    from export.errors import CalibrationError
    with pytest.raises(CalibrationError, match="at least 2 images"):
        calibration_set(_photos(tmp_path / "cal", 1), 4, (32, 32), seed=0)


def test_an_8bit_component_without_the_rest_of_the_pipeline_is_refused(tmp_path):
    from export.errors import ExportError
    with pytest.raises(ExportError, match="vae_decoder missing") as e:
        _export(tmp_path / "eng", "unet=int8", components=("saipe", "predictor", "vae_encoder",
                                                           "unet"))
    assert "--components" in str(e.value)
    assert not (tmp_path / "eng").exists()  # refused before anything was written
