"""TensorRT: engine names and profiles (anywhere), and building and running a tiny engine
(`gpu`: needs TensorRT and a CUDA GPU; skipped elsewhere)."""
from __future__ import annotations

import importlib.util
import json
import re

import numpy as np
import pytest

from export.options import ExportOptions
from export.specs import component_specs, dims
from export.trt import engine_file_name, version_tuple


def _trt_missing() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed"
    import torch
    return None if torch.cuda.is_available() else "no CUDA GPU"


def test_engine_file_name_carries_version_and_gpu():
    assert engine_file_name("unet", "10.3.0", (9, 0)) == "unet.trt10.3.0.sm90.plan"
    assert version_tuple("10.14.1.48") == (10, 14)


def test_profiles_follow_the_shape_options():
    specs = component_specs(saipe_size=512, num_queries=77, prompt_dim=1024,
                            latent_channels=4, baked_timestep=False)
    lo, opt, hi = dims(1, (256, 256), 8), dims(2, (512, 512), 8), dims(4, (1024, 768), 8)
    unet = specs["unet"].profile(lo, opt, hi)
    assert unet["latent"] == {"min": [1, 4, 32, 32], "opt": [2, 4, 64, 64],
                              "max": [4, 4, 128, 96]}
    assert unet["timestep"] == {"min": [1], "opt": [2], "max": [4]}
    assert unet["prompt"]["max"] == [4, 77, 1024]
    assert specs["saipe"].profile(lo, opt, hi)["image"]["min"] == [1, 3, 512, 512]


@pytest.mark.gpu
@pytest.mark.skipif(_trt_missing() is not None, reason=str(_trt_missing()))
def test_tiny_engines_build_and_match_onnxruntime(tmp_path):
    import tensorrt
    import torch

    from export.parity import ort_session
    from export.pipeline import run_export
    from export.trt import run_engine

    eng = tmp_path / "eng"
    opts = ExportOptions(out=eng, target="trt", preset="tiny", random_weights=True,
                         timestep="fixed:300", components=("unet", "vae_decoder"),
                         dynamic=((32, 32), (64, 64), (128, 128)), batch=(1, 1, 2),
                         precision_overrides=(("vae_decoder", "fp32"),))
    m = json.loads(run_export(opts, log=lambda s: None).read_text())
    cc = "".join(map(str, torch.cuda.get_device_capability()))
    assert (eng / "timing.cache").is_file()
    rng = np.random.default_rng(0)
    for name, side in (("unet", 16), ("vae_decoder", 32), ("unet", 64)):  # latent sides
        c = m["components"][name]
        assert c["backend"] == "trt"
        assert re.fullmatch(rf"{name}\.trt{re.escape(tensorrt.__version__)}\.sm{cc}\.plan",
                            c["file"])
        feeds = {i["name"]: rng.standard_normal(
            [2 if d == "B" else side if d in ("h", "w") else d for d in i["shape"]]
        ).astype(i["dtype"]) for i in c["inputs"]}
        got = run_engine(eng / c["file"], feeds)
        ref = ort_session(eng / c["trt"]["onnx"]["file"]).run(None, feeds)[0]
        out = got[c["outputs"][0]["name"]].astype(np.float32)
        tol = 2e-2 + 2e-2 * np.abs(ref).max() if c["precision"] == "fp16" else 1e-3
        assert np.abs(out - ref.astype(np.float32)).max() <= tol, name
