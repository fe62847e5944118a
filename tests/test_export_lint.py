"""The TensorRT lint on small handmade graphs: each rule fires on a graph that breaks it and
stays quiet on its fixed twin."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from export.lint import lint_file, lint_model

F, I64 = TensorProto.FLOAT, TensorProto.INT64


def model(nodes, inputs, outputs, inits=(), opset=17):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def rules(m, **kw):
    problems, _ = lint_model(m, "test", **kw)
    return [p.rule for p in problems]


def test_unsupported_op_is_rejected_and_named():
    m = model([helper.make_node("Relu", ["x"], ["r"], name="ok"),
               helper.make_node("IsInf", ["r"], ["y"], name="bad")],
              [vi("x", F, [1, 4])], [vi("y", TensorProto.BOOL, [1, 4])])
    problems, _ = lint_model(m, "handmade")
    assert [(p.node, p.op, p.rule) for p in problems] == [("bad", "IsInf", "unsupported-op")]
    assert "handmade: bad (IsInf)" in str(problems[0])


def test_accepted_graph_passes():
    w = numpy_helper.from_array(np.ones((2, 3, 1, 1), np.float32), "w")
    m = model([helper.make_node("Conv", ["x", "w"], ["c"]),
               helper.make_node("Sigmoid", ["c"], ["y"])],
              [vi("x", F, [1, 3, 4, 4])], [vi("y", F, [1, 2, 4, 4])], [w])
    assert rules(m) == []


def test_conv_weights_must_be_initializers():
    m = model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
              [vi("x", F, [1, 3, 4, 4]), vi("w", F, [2, 3, 1, 1])], [vi("y", F, [1, 2, 4, 4])])
    assert rules(m) == ["needs-initializer"]


def test_layernorm_needs_a_recent_tensorrt():
    scale = numpy_helper.from_array(np.ones(4, np.float32), "s")
    m = model([helper.make_node("LayerNormalization", ["x", "s"], ["y"])],
              [vi("x", F, [1, 4])], [vi("y", F, [1, 4])], [scale])
    assert rules(m, trt_version=(8, 5)) == ["unsupported-op"]
    assert rules(m, trt_version=(10, 0)) == []


def test_custom_domain_random_ops_and_cubic_resize():
    m = model([helper.make_node("RandomNormalLike", ["x"], ["n"]),
               helper.make_node("Resize", ["n", "", "sc"], ["r"], mode="cubic"),
               helper.make_node("FusedGelu", ["r"], ["y"], domain="com.microsoft")],
              [vi("x", F, [1, 1, 2, 2])], [vi("y", F, [1, 1, 4, 4])],
              [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "sc")])
    assert sorted(rules(m)) == ["custom-domain", "random-op", "resize-mode"]


def _index_graph(clip: bool, hi: float = 999.0):
    """float input -> (Clip to [0, hi]) -> Floor -> Cast int64 -> Mul by 1000 -> Gather."""
    nodes = [helper.make_node("Clip", ["t", "lo", "hi"], ["tc"])] if clip else []
    nodes += [helper.make_node("Floor", ["tc" if clip else "t"], ["f"]),
              helper.make_node("Cast", ["f"], ["i"], to=I64),
              helper.make_node("Mul", ["i", "k"], ["j"], name="scale_index"),
              helper.make_node("Gather", ["table", "j"], ["y"])]
    inits = [numpy_helper.from_array(np.array(0, np.float32), "lo"),
             numpy_helper.from_array(np.array(hi, np.float32), "hi"),
             numpy_helper.from_array(np.array(1000, np.int64), "k"),
             numpy_helper.from_array(np.zeros(10 ** 6, np.float32), "table")]
    return model(nodes, [vi("t", F, [2])], [vi("y", F, [2])], inits)


def test_int64_arithmetic_on_unbounded_values_is_flagged():
    problems, _ = lint_model(_index_graph(clip=False), "g")
    assert [(p.node, p.rule) for p in problems] == [("scale_index", "int64-overflow")]


def test_int64_arithmetic_on_clipped_values_passes():
    assert rules(_index_graph(clip=True)) == []


def test_int64_constants_beyond_int32_are_flagged():
    big = numpy_helper.from_array(np.array(2 ** 40, np.int64), "big")
    m = model([helper.make_node("Shape", ["x"], ["s"]),
               helper.make_node("Add", ["s", "big"], ["y"])],
              [vi("x", F, [1, 4])], [vi("y", I64, [2])], [big])
    assert rules(m) == ["int64-overflow"]


def test_shape_arithmetic_is_exempt():
    idx = numpy_helper.from_array(np.array([0], np.int64), "i0")
    m = model([helper.make_node("Shape", ["x"], ["s"]),
               helper.make_node("Gather", ["s", "i0"], ["b"]),
               helper.make_node("Mul", ["b", "b"], ["bb"]),
               helper.make_node("Mul", ["bb", "bb"], ["y"])],
              [vi("x", F, ["B", 4])], [vi("y", I64, [1])], [idx])
    assert rules(m) == []


def test_lint_file_reads_constants_from_external_data(tmp_path):
    for name, hi, expected in (("ok", 999.0, []), ("big", 2.0 ** 40, ["int64-overflow"])):
        path = tmp_path / f"{name}.onnx"
        onnx.save_model(_index_graph(clip=True, hi=hi), str(path), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=f"{name}.onnx.data",
                        size_threshold=0)
        assert [p.rule for p in lint_file(path, name)[0]] == expected, name
