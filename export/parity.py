"""Parity (onnxruntime against the PyTorch wrappers) and FP16 safety (largest activation)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

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
SAME_VALUES = frozenset({
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
        if getattr(func, "__name__", "") not in SAME_VALUES:
            self.seen(self.record(out))
        return out

    def seen(self, value: float) -> None:
        """Called with each op's largest |value| (subclasses attribute it)."""

    def record(self, out) -> float:
        """The largest finite |value| in `out`'s float tensors; flags non-finite ones."""
        found = 0.0
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
                m = float(t.detach().abs().max())
                if not math.isfinite(m):  # rare: redo, ignoring inf/nan, and flag it
                    self.nonfinite = True
                    a = t.detach().abs()
                    m = float(torch.where(torch.isfinite(a), a, torch.zeros((), dtype=a.dtype))
                              .max())
                found = max(found, m)
        self.max_abs = max(self.max_abs, found)
        return found


def fp16_safety(component: str, max_abs: float, nonfinite: bool = False,
                islands: list[dict] | None = None, whole: bool | None = None) -> dict:
    """The manifest's `fp16` entry; `advice` names the fix when the component is at risk.

    `islands`: the float32 islands of an fp16 graph (dicts of Island); `whole`: whether the
    tracking found a risky value that no island short of the whole component could hold (None:
    decide from `max_abs` alone, for components exported in fp32)."""
    threshold = FP16_MAX * FP16_RISK_FRACTION
    at_risk = nonfinite or (max_abs > threshold if whole is None else whole)
    advice = None
    if at_risk:
        why = "non-finite activations appear" if nonfinite else (
            f"largest activation {max_abs:.4g} exceeds {threshold:.4g} (half of float16's "
            f"max {FP16_MAX:.0f})")
        advice = f"{component}: {why}; run it in fp32 (--precision {component}=fp32)"
    return {"max_abs_activation": max_abs, "fp16_max": FP16_MAX, "threshold": threshold,
            "at_risk": at_risk, "advice": advice, "islands": islands}


@dataclass
class ComponentSamples:
    """A component's sample inputs and its float32 PyTorch wrapper's outputs."""

    batches: list[tuple[str, dict[str, np.ndarray], dict[str, np.ndarray]]] = field(
        default_factory=list)  # (source, inputs, reference outputs)
    max_abs: float = 0.0
    nonfinite: bool = False
    op_max: dict[str, float] = field(default_factory=dict)   # per submodule: ops inside it
    out_max: dict[str, float] = field(default_factory=dict)  # per submodule: its outputs

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
    try:
        sess = ort_session(path)
    except Exception as e:  # noqa: BLE001 - any load failure is reported, typed
        return {"passed": False, "error": str(e), "checked_with": "onnxruntime-cpu"}, \
            [RuntimeFailure(spec.name, str(e))]
    run = lambda feeds: dict(zip(spec.output_names, sess.run(spec.output_names, feeds)))  # noqa
    return compare(run, spec, precision, samples, "onnxruntime-cpu")


def compare(run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], spec: ComponentSpec,
            precision: str, samples: ComponentSamples, checked_with: str
            ) -> tuple[dict, list[ParityMismatch | RuntimeFailure]]:
    """`run` (feeds in the spec's dtypes -> outputs by name) on every sample batch against the
    float32 PyTorch reference, with the precision's tolerance. `checked_with` names the
    runtime in the entry (`onnxruntime-cpu` on the graph, `tensorrt` on the engine)."""
    tol = spec.tolerance(precision)
    diff = {n: 0.0 for n in spec.output_names}   # max |got - torch| per output
    scale = {n: 0.0 for n in spec.output_names}  # max |torch| per output
    worst_source = {n: "" for n in spec.output_names}
    failures: list[ParityMismatch | RuntimeFailure] = []
    for source, inputs, refs in samples.batches:
        try:
            outs = run(_feeds(spec, precision, inputs))
        except Exception as e:  # noqa: BLE001
            failures.append(RuntimeFailure(spec.name, f"{source} inputs ({checked_with}): {e}"))
            continue
        for name in spec.output_names:
            ref, out = refs[name].astype(np.float64), np.asarray(outs[name], np.float64)
            d = float(np.abs(out - ref).max()) if ref.size else 0.0
            d = d if np.isfinite(d) else float("inf")  # NaN compares as a failure
            if d >= diff[name]:
                diff[name], worst_source[name] = d, source
            scale[name] = max(scale[name], float(np.abs(ref).max()) if ref.size else 0.0)
    limit = {n: tol.limit(scale[n]) for n in spec.output_names}
    failures += [ParityMismatch(spec.name, n, worst_source[n], diff[n], limit[n], checked_with)
                 for n in spec.output_names if not diff[n] <= limit[n]]
    worst = max(spec.output_names, key=lambda n: diff[n] / limit[n])
    entry = {"max_abs": diff[worst], "tolerance": limit[worst], "passed": not failures,
             "samples": samples.count, "sources": samples.sources(), "outputs": diff,
             "checked_with": checked_with,
             "tolerance_rule": {"atol": tol.atol, "rtol": tol.rtol}}
    return entry, failures
