"""The manifest against the loaded models (issue 15, item 4): a dir whose graphs or engines
disagree with their manifest entries on dtypes, ranks or fixed dims is refused when it is
opened (EngineDirError; `sodiff-run` exits 2 before reading any image), instead of failing
every image one by one."""
from __future__ import annotations

import hashlib
import json

import onnx
import pytest
from click.testing import CliRunner

from fixtures.runtime_engines import edit_manifest, identity_engine
from runtime import Restorer
from runtime.cli import EXIT_UNUSABLE, main
from runtime.errors import EngineDirError
from test_runtime_backends import _trt_dir, fakes  # noqa: F401 - the fake TensorRT fixture


def _rewrite(engine, name: str, change) -> None:
    """Apply `change(model)` to engine/NAME.onnx and record its new hash and size, so that only
    the graph and its manifest entry disagree."""
    path = engine / f"{name}.onnx"
    model = onnx.load(str(path))
    change(model)
    onnx.save(model, str(path))
    data = path.read_bytes()

    def record(d):
        d["components"][name].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    edit_manifest(engine, record)


def _io(model, tensor: str):
    g = model.graph
    return next(v for v in (*g.input, *g.output) if v.name == tensor)


def _exits_2(engine, tmp_path, match: str) -> str:
    with pytest.raises(EngineDirError, match=match):
        Restorer(engine)
    out = tmp_path / "never.png"
    res = CliRunner().invoke(main, ["--engine", str(engine), str(tmp_path / "missing.png"),
                                    "-o", str(out)])
    assert res.exit_code == EXIT_UNUSABLE, res.output
    assert "Traceback" not in res.output and not out.exists()
    return res.output


def test_manifest_lying_about_the_unets_dtypes_is_refused(tmp_path):
    engine = identity_engine(tmp_path / "engine")  # float32 graphs

    def lie(d):
        for t in (*d["components"]["unet"]["inputs"], *d["components"]["unet"]["outputs"]):
            if t["name"] != "timestep":
                t["dtype"] = "float16"
    edit_manifest(engine, lie)
    msg = _exits_2(engine, tmp_path, "unet.onnx does not match")
    assert "latent is float32 in the model, float16 in the manifest" in msg


def test_graph_with_other_dtypes_than_its_entry_is_refused(tmp_path):
    engine = identity_engine(tmp_path / "engine")

    def to_half(model):
        for tensor in ("clean_latent", "image"):
            _io(model, tensor).type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    _rewrite(engine, "vae_decoder", to_half)
    _exits_2(engine, tmp_path, "vae_decoder.onnx .*image is float16 in the model")


def test_graph_fixing_a_dim_the_manifest_lets_vary_is_refused(tmp_path):
    engine = identity_engine(tmp_path / "engine")  # dynamic 8..64

    def fix_height(model):
        _io(model, "image").type.tensor_type.shape.dim[2].dim_value = 32
    _rewrite(engine, "vae_encoder", fix_height)
    _exits_2(engine, tmp_path, r"image dim 2 is fixed to 32 in the model, the manifest says "
                               r"H in 8\.\.64")


def test_wrong_rank_and_wrong_fixed_dim_are_refused(tmp_path):
    engine = identity_engine(tmp_path / "engine")
    edit_manifest(engine, lambda d: d["components"]["saipe"]["outputs"][0].update(
        shape=["B", 77, 16]))
    _exits_2(engine, tmp_path, "prompt dim 2 is fixed to 8 in the model, the manifest says 16")
    engine = identity_engine(tmp_path / "engine2")
    edit_manifest(engine, lambda d: d["components"]["predictor"]["outputs"][0].update(
        shape=["B", 1]))
    _exits_2(engine, tmp_path, "timestep has 1 dims in the model, 2")


def test_a_matching_dir_still_opens(tmp_path):
    for static in (False, True):
        with Restorer(identity_engine(tmp_path / f"e{static}", static=static)) as r:
            assert r.backend == "ort"


def test_tensorrt_engines_are_checked_against_the_manifest(fakes, tmp_path):  # noqa: F811
    root = _trt_dir(tmp_path, static=False)
    with Restorer(root):
        pass  # the fake engines agree with their entries

    def lie(d):
        d["components"]["unet"]["inputs"][0]["dtype"] = "float16"
    data = json.loads((root / "manifest.json").read_text())
    lie(data)
    (root / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(EngineDirError, match="latent is float32 in the model, float16"):
        Restorer(root)
    assert not fakes.live  # what loaded before the refusal was freed
