"""Baked timesteps (fixed, calibrated), float16 graphs and the external-data path, each on a
small subset of the tiny preset's components."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from export import cleanup
from export.options import ExportOptions
from export.pipeline import run_export
from export.samples import predict_tau
from sodiff.checkpoint import load
from sodiff.config import TINY
from test_export_onnx import make_checkpoint, session
from tolerance import PIPELINE, assert_close, assert_differs


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("modes") / "ckpt")


def export(tmp_path: Path, ckpt: Path, **kw) -> dict:
    path = run_export(ExportOptions(out=tmp_path / "eng", checkpoint=ckpt, **kw),
                      log=lambda m: None)
    return json.loads(path.read_text())


def test_fixed_timestep_is_baked_and_its_embedding_folded(tmp_path, ckpt, monkeypatch):
    # A 1 MB "protobuf limit" sends this small UNet down the >2 GB external-data path.
    monkeypatch.setattr(cleanup, "PROTOBUF_LIMIT", 2 ** 20)
    monkeypatch.setattr(cleanup, "EXTERNAL_MARGIN", 0)
    m = export(tmp_path, ckpt, timestep="fixed:250.5", components=("unet",))
    eng = tmp_path / "eng"
    unet = m["components"]["unet"]
    assert m["timestep"]["mode"] == "fixed" and m["timestep"]["value"] == 250.5
    assert [i["name"] for i in unet["inputs"]] == ["latent", "prompt"]
    assert unet["external_data"]["file"] == "unet.onnx.data"
    assert (eng / "unet.onnx.data").stat().st_size > (eng / "unet.onnx").stat().st_size
    graph = onnx.load(str(eng / "unet.onnx"), load_external_data=False).graph
    assert [i.name for i in graph.input] == ["latent", "prompt"]
    assert not {n.op_type for n in graph.node} & {"Sin", "Cos", "Floor"}, \
        "the time embedding or a(tau) was not folded"
    assert not [t.name for t in graph.initializer if list(t.dims) == [1000]], \
        "the alphas_cumprod table should fold away with a baked tau"
    model = load(ckpt).eval()
    z, prompt = torch.randn(2, TINY.latent_channels, 8, 8), torch.randn(2, 77, 64)
    with torch.no_grad():
        want = model.denoise(z, torch.full((2,), 250.5), prompt).numpy()
        other = model.denoise(z, torch.full((2,), 700.0), prompt).numpy()
    (got,) = session(eng / "unet.onnx").run(None, {"latent": z.numpy(),
                                                   "prompt": prompt.numpy()})
    assert_close(got, want, PIPELINE)  # onnxruntime's kernels, not torch's
    assert_differs(other, want, PIPELINE)


def test_calibrated_tau_is_the_median_prediction(tmp_path, ckpt):
    calib = tmp_path / "calib"
    calib.mkdir()
    rng = np.random.default_rng(0)
    images = [(rng.random((40 + 8 * i, 52, 3)) * 255).astype(np.uint8) for i in range(3)]
    for i, im in enumerate(images):
        Image.fromarray(im).save(calib / f"{i}.png")
    m = export(tmp_path, ckpt, timestep="calibrated", calibration=calib,
               components=("vae_decoder",))
    model = load(ckpt).eval()
    taus = [predict_tau(model.predictor, im) for im in images]
    assert m["timestep"]["mode"] == "calibrated"
    assert m["timestep"]["value"] == pytest.approx(float(np.median(taus)), abs=1e-4)
    assert m["timestep"]["qf_table"]["source"] == "calibration"
    assert list(m["components"]) == ["vae_decoder"]


def test_fp16_onnx_graphs_run_in_onnxruntime(tmp_path, ckpt):
    m = export(tmp_path, ckpt, precision="fp16", precision_overrides=(("saipe", "fp32"),))
    comps = m["components"]
    assert comps["saipe"]["precision"] == "fp32"
    for name in ("predictor", "vae_encoder", "unet", "vae_decoder"):
        c = comps[name]
        assert c["precision"] == "fp16" and c["parity"]["passed"], (name, c["parity"])
        graph = onnx.load(str(tmp_path / "eng" / c["file"])).graph
        half = sum(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer)
        assert half > len(graph.initializer) // 2, f"{name}: weights are not float16"
    dtypes = {i["name"]: i["dtype"] for i in comps["unet"]["inputs"]}
    assert dtypes == {"latent": "float16", "timestep": "float32", "prompt": "float16"}
    assert {o["dtype"] for o in comps["predictor"]["outputs"]} == {"float32"}
