"""Q/DQ rules of the TensorRT lint: the explicit quantization TensorRT 10.12+/11 builds
strongly typed (docs/export.md, "INT8 and FP8"). Each broken rule names its node.

- qdq-pair: a QuantizeLinear feeds only DequantizeLinear nodes; a DequantizeLinear reads a
  constant (weights) or a QuantizeLinear.
- qdq-type: the quantized type is INT8 or FLOAT8E4M3FN (no UINT8, INT4 here).
- qdq-zero-point: zero points are constant zeros (TensorRT's quantization is symmetric).
- qdq-scale-constant: scales are constants.
- qdq-activation-per-tensor: activations have one scale (a scalar).
- qdq-weight-per-channel: weights of Conv/ConvTranspose/Gemm/MatMul have one scale per output
  channel, along the output-channel axis.
- qdq-island: no Q/DQ with float32 scales in a float16 graph: those sit on the float32
  islands the fp16 analysis keeps (export/islands.py).
- qdq-opset: float16 scales and float8 need opset 19.
"""
from __future__ import annotations

from collections import defaultdict

import onnx
from onnx import TensorProto, helper

from .errors import LintProblem

Q, DQ = "QuantizeLinear", "DequantizeLinear"
QUANT_TYPES = {TensorProto.INT8: "INT8", TensorProto.FLOAT8E4M3FN: "FLOAT8E4M3FN"}
WEIGHT_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
QDQ_OPSET = 19


def _attr(node: onnx.NodeProto, name: str, default):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name),
                default)


def out_channel_axis(consumer: onnx.NodeProto, index: int, rank: int) -> int | None:
    """The axis of a weight input that indexes output channels (None: not a weight input)."""
    op = consumer.op_type
    if op == "Conv" and index == 1:
        return 0
    if op == "ConvTranspose" and index == 1:
        return 1
    if op == "Gemm" and index == 1:
        return 0 if _attr(consumer, "transB", 0) else 1
    if op == "MatMul" and index == 1:
        return rank - 1
    return None


def _qtype(node: onnx.NodeProto, g, types: dict[str, int]) -> int | None:
    """The quantized element type of a Q (its output) or a DQ (its input)."""
    if len(node.input) > 2 and node.input[2]:
        return types.get(node.input[2])
    if node.op_type == DQ:
        return types.get(node.input[0])
    return _attr(node, "output_dtype", 0) or TensorProto.UINT8  # ONNX's default: uint8


def qdq_problems(model: onnx.ModelProto, g, types: dict[str, int], component: str
                 ) -> list[LintProblem]:
    """Every Q/DQ rule broken in `model` (g: lint._Graph; types: element types by name)."""
    nodes = [n for n in model.graph.node if n.op_type in (Q, DQ)]
    if not nodes:
        return []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    consumers = defaultdict(list)
    producers = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            consumers[name].append((node, i))
        for name in node.output:
            producers[name] = node
    half = any(types.get(i.name) == TensorProto.FLOAT16 for i in model.graph.input)
    problems = []

    def bad(node, rule, msg):
        problems.append(LintProblem(component, node.name or node.output[0], node.op_type, rule,
                                    msg))

    for node in nodes:
        x, scale = node.input[0], node.input[1]
        zp = node.input[2] if len(node.input) > 2 else ""
        qtype = _qtype(node, g, types)
        if qtype not in QUANT_TYPES:
            bad(node, "qdq-type", f"quantized type {TensorProto.DataType.Name(qtype or 0)}: "
                f"TensorRT's Q/DQ take INT8 or FLOAT8E4M3FN")
        if not g.is_const(scale):
            bad(node, "qdq-scale-constant", f"scale {scale!r} is computed; TensorRT needs a "
                f"constant scale")
        if zp:
            value = g.value(zp) if g.is_const(zp) else None
            if value is None or value.astype(float).any():
                bad(node, "qdq-zero-point", f"zero point {zp!r} is not a constant 0: TensorRT "
                    f"quantizes symmetrically")
        scale_type = types.get(scale)
        if (qtype == TensorProto.FLOAT8E4M3FN or scale_type == TensorProto.FLOAT16) \
                and opset < QDQ_OPSET:
            bad(node, "qdq-opset", f"float8 or float16 scales need opset {QDQ_OPSET}, the graph "
                f"is opset {opset}")
        if half and scale_type == TensorProto.FLOAT:
            bad(node, "qdq-island", "a float32 scale in a float16 graph: Q/DQ on a float32 "
                "island, which the fp16 analysis keeps out of reduced precision")
        if node.op_type == Q:
            for user, _ in consumers.get(node.output[0], []):
                if user.op_type != DQ:
                    bad(node, "qdq-pair", f"its output feeds {user.op_type} "
                        f"{user.name!r}; a QuantizeLinear must feed DequantizeLinear only")
            if not g.is_const(x):
                _per_tensor(node, g, bad)
            continue
        if g.is_const(x):
            _per_channel(node, g, consumers.get(node.output[0], []), bad)
        elif getattr(producers.get(x), "op_type", None) != Q:
            bad(node, "qdq-pair", f"input {x!r} is neither a constant nor a QuantizeLinear's "
                f"output")
        else:
            _per_tensor(node, g, bad)
    return problems


def _scale_shape(node, g) -> tuple[int, ...] | None:
    value = g.value(node.input[1]) if g.is_const(node.input[1]) else None
    return None if value is None else tuple(value.shape)


def _per_tensor(node, g, bad) -> None:
    shape = _scale_shape(node, g)
    if shape is not None and shape not in ((), (1,)):
        bad(node, "qdq-activation-per-tensor", f"activation scale of shape {list(shape)}: "
            f"TensorRT quantizes activations per tensor (one scale)")


def _per_channel(node, g, users, bad) -> None:
    weight = g.value(node.input[0])
    shape = _scale_shape(node, g)
    if weight is None or shape is None:
        return
    for user, index in users:
        axis = out_channel_axis(user, index, weight.ndim)
        if user.op_type not in WEIGHT_OPS or axis is None:
            continue
        got = _attr(node, "axis", 1) % max(weight.ndim, 1)
        if shape != (weight.shape[axis],) or got != axis:
            bad(node, "qdq-weight-per-channel", f"weights {node.input[0]!r} of {user.op_type} "
                f"have scales of shape {list(shape)} on axis {got}; expected one per output "
                f"channel ({weight.shape[axis]}) on axis {axis}")
