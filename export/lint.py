"""TensorRT lint on CPU: what TensorRT's ONNX parser would reject, or silently change.

Rules (docs/architecture.md, "TensorRT's ONNX operator support"; encoded in `trt_ops`):
every op in the accepted list (with version/opset for later additions), no custom domains,
initializer-only inputs where TensorRT requires them, Resize in nearest/linear mode, no random
ops, and no int64 arithmetic that can leave int32 (TensorRT casts INT64 to INT32); Q/DQ in the
form TensorRT's explicit quantization takes (lint_qdq.py).

The int64 rule propagates value ranges: constants are exact, Clip/Min/Max/Floor narrow, and
arithmetic follows interval rules. Values derived from tensor shapes (Shape, Size, indices) are
exempt: they are bounded by tensor volumes, which TensorRT itself keeps within int32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import trt_ops
from .errors import LintProblem
from .lint_qdq import qdq_problems

INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1
ARITHMETIC = frozenset({"Add", "Sub", "Mul", "Div", "Mod", "Neg", "Abs", "Pow", "Sum", "CumSum",
                        "ReduceSum", "ReduceProd", "MatMul", "Gemm", "Einsum"})
PASS_THROUGH = frozenset({"Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Transpose",
                          "Expand", "Tile", "Slice", "Gather", "GatherElements", "GatherND",
                          "Split", "Floor", "Ceil", "Round", "ReduceMax", "ReduceMin", "Cast",
                          "Dropout"})
INDEX_OPS = frozenset({"Shape", "Size", "ArgMax", "ArgMin", "NonZero"})


@dataclass(frozen=True)
class Range:
    lo: float
    hi: float
    shape: bool = False  # derived from tensor shapes only (exempt from the int64 rule)

    def fits_int32(self) -> bool:
        return INT32_MIN <= self.lo and self.hi <= INT32_MAX

    def __str__(self) -> str:
        return "unbounded" if math.isinf(self.lo) or math.isinf(self.hi) else \
            f"[{self.lo:.0f}, {self.hi:.0f}]"


UNBOUNDED = Range(-math.inf, math.inf)
INDEX = Range(0, INT32_MAX, shape=True)


def _mul(a: float, b: float) -> float:
    return 0.0 if a == 0 or b == 0 else a * b  # 0 * inf is 0 for bounds


def _interval(op: str, rs: list[Range]) -> Range:
    """Output range of an elementwise op on input ranges (unknown ops: unbounded)."""
    a = rs[0]
    b = rs[1] if len(rs) > 1 else a
    if op == "Add" or op == "Sum":
        return Range(sum(r.lo for r in rs), sum(r.hi for r in rs))
    if op == "Sub":
        return Range(a.lo - b.hi, a.hi - b.lo)
    if op == "Mul":
        c = [_mul(x, y) for x in (a.lo, a.hi) for y in (b.lo, b.hi)]
        return Range(min(c), max(c))
    if op == "Neg":
        return Range(-a.hi, -a.lo)
    if op == "Abs":
        return Range(0, max(abs(a.lo), abs(a.hi)))
    if op == "Div":  # integer division never grows a value when |divisor| >= 1
        m = max(abs(a.lo), abs(a.hi))
        return Range(-m, m) if b.lo >= 1 or b.hi <= -1 else UNBOUNDED
    if op == "Mod":
        m = max(abs(b.lo), abs(b.hi))
        return Range(-m, m)
    if op == "Min":
        return Range(min(r.lo for r in rs), min(r.hi for r in rs))
    if op == "Max":
        return Range(max(r.lo for r in rs), max(r.hi for r in rs))
    return UNBOUNDED


class _Graph:
    """Names, types and constant values of one (top-level) graph."""

    def __init__(self, graph: onnx.GraphProto, types: dict[str, int], base_dir: Path | None):
        self.types = types
        self.base_dir = base_dir
        self.inits = {t.name: t for t in graph.initializer}
        self.const_nodes = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
        # Dequantized constants are weights to TensorRT (explicit quantization's form).
        self.dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"
                            and n.input and self.is_const(n.input[0])}
        self._values: dict[str, np.ndarray | None] = {}

    def is_const(self, name: str) -> bool:
        return name in self.inits or name in self.const_nodes

    def is_weight(self, name: str) -> bool:
        return self.is_const(name) or name in self.dequantized

    def value(self, name: str) -> np.ndarray | None:
        if name not in self._values:
            self._values[name] = self._load(name)
        return self._values[name]

    def _load(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            t = self.inits[name]
            if t.data_location == TensorProto.EXTERNAL and self.base_dir is None:
                return None
            return numpy_helper.to_array(t, base_dir=str(self.base_dir or ""))
        node = self.const_nodes.get(name)
        if node is None:
            return None
        attr = node.attribute[0]
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        return np.asarray(helper.get_attribute_value(attr))


def _const_range(g: _Graph, name: str) -> Range | None:
    v = g.value(name)
    if v is None or v.size == 0 or not np.issubdtype(v.dtype, np.number):
        return None
    return Range(float(v.min()), float(v.max()))


def _node_range(node: onnx.NodeProto, g: _Graph, ranges: dict[str, Range]) -> Range:
    get = lambda n: (ranges.get(n) or _const_range(g, n) or UNBOUNDED) if n else None  # noqa
    ins = [get(n) for n in node.input]
    op = node.op_type
    data = [r for n, r in zip(node.input, ins) if r is not None and not g.is_const(n)]
    shape = bool(data) and all(r.shape for r in data)
    if op in INDEX_OPS:
        return INDEX
    if op == "Concat" or op == "Where":
        pick = [r for r in (ins[1:] if op == "Where" else ins) if r is not None]
        return Range(min(r.lo for r in pick), max(r.hi for r in pick), shape)
    if op in PASS_THROUGH:
        return Range(ins[0].lo, ins[0].hi, ins[0].shape or shape)
    if op == "Clip":
        lo = ins[1].lo if len(ins) > 1 and ins[1] is not None else -math.inf
        hi = ins[2].hi if len(ins) > 2 and ins[2] is not None else math.inf
        return Range(max(ins[0].lo, lo), min(ins[0].hi, hi), shape)
    if op == "Relu":
        return Range(max(ins[0].lo, 0), max(ins[0].hi, 0), shape)
    if op in ("Sigmoid", "Softmax"):
        return Range(0, 1)
    if op == "Tanh":
        return Range(-1, 1)
    if op == "Range":
        return Range(min(ins[0].lo, ins[1].lo), max(ins[0].hi, ins[1].hi), shape)
    r = _interval(op, [x for x in ins if x is not None]) if ins else UNBOUNDED
    return Range(r.lo, r.hi, shape)


def _op_problems(node: onnx.NodeProto, g: _Graph | None, opset: int,
                 trt_version: tuple[int, int]) -> list[tuple[str, str]]:
    """(rule, message) pairs for op support, initializer-only inputs and attributes."""
    op, out = node.op_type, []
    if node.domain not in ("", "ai.onnx"):
        return [("custom-domain", f"op from domain {node.domain!r}: TensorRT's parser only "
                 f"knows the default ONNX domain (custom ops need a plugin)")]
    if op in trt_ops.ADDED_LATER:
        need_trt, need_opset, _ = trt_ops.ADDED_LATER[op]
        if trt_version < need_trt or opset < need_opset:
            out.append(("unsupported-op", f"{op} needs TensorRT >= "
                        f"{'.'.join(map(str, need_trt))} and opset >= {need_opset}"))
    elif op in trt_ops.REJECTED:
        out.append(("unsupported-op", f"{op} is not supported by TensorRT"))
    elif op not in trt_ops.ACCEPTED:
        out.append(("unsupported-op", f"{op} is not in TensorRT's accepted op list"))
    if op in trt_ops.RANDOM_OPS:
        out.append(("random-op", f"{op} samples at run time and TensorRT ignores its seed: "
                    f"export the distribution's mean (deterministic) instead"))
    for idx, what in trt_ops.NEEDS_INITIALIZER.get(op, ()):
        name = node.input[idx] if len(node.input) > idx else ""
        if name and g is not None and not g.is_weight(name):
            out.append(("needs-initializer", f"input {idx} ({what}) {name!r} must be an "
                        f"initializer (constant) for TensorRT"))
    if op == "Resize":
        mode = next((helper.get_attribute_value(a) for a in node.attribute
                     if a.name == "mode"), b"nearest")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode not in trt_ops.RESIZE_MODES:
            out.append(("resize-mode", f"Resize mode {mode!r}: TensorRT supports only "
                        f"{sorted(trt_ops.RESIZE_MODES)}"))
    return out


def _subgraph_nodes(node: onnx.NodeProto):
    for a in node.attribute:
        for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            for n in sub.node:
                yield n
                yield from _subgraph_nodes(n)


def _types(model: onnx.ModelProto) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - inference is best effort; types then come from the proto
        inferred = model
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.value_info, *g.input, *g.output)}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def lint_model(model: onnx.ModelProto, component: str, base_dir: Path | None = None,
               trt_version: tuple[int, int] = trt_ops.DEFAULT_TRT_VERSION
               ) -> tuple[list[LintProblem], list[str]]:
    """(problems, warnings) of `model` for TensorRT `trt_version`. `base_dir` is where the
    external data lives (int64 constants are read from it; nothing else is loaded)."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    types = _types(model)
    g = _Graph(model.graph, types, base_dir)
    problems, ranges = [], {}
    for node in model.graph.node:
        name = node.name or (node.output[0] if node.output else node.op_type)
        for n, sub in [(node, g)] + [(s, None) for s in _subgraph_nodes(node)]:
            for rule, msg in _op_problems(n, sub, opset, trt_version):
                problems.append(LintProblem(component, n.name or name, n.op_type, rule, msg))
        if not node.output:
            continue
        r = _node_range(node, g, ranges)
        for out in node.output:
            ranges[out] = r
        if node.op_type in ARITHMETIC and types.get(node.output[0]) == TensorProto.INT64:
            problems += _int64_problems(node, name, g, r, component)
    problems += qdq_problems(model, g, types, component)
    warnings = [f"{component}: {t.name} is DOUBLE; TensorRT casts it to FLOAT (clamped)"
                for t in model.graph.initializer if t.data_type == TensorProto.DOUBLE]
    warnings += [f"{component}: tensor {n} is DOUBLE; TensorRT casts it to FLOAT (clamped)"
                 for n, t in types.items() if t == TensorProto.DOUBLE and n not in g.inits]
    return problems, warnings


def _int64_problems(node: onnx.NodeProto, name: str, g: _Graph, r: Range,
                    component: str) -> list[LintProblem]:
    for inp in node.input:
        c = _const_range(g, inp) if g.is_const(inp) else None
        if c is not None and not c.fits_int32():
            return [LintProblem(component, name, node.op_type, "int64-overflow",
                                f"int64 constant {inp!r} in {c} does not fit int32; TensorRT "
                                f"casts INT64 to INT32 and would change the result")]
    if not r.shape and not r.fits_int32():
        return [LintProblem(component, name, node.op_type, "int64-overflow",
                            f"int64 arithmetic on values {r} that can exceed int32 (TensorRT "
                            f"computes INT64 as INT32); clamp the operands or compute in float")]
    return []


def lint_file(path: Path, component: str,
              trt_version: tuple[int, int] = trt_ops.DEFAULT_TRT_VERSION
              ) -> tuple[list[LintProblem], list[str]]:
    """Lint an ONNX file without loading its (possibly many-GB) external data."""
    model = onnx.load(str(path), load_external_data=False)
    return lint_model(model, component, Path(path).parent, trt_version)
