"""SAIPE's input resize in numpy: torch's `F.interpolate(mode="bilinear", align_corners=False,
antialias=True)`, i.e. PIL's triangle filter stretched by the scale when shrinking and plain
bilinear (half-pixel centres, edge-clamped) when enlarging.

Separable and banded: each output sample reads only the taps its filter covers, and the image
is read a few rows at a time and never kept: the vertical pass takes each band of rows as it
comes, so neither a large image nor a tall, narrow one is ever held in float. Weights are
computed per output when needed, so a side of millions of pixels (whose dense tap table would
hold millions of taps per output) costs memory in proportion to its length only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .config import RESIZE_DENSE_TAPS, RESIZE_FLOATS


@dataclass(frozen=True)
class _Axis:
    """torch's antialiased bilinear filter along one axis, output by output.

    torch (aten/src/ATen/native/cpu/UpSampleKernel.cpp, `_compute_weights_aa`): scale =
    in/out; support = scale when shrinking, else 1; for output i the centre is
    scale * (i + 0.5), the taps are j in [trunc(centre - support + 0.5), trunc(centre + support
    + 0.5)) clipped to the input, weighted by max(0, 1 - |(j - centre + 0.5) / max(scale, 1)|)
    and normalised to sum to one.
    """

    lo: np.ndarray                # [out] first input index of each output's taps
    hi: np.ndarray                # [out] one past its last
    centre: np.ndarray            # [out] float64 filter centres
    invscale: float               # 1 / max(scale, 1)
    total: np.ndarray             # [out] float64 sum of each output's raw weights

    def raw(self, i: np.ndarray | slice, j) -> np.ndarray:
        """Unnormalised float64 weights of outputs `i` for inputs `j` (broadcast)."""
        return np.maximum(0.0, 1.0 - np.abs((j - self.centre[i] + 0.5) * self.invscale))

    def weights(self, i, j) -> np.ndarray:
        """float32 weights of outputs `i` (a slice or indices) for input indices `j`."""
        total = self.total[i]
        w = self.raw(i, j)
        return np.divide(w, total, out=np.zeros_like(w), where=total != 0).astype(np.float32)


def _axis(in_size: int, out_size: int) -> _Axis:
    if in_size < 1 or out_size < 1:
        raise ValueError(f"resize sizes must be positive, got {in_size} -> {out_size}")
    scale = in_size / out_size
    support = scale if scale >= 1.0 else 1.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    centre = scale * (np.arange(out_size) + 0.5)
    lo = np.maximum(np.trunc(centre - support + 0.5).astype(np.int64), 0)
    hi = np.minimum(np.trunc(centre + support + 0.5).astype(np.int64), in_size)
    k = int((hi - lo).max())
    total = np.zeros(out_size)
    if out_size * k <= RESIZE_DENSE_TAPS:  # the tap table's own row sums, as aa_taps had them
        idx = lo[:, None] + np.arange(k)[None, :]
        raw = np.maximum(0.0, 1.0 - np.abs((idx - centre[:, None] + 0.5) * invscale))
        total[:] = np.where(idx < hi[:, None], raw, 0.0).sum(axis=1)
    else:
        for i in range(out_size):  # one output's taps at a time
            j = np.arange(lo[i], hi[i])
            total[i] = np.maximum(0.0, 1.0 - np.abs((j - centre[i] + 0.5) * invscale)).sum()
    return _Axis(lo, hi, centre, invscale, total)


def aa_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices [out, K], weights [out, K]) of the filter along one axis (see `_Axis`); padding
    taps repeat index 0 with weight 0."""
    a = _axis(in_size, out_size)
    k = int((a.hi - a.lo).max())
    idx = a.lo[:, None] + np.arange(k)[None, :]
    valid = idx < a.hi[:, None]
    w = np.where(valid, a.weights(slice(None), idx.T).T, 0.0).astype(np.float32)
    return np.where(valid, idx, 0), w


def _apply(x: np.ndarray, idx: np.ndarray, w: np.ndarray, axis: int) -> np.ndarray:
    """Filter `x` along `axis` (0 or 1 of an [H, W, C] array) with taps (idx, w)."""
    x = np.ascontiguousarray(x)  # np.take copies a strided array whole, for every tap
    shape = list(x.shape)
    shape[axis] = idx.shape[0]
    out = np.zeros(shape, np.float32)
    bshape = (-1, 1, 1) if axis == 0 else (1, -1, 1)
    for k in range(idx.shape[1]):
        out += np.take(x, idx[:, k], axis=axis) * w[:, k].reshape(bshape)
    return out


class _Horizontal:
    """The horizontal pass over a band of rows: a dense tap table for ordinary widths, one
    output column at a time for widths whose table would be large."""

    def __init__(self, width: int, out: int):
        self.axis = _axis(width, out)
        k = int((self.axis.hi - self.axis.lo).max())
        self.taps = aa_taps(width, out) if out * k <= RESIZE_DENSE_TAPS else None

    def __call__(self, band: np.ndarray) -> np.ndarray:
        if self.taps is not None:
            return _apply(band, *self.taps, axis=1)
        a = self.axis
        out = np.empty((band.shape[0], a.lo.size, band.shape[2]), np.float32)
        for i in range(a.lo.size):
            w = a.weights(slice(i, i + 1), np.arange(a.lo[i], a.hi[i])[None, :])[0]
            out[:, i] = np.tensordot(band[:, a.lo[i]:a.hi[i]], w, axes=([1], [0]))
        return out


class _Vertical:
    """The vertical pass, fed a band of horizontally filtered rows at a time: each input row
    is added into the few output rows whose taps cover it, in the order `_apply` would add
    them (so the result is the whole-image pass's, bit for bit), and no band is kept."""

    def __init__(self, height: int, out: int):
        self.axis, self.out = _axis(height, out), None

    def add(self, y0: int, band: np.ndarray) -> None:
        """Rows y0.. of the horizontally filtered image, [r, W', C]."""
        a = self.axis
        if self.out is None:
            self.out = np.zeros((a.lo.size, *band.shape[1:]), np.float32)
        j = np.arange(y0, y0 + band.shape[0])
        first = np.searchsorted(a.hi, j, "right")  # outputs first..end cover row j
        span = np.searchsorted(a.lo, j, "right") - first
        # Slot s adds row j into output first[j] + s. An output's rows have ascending j and
        # descending s, so taking the slots from the last keeps every output's additions in
        # ascending row order, whatever the bands.
        for s in range(int(span.max(initial=0)) - 1, -1, -1):
            rows = np.nonzero(span > s)[0]
            out = first[rows] + s
            w = a.weights(out, j[rows])
            np.add.at(self.out, out, band[rows] * w[:, None, None])


def resize_rows(read_rows: Callable[[int, int], np.ndarray], height: int, width: int,
                size: tuple[int, int], rows: int | None = None) -> np.ndarray:
    """Resize an image of `height` x `width` to `size` (H, W), reading float rows [y0, y1) as
    [r, width, C] arrays from `read_rows`, `rows` at a time (default: as many as make
    RESIZE_FLOATS values). Returns [C, H, W] float32 (NCHW without the batch). Working memory
    is one band of rows and the output, whatever the image's height."""
    horizontal, vertical = _Horizontal(width, size[1]), _Vertical(height, size[0])
    rows = rows or max(1, RESIZE_FLOATS // (3 * width))
    narrow = width < size[1]  # widening: filter the few columns down first, widen the result
    for y in range(0, height, rows):
        band = read_rows(y, min(y + rows, height))
        vertical.add(y, band if narrow else horizontal(band))
    out = horizontal(vertical.out) if narrow else vertical.out
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a float [C, H, W] array to `size` (H, W); see `resize_rows`."""
    hwc = np.moveaxis(np.asarray(image, np.float32), 0, -1)
    return resize_rows(lambda a, b: hwc[a:b], hwc.shape[0], hwc.shape[1], size)
