"""Parity (onnxruntime against the PyTorch wrappers) and FP16 safety (largest activation)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .errors import ParityMismatch, RuntimeFailure
from .specs import ComponentSpec

FP16_MAX = float(np.finfo(np.float16).max)  # 65504
# An activation above this fraction of float16's max is "at risk": the samples are few, and
# an fp16 engine also adds and accumulates in float16, so a margin of 2x is kept.
FP16_RISK_FRACTION = 0.5


# Ops whose outputs only rearrange or copy their inputs' values: no new magnitude to check.
_SAME_VALUES = frozenset({
    "view", "reshape", "permute", "transpose", "flatten", "unflatten", "squeeze", "unsqueeze",
    "contiguous", "__getitem__", "chunk", "split", "expand", "narrow", "select", "detach",
    "clone", "cat", "stack", "pad", "roll", "pixel_shuffle", "pixel_unshuffle", "__get__",
    "size", "dim", "type", "to", "float", "half"})


class ActivationTracker(TorchFunctionMode):
    """Largest finite |value| of every floating-point tensor any torch op returns while active
    (module outputs and the functional ops inside them: attention scores, norms, Eq. 6)."""

    def __init__(self):
        super().__init__()
        self.max_abs = 0.0
        self.nonfinite = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "__name__", "") in _SAME_VALUES:
            return out
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
                m = float(t.detach().abs().max())
                if not math.isfinite(m):  # rare: redo, ignoring inf/nan, and flag it
                    self.nonfinite = True
                    a = t.detach().abs()
                    m = float(torch.where(torch.isfinite(a), a, torch.zeros((), dtype=a.dtype))
                              .max())
                self.max_abs = max(self.max_abs, m)
        return out


def fp16_safety(component: str, max_abs: float, nonfinite: bool = False) -> dict:
    """The manifest's `fp16` entry; `advice` names the fix when the component is at risk."""
    threshold = FP16_MAX * FP16_RISK_FRACTION
    at_risk = max_abs > threshold or nonfinite
    advice = None
    if at_risk:
        why = "non-finite activations appear" if nonfinite else (
            f"largest activation {max_abs:.4g} exceeds {threshold:.4g} (half of float16's "
            f"max {FP16_MAX:.0f})")
        advice = f"{component}: {why}; run it in fp32 (--precision {component}=fp32)"
    return {"max_abs_activation": max_abs, "fp16_max": FP16_MAX, "threshold": threshold,
            "at_risk": at_risk, "advice": advice}


@dataclass
class ComponentSamples:
    """A component's sample inputs and its float32 PyTorch wrapper's outputs."""

    batches: list[tuple[str, dict[str, np.ndarray], dict[str, np.ndarray]]] = field(
        default_factory=list)  # (source, inputs, reference outputs)
    max_abs: float = 0.0
    nonfinite: bool = False

    @property
    def count(self) -> int:
        return sum(next(iter(ins.values())).shape[0] for _, ins, _ in self.batches)

    def sources(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for src, ins, _ in self.batches:
            out[src] = out.get(src, 0) + next(iter(ins.values())).shape[0]
        return out


def ort_session(path: Path):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _feeds(spec: ComponentSpec, precision: str, inputs: dict[str, np.ndarray]
           ) -> dict[str, np.ndarray]:
    return {t.name: inputs[t.name].astype(t.dtype(precision)) for t in spec.inputs}


def check_parity(path: Path, spec: ComponentSpec, precision: str, samples: ComponentSamples
                 ) -> tuple[dict, list[ParityMismatch | RuntimeFailure]]:
    """Run the graph in onnxruntime on every sample batch; compare each output with the
    PyTorch reference over all batches. Returns (the manifest's `parity` entry, failures)."""
    tol = spec.tolerance(precision)
    try:
        sess = ort_session(path)
    except Exception as e:  # noqa: BLE001 - any load failure is reported, typed
        return {"passed": False, "error": str(e)}, [RuntimeFailure(spec.name, str(e))]
    diff = {n: 0.0 for n in spec.output_names}   # max |onnx - torch| per output
    scale = {n: 0.0 for n in spec.output_names}  # max |torch| per output
    worst_source = {n: "" for n in spec.output_names}
    failures: list[ParityMismatch | RuntimeFailure] = []
    for source, inputs, refs in samples.batches:
        try:
            outs = sess.run(spec.output_names, _feeds(spec, precision, inputs))
        except Exception as e:  # noqa: BLE001
            failures.append(RuntimeFailure(spec.name, f"{source} inputs: {e}"))
            continue
        for name, out in zip(spec.output_names, outs):
            ref = refs[name].astype(np.float64)
            d = float(np.abs(out.astype(np.float64) - ref).max()) if ref.size else 0.0
            d = d if np.isfinite(d) else float("inf")  # NaN compares as a failure
            if d >= diff[name]:
                diff[name], worst_source[name] = d, source
            scale[name] = max(scale[name], float(np.abs(ref).max()) if ref.size else 0.0)
    del sess
    limit = {n: tol.limit(scale[n]) for n in spec.output_names}
    failures += [ParityMismatch(spec.name, n, worst_source[n], diff[n], limit[n])
                 for n in spec.output_names if not diff[n] <= limit[n]]
    worst = max(spec.output_names, key=lambda n: diff[n] / limit[n])
    entry = {"max_abs": diff[worst], "tolerance": limit[worst], "passed": not failures,
             "samples": samples.count, "sources": samples.sources(), "outputs": diff,
             "checked_with": "onnxruntime-cpu",
             "tolerance_rule": {"atol": tol.atol, "rtol": tol.rtol}}
    return entry, failures
