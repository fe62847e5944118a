"""8-bit components: explicit Q/DQ graphs made by onnxruntime.quantization for TensorRT's
strongly typed builds (docs/export.md, "INT8 and FP8").

A quantized component is its float16 graph (float32 islands included) with QuantizeLinear /
DequantizeLinear pairs in front of every Conv, Gemm and weighted MatMul, except on the float32
islands and in the layers Model Optimizer's diffusers recipe keeps in float16: symmetric
(zero point 0), weights per output channel, activations per tensor, float16 scales (opset 19),
biases and outputs left in float16. The activation ranges are measured by onnxruntime's own
calibrators on the component's float32 graph -- traced from the same module, so its nodes are
the float16 graph's one for one -- fed the component's real inputs: JPEG crops (QF 5-60) run
through the float32 PyTorch pipeline (latents at the predicted tau). Calibrating in float32
keeps the ranges free of float16 rounding, and onnxruntime's histogram calibrators cannot bin
float16 tensors. The ranges are then handed to `quantize_static` through its calibration cache.
"""
from __future__ import annotations

import inspect
import logging
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from .errors import ComponentExportError, PrerequisiteError

QUANT_OPS = ("Conv", "MatMul", "Gemm")
# Layers left in float16, as Model Optimizer's diffusers example filters them: the time
# embedding and its per-block projections, the first and last convolutions, the shortcuts
# (and attention's activation-by-activation MatMuls, `_attention`).
KEEP_HALF = re.compile(r".*(time_emb_proj|time_embedding|conv_in|conv_out|conv_shortcut|"
                       r"add_embedding).*")
QUANT_OPSET = 19            # QuantizeLinear/DequantizeLinear with float16 scales and float8


@dataclass(frozen=True)
class Recipe:
    """How one precision is quantized; recorded in the manifest."""

    precision: str            # int8 | fp8
    quant_type: str           # onnxruntime QuantType of weights and activations
    calibrator: str           # onnxruntime CalibrationMethod of the activation ranges
    percentile: float | None  # Percentile calibrator only
    symmetric: bool = True    # zero point 0 everywhere (TensorRT's only Q/DQ form)
    weights: str = "per-channel (output channel), symmetric"
    activations: str = "per-tensor, symmetric"
    ops: tuple[str, ...] = QUANT_OPS
    opset: int = QUANT_OPSET
    library: str = "onnxruntime.quantization.quantize_static (QDQ)"


# Both: max calibration (onnxruntime's MinMax calibrator; scale = amax / 127 for int8, amax /
# 448, E4M3's largest value, for fp8 as in Model Optimizer's FP8 recipe). onnxruntime's own
# float8 scaling (a Gaussian fit of the spread) lost 0.11 dB on the bundled model, over the
# fp8 bound; docs/export.md has the figures.
RECIPES = {"int8": Recipe("int8", "QInt8", "MinMax", None),
           "fp8": Recipe("fp8", "QFLOAT8E4M3FN", "MinMax", None)}
FP8_MAX = 448.0                           # E4M3's largest finite value
MIN_SCALE = float(np.finfo(np.float16).tiny)  # scales are float16: none below its normals


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over recorded feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self.feeds, self.i = feeds, 0

    def get_next(self):
        if self.i >= len(self.feeds):
            return None
        self.i += 1
        return self.feeds[self.i - 1]


def _node_key(name: str) -> str:
    # The float16 graph is traced through CastIO wrappers (module `inner`), around the whole
    # component and around each float32 island: its node names carry extra `inner` scopes.
    # Both graphs' names are compared without any (tensor_map checks the keys stay unique).
    while "/inner/" in name:
        name = name.replace("/inner/", "/")
    return name


def tensor_map(half: onnx.ModelProto, full: onnx.ModelProto) -> dict[str, str]:
    """Float16-graph tensor -> float32-graph tensor, for the inputs of every quantizable node
    (the nodes pair up by name; a pairing that fails means the two traces differ)."""
    nodes = [n for n in full.graph.node if n.op_type in QUANT_OPS]
    by_key = {_node_key(n.name): n for n in nodes}
    if len(by_key) != len(nodes):
        raise ComponentExportError("quantize", "calibration", "the float32 graph's node "
                                   "names are not unique once `inner` scopes are dropped")
    found = {}
    for node in half.graph.node:
        if node.op_type not in QUANT_OPS:
            continue
        twin = by_key.get(_node_key(node.name))
        if twin is None or twin.op_type != node.op_type or len(twin.input) != len(node.input):
            raise ComponentExportError("quantize", "calibration", f"node {node.name} of the "
                                       f"float16 graph has no twin in the float32 graph")
        found.update(zip(node.input, twin.input))
    return found


def _attention(node: onnx.NodeProto, weights: set[str]) -> bool:
    """A MatMul of two activations (attention's QK^T and its product with V): left in float16
    as Model Optimizer leaves attention unless asked (its `quantize_mha`); Linear layers are
    MatMuls with a weight."""
    return node.op_type == "MatMul" and not any(i in weights for i in node.input)


def _types(model: onnx.ModelProto) -> dict[str, int]:
    g = onnx.shape_inference.infer_shapes(model).graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.value_info, *g.output)}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def island_nodes(half: onnx.ModelProto, types: dict[str, int]) -> list[str]:
    """Quantizable nodes computing in float32 (the islands): they get no Q/DQ."""
    return [n.name for n in half.graph.node
            if n.op_type in QUANT_OPS and types.get(n.input[0]) == TensorProto.FLOAT]


def _as_dtype(data, dtype):
    """A calibrated TensorData with its float fields in the tensor's own dtype: the scales
    onnxruntime derives take that dtype, and a float16 tensor needs float16 scales."""
    from onnxruntime.quantization.calibrate import TensorData
    return TensorData(**{k: np.asarray(getattr(data, k)).astype(dtype)
                         if k in TensorData._floats else getattr(data, k)
                         for k in data._attrs})


def _fp8_ranges(ranges, types: dict[str, int]):
    """Max-calibrated ranges as the Distribution data onnxruntime's float8 quantizer reads:
    its scale is std / std(E4M3 values), so std is set to give scale = amax / 448."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData
    from onnxruntime.quantization.quant_utils import compute_scale_zp_float8
    unit = float(compute_scale_zp_float8(TensorProto.FLOAT8E4M3FN, np.array(1.0))[1])
    data = {}
    for name, r in ranges.data.items():
        lo, hi = (float(np.asarray(v).max()) for v in r.range_value)
        scale = max(abs(lo), abs(hi)) / FP8_MAX
        dtype = np.float16 if types.get(name) == TensorProto.FLOAT16 else np.float32
        data[name] = TensorData(avg=np.array(0.0, dtype),
                                std=np.array(max(scale, MIN_SCALE) / unit, dtype))
    return TensorsData(CalibrationMethod.Distribution, data)


def _fp8_weight_scales(half: onnx.ModelProto, excluded: list[str]) -> dict[str, list[dict]]:
    """Per quantized weight, one scale per output channel: amax / 448 (onnxruntime's default
    for float8 weights is the Gaussian fit too), as TensorQuantOverrides."""
    from onnx import numpy_helper

    from .lint_qdq import out_channel_axis
    inits = {t.name: t for t in half.graph.initializer}
    found = {}
    for node in half.graph.node:
        if node.op_type not in QUANT_OPS or node.name in excluded or len(node.input) < 2 \
                or node.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        axis = out_channel_axis(node, 1, w.ndim)
        amax = np.abs(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)).max(1)
        found[node.input[1]] = [{"axis": axis, "scale": max(float(a) / FP8_MAX, MIN_SCALE),
                                 "zero_point": 0} for a in amax]
    return found


def _check_library() -> None:
    try:
        from onnxruntime.quantization import quantize_static
    except ImportError as e:
        raise PrerequisiteError(f"onnxruntime.quantization does not import ({e}); "
                                f"pip install 'sodiff[export]'") from None
    if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        import onnxruntime
        raise PrerequisiteError(f"int8/fp8 need onnxruntime >= 1.32 (its quantize_static "
                                f"takes calibration ranges); found {onnxruntime.__version__}: "
                                f"pip install 'onnxruntime>=1.32'")


def quantize(fp32_graph: Path, fp16_graph: Path, dst: Path, precision: str,
             feeds: list[dict[str, np.ndarray]]) -> dict:
    """Write `dst`: `fp16_graph` with Q/DQ pairs, its activation ranges calibrated on
    `fp32_graph` over `feeds` (float32 inputs by name). Returns the manifest's recipe."""
    _check_library()
    from onnxruntime.quantization import CalibrationMethod, QuantType
    from onnxruntime.quantization.calibrate import (TensorsData, create_calibrator,
                                                    save_tensors_data)
    recipe = RECIPES[precision]
    method = getattr(CalibrationMethod, recipe.calibrator)
    qtype = getattr(QuantType, recipe.quant_type)
    half = onnx.load(str(fp16_graph))  # with its weights: fp8 weight scales read them
    mapping = tensor_map(half, onnx.load(str(fp32_graph), load_external_data=False))
    types = _types(half)
    islands = island_nodes(half, types)
    weights = {t.name for t in half.graph.initializer}
    kept = [n.name for n in half.graph.node if n.op_type in QUANT_OPS
            and n.name not in islands and (KEEP_HALF.match(n.name) or _attention(n, weights))]
    excluded = islands + kept
    overrides = _fp8_weight_scales(half, excluded) if precision == "fp8" else {}
    # MinMax's augmented graph reduces each tensor to its min and max in the graph, so it
    # keeps two scalars per tensor and feed. (Its `max_intermediate_outputs` would drop what
    # was collected, not merge it, in onnxruntime 1.32.)
    options = {"symmetric": True}
    if recipe.percentile is not None:
        options["percentile"] = recipe.percentile
    with tempfile.TemporaryDirectory(prefix=".raw-calibration-", dir=dst.parent) as tmp:
        calibrator = create_calibrator(fp32_graph, list(QUANT_OPS),
                                       augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=method, extra_options=options)
        calibrator.collect_data(_Reader(feeds))
        ranges = calibrator.compute_data()
        del calibrator
        cache = Path(tmp) / "ranges.json"
        half_ranges = TensorsData(method, {
            h: _as_dtype(ranges[f], np.float16 if types.get(h) == TensorProto.FLOAT16
                         else np.float32)
            for h, f in sorted(mapping.items()) if f in ranges.data})
        if precision == "fp8":
            half_ranges, method = _fp8_ranges(half_ranges, types), CalibrationMethod.Distribution
        save_tensors_data(half_ranges, cache)
        quiet = logging.getLogger()  # onnxruntime advises pre-processing on the root logger:
        level, quiet.level = quiet.level, logging.ERROR  # our graphs are already cleaned up
        try:
            _static(fp16_graph, dst, qtype, excluded, method, cache, overrides)
        finally:
            quiet.setLevel(level)
    import onnxruntime
    return {**asdict(recipe), "ops": list(recipe.ops), "onnxruntime": onnxruntime.__version__,
            # How the CPU checks ran it: onnxruntime's own Q/DQ kernels, float8 ones included
            # (opset 19), not a simulation written here.
            "cpu_execution": "onnxruntime CPU QuantizeLinear/DequantizeLinear-19 kernels",
            "kept_half": KEEP_HALF.pattern, "excluded_islands": len(islands),
            "excluded_kept_half": len(kept),
            "quantized_nodes": sum(1 for n in half.graph.node if n.op_type in QUANT_OPS)
            - len(excluded)}


def _static(fp16_graph: Path, dst: Path, qtype, excluded: list[str], method, cache: Path,
            overrides: dict) -> None:
    from onnxruntime.quantization import QuantFormat, quantize_static
    quantize_static(
        str(fp16_graph), str(dst), None, quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(QUANT_OPS), per_channel=True, reduce_range=False,
        activation_type=qtype, weight_type=qtype, nodes_to_exclude=excluded,
        calibrate_method=method, calibration_cache_path=str(cache),
        use_external_data_format=Path(f"{fp16_graph}.data").exists(),
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                       "QuantizeBias": False, "TensorQuantOverrides": overrides,
                       "OpTypesToExcludeOutputQuantization": list(QUANT_OPS)})


@dataclass
class Judge:
    """What the quality check needs of this export's 8-bit components."""

    fp32: dict[str, dict]                   # per component: its float32 twin's entry fields
    held_out: list[tuple[str, np.ndarray]]  # images kept apart from calibration
    recipes: dict[str, dict]                # per component: the manifest's `quantization`


def twin(work: Path, name: str, precision: str) -> Path:
    """Where a component's float32 or float16 twin graph is written (removed at the end)."""
    work.mkdir(parents=True, exist_ok=True)
    return work / f"{name}.{precision}.onnx"


def fp32_entry(work: Path, name: str, spec) -> dict:
    """Entry fields that swap a quantized component for its float32 twin (quality.py)."""
    path = twin(work, name, "fp32")
    ext = Path(f"{path}.data")
    return {"path": str(path), "file": path.name,
            "external_data": {"file": ext.name} if ext.exists() else None,
            "precision": "fp32", **spec.io_manifest("fp32")}


def quantize_twins(work: Path, name: str, precision: str, dst: Path, feeds: list[dict],
                   cal, log) -> dict:
    """Quantize `name`'s float16 twin into `dst`, calibrated on its float32 twin; the
    manifest's `quantization` entry (without `quality`, added once it is measured)."""
    import time
    t0 = time.perf_counter()
    try:
        recipe = quantize(twin(work, name, "fp32"), twin(work, name, "fp16"), dst, precision,
                          feeds)
    except (ComponentExportError, PrerequisiteError):
        raise
    except Exception as e:  # noqa: BLE001 - the library's own errors, reported typed
        dst.unlink(missing_ok=True)
        raise ComponentExportError(name, f"{precision} quantization",
                                   f"{type(e).__name__}: {e}") from e
    log(f"[quantize] {name} ({precision}): {recipe['quantized_nodes']} Conv/MatMul/Gemm with "
        f"Q/DQ; left alone: {recipe['excluded_islands']} in float32 islands, "
        f"{recipe['excluded_kept_half']} kept in float16; activations "
        f"{recipe['calibrator']} ({time.perf_counter() - t0:.1f} s)")
    return {**recipe, "calibration": cal.to_dict()}


def graph_samples(path: Path, spec, precision: str, samples):
    """`samples` with the outputs of the graph at `path` (onnxruntime CPU) as references."""
    from .parity import ComponentSamples, _feeds, ort_session
    sess = ort_session(path)
    batches = []
    for source, inputs, _ in samples.batches:
        outs = sess.run(spec.output_names, _feeds(spec, precision, inputs))
        batches.append((source, inputs, {n: np.asarray(o, np.float32)
                                         for n, o in zip(spec.output_names, outs)}))
    return ComponentSamples(batches=batches, max_abs=samples.max_abs)
