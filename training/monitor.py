"""Stage 2's watch on the timestep predictor, so that it cannot collapse silently (issue 13).

The bundled model of the first release ended with a softmax one-hot at one timestep for every
input: nothing logged it. `TimestepMonitor` logs, per step, the softmax's mean max probability
and the QF head's MAE, and over a sliding window of recent samples the Spearman correlation of
`tau` with the true QF; it warns when the softmax saturates (max p > 0.99 on every sample of a
batch).
"""
from __future__ import annotations

from collections import deque

import numpy as np
import torch

SATURATED_P = 0.99   # a softmax whose max probability exceeds this is (nearly) one-hot
WINDOW = 128         # samples in the Spearman window (a batch alone is too small to rank)
WARN_EVERY = 100     # at most one saturation warning per this many steps


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 with ties sharing their mean rank."""
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x), dtype=np.float64)
    r[order] = np.arange(len(x), dtype=np.float64)
    for value in np.unique(x):
        tied = x == value
        if tied.sum() > 1:
            r[tied] = r[tied].mean()
    return r


def spearman(x, y) -> float:
    """Spearman's rank correlation; NaN when either side is constant or n < 3."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    rx, ry = ranks(x), ranks(y)
    return float(np.corrcoef(rx, ry)[0, 1])


def saturated(logits: torch.Tensor) -> bool:
    """True when the softmax is one-hot-like on every sample of the batch."""
    return bool((torch.softmax(logits.detach().float(), -1).amax(-1) > SATURATED_P).all())


class TimestepMonitor:
    """Scalars about the predictor for each step's log; `warn` prints saturation warnings."""

    def __init__(self, warn):
        self.warn = warn
        self.taus: deque[float] = deque(maxlen=WINDOW)
        self.qfs: deque[float] = deque(maxlen=WINDOW)
        self.last_warning: int | None = None

    def update(self, step: int, logits: torch.Tensor | None, tau: torch.Tensor,
               qf_pred: torch.Tensor | None, qf_gt: torch.Tensor) -> dict[str, float]:
        out = {"tau": float(tau.detach().float().mean())}
        if logits is None:  # a fixed timestep: no predictor runs
            return out
        probs = torch.softmax(logits.detach().float(), -1)
        out["p_max"] = float(probs.amax(-1).mean())
        # The deterministic tau (no Gumbel noise): what inference would use.
        clean_tau = (probs * torch.arange(probs.shape[-1], dtype=probs.dtype,
                                          device=probs.device)).sum(-1)
        self.taus.extend(clean_tau.cpu().tolist())
        self.qfs.extend(qf_gt.detach().float().cpu().tolist())
        rho = spearman(self.taus, self.qfs)
        if np.isfinite(rho):
            out["tau_qf_spearman"] = rho
        if qf_pred is not None:
            out["qf_mae"] = float((qf_pred.detach().float().cpu()
                                   - qf_gt.detach().float().cpu()).abs().mean())
        if saturated(logits) and (self.last_warning is None
                                  or step - self.last_warning >= WARN_EVERY):
            self.last_warning = step
            self.warn(f"WARNING step {step}: the timestep softmax is saturated (max p "
                      f"> {SATURATED_P} on the whole batch, mean {out['p_max']:.4f}); tau no "
                      f"longer depends on the input (lower --lr or --timestep-lr-scale)")
        return out
