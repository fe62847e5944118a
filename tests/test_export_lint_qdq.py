"""The lint's Q/DQ rules on hand-built graphs: a well-formed INT8/FP8 Conv passes, and each
broken rule is reported under its own name."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.lint import lint_model

F16, F32 = TensorProto.FLOAT16, TensorProto.FLOAT


def _graph(*, qtype=TensorProto.INT8, act_zp=0, act_scale_shape=(), w_axis=0,
           w_scale_len=8, scale_type=F16, opset=19, computed_scale=False, q_feeds_relu=False,
           io=F16) -> onnx.ModelProto:
    np_scale = np.float16 if scale_type == F16 else np.float32
    zp_value = np.full(act_scale_shape or (), act_zp)
    inits = [
        numpy_helper.from_array(np.full(act_scale_shape, 0.02, np_scale), "s_a"),
        helper.make_tensor("zp_a", qtype, list(act_scale_shape), zp_value.ravel().tolist()),
        helper.make_tensor("w_q", qtype, [8, 4, 3, 3], [0] * (8 * 4 * 9)),
        numpy_helper.from_array(np.full((w_scale_len,), 0.01, np_scale), "s_w"),
        helper.make_tensor("zp_w", qtype, [w_scale_len], [0] * w_scale_len),
    ]
    nodes = []
    scale = "s_a"
    if computed_scale:
        nodes.append(helper.make_node("Identity", ["s_a"], ["s_a_run"], name="scale_op"))
        scale = "s_a_run"
    nodes += [
        helper.make_node("QuantizeLinear", ["x", scale, "zp_a"], ["xq"], name="q_x"),
        helper.make_node("DequantizeLinear", ["xq", scale, "zp_a"], ["xd"], name="dq_x"),
        helper.make_node("DequantizeLinear", ["w_q", "s_w", "zp_w"], ["wd"], name="dq_w",
                         axis=w_axis),
        helper.make_node("Conv", ["xd", "wd"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    if q_feeds_relu:
        nodes.append(helper.make_node("Relu", ["xq"], ["r"], name="relu_on_int8"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", io, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", io, [1, 8, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _rules(model) -> set[str]:
    problems, _ = lint_model(model, "unet")
    return {p.rule for p in problems}


@pytest.mark.parametrize("qtype", [TensorProto.INT8, TensorProto.FLOAT8E4M3FN])
def test_a_well_formed_qdq_conv_passes(qtype):
    assert _rules(_graph(qtype=qtype)) == set()


@pytest.mark.parametrize("kw,rule", [
    ({"act_zp": 3}, "qdq-zero-point"),
    ({"qtype": TensorProto.UINT8}, "qdq-type"),
    ({"computed_scale": True}, "qdq-scale-constant"),
    ({"act_scale_shape": (4,), "act_zp": 0}, "qdq-activation-per-tensor"),
    ({"w_scale_len": 1}, "qdq-weight-per-channel"),
    ({"w_axis": 1, "w_scale_len": 4}, "qdq-weight-per-channel"),
    ({"q_feeds_relu": True}, "qdq-pair"),
    ({"scale_type": F32}, "qdq-island"),
    ({"opset": 17}, "qdq-opset"),
])
def test_each_broken_rule_is_reported(kw, rule):
    assert rule in _rules(_graph(**kw))


def test_float32_scales_in_a_float32_graph_are_fine():
    assert _rules(_graph(scale_type=F32, io=F32, opset=17)) == set()


def test_dequantized_weights_count_as_constant_for_conv():
    """TensorRT takes DQ(constant) as a Conv's weights: no needs-initializer problem."""
    assert "needs-initializer" not in _rules(_graph())
