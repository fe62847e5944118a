"""Parity checking: typed failures on a handmade graph, and an export that collects every
component's mismatches before failing (and then writes no manifest)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from export.errors import ParityError, ParityMismatch, RuntimeFailure
from export.options import ExportOptions
from export.parity import ComponentSamples, check_parity
from export.pipeline import run_export
from export.specs import ComponentSpec, TensorSpec, Tolerance
from test_export_onnx import make_checkpoint

SPEC = ComponentSpec("relu", (TensorSpec("x", ("B", 4)),), (TensorSpec("y", ("B", 4)),),
                     Tolerance(1e-4, 1e-4), Tolerance(1e-2, 1e-2))


@pytest.fixture()
def relu_graph(tmp_path):
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save_model(m, str(tmp_path / "relu.onnx"))
    return tmp_path / "relu.onnx"


def samples(offset: float) -> ComponentSamples:
    x = np.linspace(-2, 2, 8, dtype=np.float32).reshape(2, 4)
    return ComponentSamples(batches=[("random", {"x": x}, {"y": np.maximum(x, 0) + offset}),
                                     ("real", {"x": -x}, {"y": np.maximum(-x, 0)})])


def test_matching_graph_passes(relu_graph):
    entry, failures = check_parity(relu_graph, SPEC, "fp32", samples(0.0))
    assert failures == [] and entry["passed"] and entry["max_abs"] == 0.0
    assert entry["samples"] == 4 and entry["sources"] == {"random": 2, "real": 2}


def test_mismatch_is_typed_and_names_the_batch(relu_graph):
    entry, failures = check_parity(relu_graph, SPEC, "fp32", samples(1e-3))
    assert not entry["passed"]
    assert failures == [ParityMismatch("relu", "y", "random", pytest.approx(1e-3, rel=1e-4),
                                       pytest.approx(1e-4 + 1e-4 * (2 + 1e-3), rel=1e-4))]
    assert "relu.y on random inputs" in str(failures[0])
    assert check_parity(relu_graph, SPEC, "fp32", samples(5e-5))[0]["passed"]  # within


def test_unloadable_graph_is_a_runtime_failure(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    entry, failures = check_parity(bad, SPEC, "fp32", samples(0.0))
    assert not entry["passed"] and isinstance(failures[0], RuntimeFailure)


def test_export_collects_all_mismatches_and_writes_no_manifest(tmp_path, monkeypatch):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    monkeypatch.setattr(Tolerance, "limit", lambda self, ref: -1.0)  # nothing can pass
    out = tmp_path / "eng"
    # Two cheap components prove the collecting; the UNet's export alone takes seconds.
    with pytest.raises(ParityError) as e:
        run_export(ExportOptions(out=out, checkpoint=ckpt, timestep="fixed:100",
                                 components=("vae_encoder", "vae_decoder")), log=lambda m: None)
    assert {f.component for f in e.value.failures} == {"vae_encoder", "vae_decoder"}
    assert "vae_encoder.latent" in str(e.value) and "vae_decoder.image" in str(e.value)
    assert not (out / "manifest.json").exists()
