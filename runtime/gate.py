"""The high-QF gate: where the model stops helping, the output moves toward the JPEG's decode.

Not part of the SODiff paper. At high quality a JPEG is already close to its original, and a
restoration through the VAE round trip loses more than it gains (docs/runtime.md has the
numbers). The gate blends, per image, `out = jpeg + w (restored - jpeg)` before the quantization
constraint, with `w` a piecewise-linear function of the JPEG's quality factor: 1 keeps the
restoration, 0 gives back the JPEG's own decode. The curve is measured at export on clean
images (export/gate.py: per QF the `w` of highest mean gain whose worst image loses nothing)
and stored in the manifest. The QF comes from the file's tables where they are known, else from
the predictor. numpy only.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .jpegqcs import JpegTables, constrain

GATE_FORM = "blend"  # out = jpeg + w (restored - jpeg), w(qf) piecewise linear


@dataclass(frozen=True)
class Gate:
    """A measured gate curve: `weight[i]` at quality `qf[i]`, linear between, flat beyond."""

    qf: tuple[float, ...]      # ascending JPEG quality factors
    weight: tuple[float, ...]  # blend weight of the restoration at each, in [0, 1]
    source: dict | None = None  # how it was measured (images, their sha256, the grid)

    def __post_init__(self):
        check_gate(self.qf, self.weight)

    def weight_at(self, qf: float) -> float:
        """The blend weight at quality `qf`."""
        return float(np.interp(qf, self.qf, self.weight))

    def to_dict(self) -> dict:
        return {"form": GATE_FORM, "qf": list(self.qf), "weight": list(self.weight),
                "source": self.source}

    @classmethod
    def from_dict(cls, d: dict) -> "Gate":
        """The manifest's `gate` entry; ValueError naming what is wrong."""
        if not isinstance(d, dict) or d.get("form") != GATE_FORM:
            raise ValueError(f"gate {d!r}: expected a dict with form {GATE_FORM!r}")
        try:
            qf = tuple(float(q) for q in d["qf"])
            weight = tuple(float(w) for w in d["weight"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"gate {d!r}: qf and weight must be lists of numbers") from None
        return cls(qf, weight, d.get("source"))


def check_gate(qf, weight) -> None:
    """ValueError unless `qf` ascends within 1..100 and each weight lies in [0, 1]."""
    if not qf or len(qf) != len(weight):
        raise ValueError(f"gate: {len(qf)} qualities and {len(weight)} weights (expected the "
                         f"same number, at least one)")
    if any(not 1 <= q <= 100 for q in qf) or any(b <= a for a, b in zip(qf, qf[1:])):
        raise ValueError(f"gate qualities {list(qf)}: expected ascending values in 1..100")
    if any(not 0 <= w <= 1 for w in weight):
        raise ValueError(f"gate weights {list(weight)}: expected values in [0, 1]")


def blend(out: np.ndarray, jpeg: np.ndarray, w: float) -> None:
    """`out = jpeg + w (out - jpeg)` in place, rounded and clipped to `out`'s integer range."""
    if w >= 1:
        return
    top = np.iinfo(out.dtype).max
    rows = max(1, (1 << 22) // max(1, out[0].size))  # a band at a time: no full float copy
    for y in range(0, out.shape[0], rows):
        j = jpeg[y:y + rows].astype(np.float32)
        b = j + np.float32(w) * (out[y:y + rows].astype(np.float32) - j)
        out[y:y + rows] = np.clip(np.rint(b), 0, top)


def settle(out: np.ndarray, lq: np.ndarray, jpeg: JpegTables | None, weight: float) -> None:
    """The restoration's last step, in place: the gate's blend toward the decoded JPEG `lq`,
    then the quantization constraint where `jpeg` is given. At weight 0 the output is `lq`
    itself, bit for bit (the constraint's colour round trip could move it by a level)."""
    if weight <= 0:
        out[...] = lq
        return
    blend(out, lq, weight)
    if jpeg is not None:
        constrain(out, lq, jpeg)
