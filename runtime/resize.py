"""SAIPE's input resize in numpy: torch's `F.interpolate(mode="bilinear", align_corners=False,
antialias=True)`, i.e. PIL's triangle filter stretched by the scale when shrinking and plain
bilinear (half-pixel centres, edge-clamped) when enlarging.

Separable and banded: each output sample reads only the taps its filter covers, and the image
is read a few rows at a time, so a large image is never converted to float as a whole.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .config import RESIZE_ROWS


def aa_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices [out, K], weights [out, K]) of torch's antialiased bilinear filter along one axis.

    torch (aten/src/ATen/native/cpu/UpSampleKernel.cpp, `_compute_weights_aa`): scale =
    in/out; support = scale when shrinking, else 1; for output i the centre is
    scale * (i + 0.5), the taps are j in [trunc(centre - support + 0.5), trunc(centre + support
    + 0.5)) clipped to the input, weighted by max(0, 1 - |(j - centre + 0.5) / max(scale, 1)|)
    and normalised to sum to one. Padding taps repeat index 0 with weight 0.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"resize sizes must be positive, got {in_size} -> {out_size}")
    scale = in_size / out_size
    support = scale if scale >= 1.0 else 1.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    centre = scale * (np.arange(out_size) + 0.5)
    lo = np.maximum(np.trunc(centre - support + 0.5).astype(np.int64), 0)
    hi = np.minimum(np.trunc(centre + support + 0.5).astype(np.int64), in_size)
    k = int((hi - lo).max())
    idx = lo[:, None] + np.arange(k)[None, :]
    valid = idx < hi[:, None]
    w = np.where(valid, np.maximum(0.0, 1.0 - np.abs((idx - centre[:, None] + 0.5) * invscale)),
                 0.0)
    total = w.sum(axis=1, keepdims=True)
    w = np.divide(w, total, out=np.zeros_like(w), where=total != 0)
    return np.where(valid, idx, 0), w.astype(np.float32)


def _apply(x: np.ndarray, idx: np.ndarray, w: np.ndarray, axis: int) -> np.ndarray:
    """Filter `x` along `axis` (0 or 1 of an [H, W, C] array) with taps (idx, w)."""
    shape = list(x.shape)
    shape[axis] = idx.shape[0]
    out = np.zeros(shape, np.float32)
    bshape = (-1, 1, 1) if axis == 0 else (1, -1, 1)
    for k in range(idx.shape[1]):
        out += np.take(x, idx[:, k], axis=axis) * w[:, k].reshape(bshape)
    return out


def resize_rows(read_rows: Callable[[int, int], np.ndarray], height: int, width: int,
                size: tuple[int, int], rows: int = RESIZE_ROWS) -> np.ndarray:
    """Resize an image of `height` x `width` to `size` (H, W), reading float rows [y0, y1) as
    [r, width, C] arrays from `read_rows`. Returns [C, H, W] float32 (NCHW without the batch)."""
    xi, xw = aa_taps(width, size[1])
    yi, yw = aa_taps(height, size[0])
    # Horizontal pass chunk by chunk, then the vertical pass on the narrow result.
    narrow = np.concatenate([_apply(read_rows(y, min(y + rows, height)), xi, xw, axis=1)
                             for y in range(0, height, rows)], axis=0)
    return np.ascontiguousarray(_apply(narrow, yi, yw, axis=0).transpose(2, 0, 1))


def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a float [C, H, W] array to `size` (H, W); see `resize_rows`."""
    hwc = np.moveaxis(np.asarray(image, np.float32), 0, -1)
    return resize_rows(lambda a, b: hwc[a:b], hwc.shape[0], hwc.shape[1], size)
