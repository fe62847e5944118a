"""The paper's architecture (sd21 preset, random weights) at 512x512: the UNet goes through the
external-data path. Takes many minutes and ~14 GB of memory on 2 CPU cores (docs/export.md)."""
from __future__ import annotations

import json

import onnx
import pytest

from export.options import ExportOptions
from export.pipeline import run_export


@pytest.mark.slow
def test_sd21_random_weights_exports_at_512(tmp_path):
    eng = tmp_path / "eng"
    m = json.loads(run_export(ExportOptions(out=eng, preset="sd21", random_weights=True,
                                            shape=(512, 512), samples=1),
                              log=print).read_text())
    assert m["random_weights"] is True and m["preset"] == "sd21"
    assert m["image"] == {"layout": "NCHW", "range": [-1.0, 1.0], "saipe_size": 512,
                          "pad_multiple": 64, "vae_factor": 8, "latent_channels": 4,
                          "scaling_factor": 0.18215}
    unet = m["components"]["unet"]
    assert unet["external_data"]["file"] == "unet.onnx.data"
    assert (eng / "unet.onnx.data").stat().st_size > 2 ** 31  # 865M float32 weights
    assert (eng / "unet.onnx").stat().st_size < 2 ** 31
    assert unet["inputs"][2]["shape"] == ["B", 77, 1024]
    assert all(c["parity"]["passed"] for c in m["components"].values())
    assert m["lint"]["passed"], m["lint"]["problems"]
    onnx.checker.check_model(str(eng / "unet.onnx"))  # by path: the >2 GB graph is valid
