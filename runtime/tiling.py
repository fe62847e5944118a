"""Tile layouts and feathered blending weights, one axis at a time.

Tiles form a grid (the same starts on every row), so the blend weight of tile (i, j) is
wy_i(y) * wx_j(x) and the per-pixel normalisation sum_ij wy_i wx_j = (sum_i wy_i)(sum_j wx_j)
is separable too: each axis's weights are normalised on their own and no full-size weight
buffer is needed.
"""
from __future__ import annotations

import math

import numpy as np


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def tile_starts(length: int, tile: int, overlap: int, align: int) -> list[int]:
    """Starts of tiles of side `tile` covering [0, length), each a multiple of `align` (the JPEG
    block and VAE grid stay put), neighbours overlapping by at least `overlap`, spread evenly.
    The last tile may pass the end by less than `align` pixels (those are padded)."""
    if length <= tile:
        return [0]
    step = (tile - overlap) // align * align
    if step < align:
        raise ValueError(f"tile={tile} minus overlap={overlap} leaves less than one {align}-pixel "
                         f"step")
    last_u = round_up(length - tile, align) // align
    gaps = -(-last_u * align // step)  # so that every gap is at most `step`
    return [(last_u * i // gaps) * align for i in range(gaps + 1)]


def crop_starts(length: int, window: int, align: int) -> list[int]:
    """Starts of windows of side `window` inside [0, length), multiples of `align`, spread
    evenly; together they cover all but fewer than `align` pixels at the end."""
    if length <= window:
        return [0]
    last_u = (length - window) // align
    n = math.ceil(length / window)
    return [(last_u * i // (n - 1)) * align for i in range(n)] if n > 1 else [0]


def _ramp(n: int, rising: bool) -> np.ndarray:
    r = (np.arange(n, dtype=np.float64) + 1) / (n + 1)
    return r if rising else r[::-1]


def axis_weights(starts: list[int], tile: int, length: int) -> list[np.ndarray]:
    """Per tile, its blend weight over the part inside [0, length), normalised so that the
    weights of all tiles sum to one at every position. Linear ramps over each overlap (a
    tile's falling ramp and its neighbour's rising ramp add up to one), flat elsewhere."""
    raw = []
    for i, s in enumerate(starts):
        valid = min(tile, length - s)
        w = np.ones(valid, np.float64)
        if i > 0:
            n = min(starts[i - 1] + tile - s, valid)
            if n > 0:
                w[:n] = np.minimum(w[:n], _ramp(n, True))
        if i + 1 < len(starts):
            n = valid - (starts[i + 1] - s)
            if n > 0:
                w[valid - n:] = np.minimum(w[valid - n:], _ramp(n, False))
        raw.append(w)
    total = np.zeros(length, np.float64)
    for s, w in zip(starts, raw):
        total[s:s + w.size] += w
    return [(w / total[s:s + w.size]).astype(np.float32) for s, w in zip(starts, raw)]


def column_stripes(xs: list[int], tile: int, length: int, most: int) -> list[tuple[int, int]]:
    """Tile columns [j0, j1) that blend as one band, each band at most `most` pixels wide
    where the tiles allow. Every stripe but the last spans at least a tile of starts, so no
    tile reaches past the next stripe into the one after it (only neighbours share pixels)."""
    stripes, j0 = [], 0
    while j0 < len(xs):
        j1 = j0 + 1
        while j1 < len(xs) and min(xs[j1] + tile, length) - xs[j0] <= most:
            j1 += 1
        while j1 < len(xs) and xs[j1] - xs[j0] < tile:
            j1 += 1
        stripes.append((j0, j1))
        j0 = j1
    return stripes
