"""Float32 islands in float16 graphs.

An fp16 component is a genuinely half graph (TensorRT parses it strongly typed, so the graph's
dtypes are the engine's precisions). Where float16 is not enough, a submodule stays float32
with casts at its boundary: the ones a wrapper declares (Eq. 6's table, the timestep
embedding, the predictor's expectation over T_max candidates), and any the FP16-safety tracking
finds, on the float32 reference run, to produce values float16 cannot hold. A flagged op is
kept float32 together with its smallest enclosing module whose *output* fits float16 again:
a float32 module whose output overflows when cast back would not help.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._pytree import tree_map

from .parity import FP16_MAX, FP16_RISK_FRACTION, ActivationTracker

RISK = FP16_MAX * FP16_RISK_FRACTION


@dataclass(frozen=True)
class Island:
    module: str              # dotted path inside the wrapper ("" is the whole wrapper)
    why: str                 # one line for the report and the manifest
    out: str = "float16"     # dtype its outputs are cast back to ("float32": left as is)

    def to_dict(self) -> dict:
        return {"module": self.module, "why": self.why, "outputs": self.out}


class ModuleActivations(ActivationTracker):
    """An ActivationTracker that also keeps, per submodule of `root`, the largest |value| any
    op inside it produced (attributed to the innermost module running) and the largest |value|
    of its own outputs. Use `with ModuleActivations(root) as acts: root(...)`."""

    def __init__(self, root: nn.Module):
        super().__init__()
        self.root = root
        self.op_max: dict[str, float] = {}
        self.out_max: dict[str, float] = {}
        self._stack: list[str] = [""]
        self._hooks: list = []

    def __enter__(self):
        for path, mod in self.root.named_modules():
            self._hooks.append(mod.register_forward_pre_hook(self._pre(path)))
            self._hooks.append(mod.register_forward_hook(self._post(path)))
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks = []
        return super().__exit__(*exc)

    def _pre(self, path: str):
        def hook(module, args):
            self._stack.append(path)
        return hook

    def _post(self, path: str):
        def hook(module, args, out):
            self._stack.pop()
            self.out_max[path] = max(self.out_max.get(path, 0.0), self.record(out))
        return hook

    def seen(self, value: float) -> None:
        top = self._stack[-1]
        self.op_max[top] = max(self.op_max.get(top, 0.0), value)


def _parents(path: str) -> list[str]:
    """`a.b.c` -> [`a.b.c`, `a.b`, `a`, ``]."""
    parts = path.split(".") if path else []
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)] + [""]


def flagged_islands(op_max: dict[str, float], out_max: dict[str, float],
                    threshold: float = RISK) -> tuple[list[Island], bool]:
    """Islands for every module where a value above `threshold` appeared: the innermost
    enclosing module whose output is below it. Returns (islands, whole) where `whole` says
    that no module short of the whole component fits, so the component needs fp32."""
    found: dict[str, float] = {}
    whole = False
    risky = {p: m for p, m in op_max.items() if m > threshold}
    risky.update({p: m for p, m in out_max.items() if m > threshold and p not in risky})
    for path, value in risky.items():
        home = next((q for q in _parents(path) if out_max.get(q, math.inf) <= threshold), "")
        if home == "":
            whole = True
        else:
            found[home] = max(found.get(home, 0.0), value)
    return [Island(p, f"values up to {v:.4g} inside it exceed {threshold:.4g} (fp16 risk)")
            for p, v in sorted(found.items())], whole


def outermost(islands: list[Island]) -> list[Island]:
    """Drop islands nested inside another (the outer one already keeps them float32)."""
    paths = {i.module for i in islands}
    keep = [i for i in islands
            if not any(q in paths for q in _parents(i.module)[1:] if q)]
    return list({i.module: i for i in keep}.values())


class Float32Island(nn.Module):
    """Runs a float32 module inside a float16 graph: floating inputs cast to float32, floating
    outputs cast to `out_dtype` (None: left float32)."""

    def __init__(self, inner: nn.Module, out_dtype: torch.dtype | None):
        super().__init__()
        self.inner, self.out_dtype = inner.float(), out_dtype

    def forward(self, *args, **kwargs):
        up = lambda t: t.float() if torch.is_tensor(t) and t.is_floating_point() else t  # noqa
        out = self.inner(*tree_map(up, args), **tree_map(up, kwargs))
        if self.out_dtype is None:
            return out
        down = lambda t: (t.to(self.out_dtype)  # noqa: E731
                          if torch.is_tensor(t) and t.is_floating_point() else t)
        return tree_map(down, out)


def _float32_time_embed(unet: nn.Module):
    """diffusers' `get_time_embed` without its cast to the UNet's dtype: the sinusoids of
    timesteps up to 999 need float32 arguments and values (float16 steps 0.5 rad there)."""
    def get_time_embed(sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return unet.time_proj(timestep.reshape(-1).expand(sample.shape[0]).float())
    return get_time_embed


def install(half: nn.Module, original: nn.Module, islands: list[Island]) -> None:
    """Replace each island's submodule of the float16 copy `half` by a Float32Island around a
    copy of the float32 `original`'s submodule at the same path. An island at "" stands for
    float32 arithmetic the wrapper itself does (Eq. 6): nothing to install."""
    for island in outermost(islands):
        if not island.module:
            continue
        parent_path, _, name = island.module.rpartition(".")
        parent = half.get_submodule(parent_path) if parent_path else half
        inner = copy.deepcopy(original.get_submodule(island.module))
        out = None if island.out == "float32" else torch.float16
        setattr(parent, name, Float32Island(inner, out))
        if name == "time_embedding" and hasattr(parent, "time_proj"):
            parent.get_time_embed = _float32_time_embed(parent)
