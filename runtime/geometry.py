"""Which shapes go to the engines: tile sides, overlap, padding and the predictor's window."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .config import JPEG_BLOCK, MIN_PREDICTOR_SIDE, RestoreOptions
from .manifest import Manifest
from .tiling import round_up


@dataclass(frozen=True)
class Geometry:
    tile: tuple[int, int]         # (H, W) of a tile when an axis needs several
    overlap: int                  # minimum overlap of neighbouring tiles, pixels
    align: int                    # tile and crop starts are multiples of this (JPEG grid, VAE)
    multiple: int                 # encoder input sides are multiples of this
    min_shape: tuple[int, int]    # smallest (H, W) the engines take
    static: bool                  # engines take exactly `tile`

    def fit(self, length: int, axis: int) -> int:
        """The encoder's side for an axis of `length` that one tile covers."""
        if self.static:
            return self.tile[axis]
        return max(round_up(length, self.multiple), self.min_shape[axis])

    def predictor_side(self, length: int, axis: int) -> int:
        """The predictor's input side for a crop of `length` (padding only where needed)."""
        if self.static:
            return self.tile[axis]
        return max(length, self.min_shape[axis], MIN_PREDICTOR_SIDE)


def plan_geometry(manifest: Manifest, opts: RestoreOptions) -> Geometry:
    """Check `opts.tile`/`opts.overlap` against the engines and settle the tile geometry;
    ValueError names the offending values and what the engines accept."""
    m, lo, hi = manifest.pad_multiple, manifest.min_shape, manifest.max_shape
    align = math.lcm(JPEG_BLOCK, manifest.vae_factor)
    if opts.tile is None:
        tile = hi
    elif manifest.static and (opts.tile, opts.tile) != hi:
        raise ValueError(f"--tile {opts.tile}: these engines have the static shape "
                         f"{hi[0]}x{hi[1]}; drop --tile or export with --dynamic")
    elif opts.tile % m or opts.tile % align:
        raise ValueError(f"--tile {opts.tile} must be a multiple of {math.lcm(m, align)} (the "
                         f"engines' pad multiple {m} and the {align}-pixel grid)")
    elif not (max(lo) <= opts.tile <= min(hi)):
        raise ValueError(f"--tile {opts.tile} is outside the engines' shapes "
                         f"{lo[0]}x{lo[1]} .. {hi[0]}x{hi[1]}")
    else:
        tile = (opts.tile, opts.tile)
    overlap = (min(tile) // 4) // align * align if opts.overlap is None else opts.overlap
    if overlap > min(tile) // 2 or (min(tile) - overlap) // align < 1:
        raise ValueError(f"--overlap {overlap} is too large for tiles of {tile[0]}x{tile[1]}: "
                         f"use at most {min(min(tile) // 2, min(tile) - align)}")
    return Geometry(tile=tile, overlap=overlap, align=align, multiple=m, min_shape=lo,
                    static=manifest.static)
