"""Tiles of images, in batches: reading them as float blocks, the layout of an image's tiles,
the band of rows that blends restored tiles back, and how many tiles go to the engines at once.

Batches follow the tiles in raster order and may span rows (and, in `restore_batch`, images of
the same tile shape). That keeps the memory bound: the tiles in flight are at most one batch
(`tile_batch` blocks in and out), and each image blends into one band of a tile's height, which
is written out and reused as soon as a row is complete. Raster order also keeps the additions
into the band in the same order as one tile at a time, so batching changes nothing but the
engines' own batch arithmetic.

An image so wide that the band would pass BAND_FLOATS is cut into column stripes of tiles, each
blended top to bottom in raster order through a band of its own width. The pixels two stripes
share get the left stripe's terms kept aside and added, row by row, just before the right
stripe's, so every pixel still sums its tiles in raster order: the output is the one-band
output, bit for bit. Then nothing grows with the image's height or its width.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from .config import LUMA, NEUTRAL_CHECK_PIXELS, RestoreOptions
from .errors import EngineDirError
from .geometry import Geometry
from .manifest import Manifest
from .tiling import axis_weights, column_stripes, tile_starts

SCALES = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}
BAND_FLOATS = 1 << 22            # most floats of one blending band (3 x tile rows x columns,
#                                  16 MiB) before an image is blended in column stripes


def pad_bottom_right(x: np.ndarray, ph: int, pw: int) -> np.ndarray:
    """Pad [..., H, W] bottom/right: reflect, or edge (replicate) when a pad is not shorter than
    its side -- sodiff.model.pad_reflect's rule, so the JPEG grid stays put."""
    if not ph and not pw:
        return x
    mode = "reflect" if ph < x.shape[-2] and pw < x.shape[-1] else "edge"
    return np.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, ph), (0, pw)], mode=mode)


class Source:
    """Float [-1, 1] views of parts of a uint image (grey is broadcast to RGB on read)."""

    def __init__(self, colour: np.ndarray):
        self.a, self.h, self.w = colour, colour.shape[0], colour.shape[1]
        self.half = np.float32(SCALES[colour.dtype] / 2)

    def rows(self, y0: int, y1: int) -> np.ndarray:
        """[r, W, 3] float32."""
        part = self.a[y0:y1].astype(np.float32) / self.half - np.float32(1)
        return part if part.ndim == 3 else np.repeat(part[..., None], 3, axis=2)

    def block(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """[1, 3, h, w] float32 of the region at (y, x), padded where it passes the image."""
        part = self.a[y:min(y + h, self.h), x:min(x + w, self.w)]
        chw = part.astype(np.float32) / self.half - np.float32(1)
        chw = np.repeat(chw[None], 3, axis=0) if chw.ndim == 2 else chw.transpose(2, 0, 1)
        return pad_bottom_right(chw, h - chw.shape[1], w - chw.shape[2])[None]


def keep_mean_colour(tile: np.ndarray, block: np.ndarray, h: int, w: int) -> None:
    """Shift a restored tile [3, th, tw], in place and per channel, so that its mean over its
    top-left `h` x `w` (the part inside the image) is the input block's [1, 3, th, tw] there;
    then clip to [-1, 1]. sodiff.model.keep_mean_colour, tile by tile: for an image of one
    tile the same thing, and across tiles a cast that follows the JPEG's local colour."""
    shift = block[0, :, :h, :w].mean(axis=(1, 2)) - tile[:, :h, :w].mean(axis=(1, 2))
    tile += shift.astype(np.float32)[:, None, None]
    np.clip(tile, -1.0, 1.0, out=tile)


def to_uint(chw: np.ndarray, like: np.ndarray) -> np.ndarray:
    """[3, r, W] in [-1, 1] -> [r, W, 3] (or [r, W] luma for grey) of `like`'s dtype, rounded
    like the PyTorch reference: round((x + 1) * max / 2), clipped."""
    if like.ndim == 2:
        chw = sum(np.float32(c) * chw[i] for i, c in enumerate(LUMA))[None]
    top = SCALES[like.dtype]
    v = chw + np.float32(1)  # the one temporary: the rest works in place
    v *= np.float32(top / 2)
    np.rint(v, out=v)
    v = np.clip(v, 0, top, out=v).astype(like.dtype)
    return v[0] if like.ndim == 2 else v.transpose(1, 2, 0)


# -- batch size ------------------------------------------------------------------------------
def batch_limits(manifest: Manifest) -> tuple[int, int]:
    """(min, max) batch the engines take (manifest shapes.batch; absent: 1, 1)."""
    b = manifest.raw.get("shapes", {}).get("batch") or {"min": 1, "max": 1}
    try:
        lo, hi = b["min"], b["max"]
        ok = all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (lo, hi))
    except (KeyError, TypeError):
        ok = False
    if not ok or lo > hi:
        raise EngineDirError(f"engine dir {manifest.root}: shapes.batch={b!r} must hold positive "
                             f"integers min <= max; re-export the dir with sodiff-export")
    return lo, hi


def plan_tile_batch(opts: RestoreOptions, manifest: Manifest) -> int:
    """Tiles per engine call: `opts.tile_batch`, or the engines' largest batch."""
    lo, hi = batch_limits(manifest)
    n = hi if opts.tile_batch is None else opts.tile_batch
    if n > hi:
        raise ValueError(f"--tile-batch {n} is above the engines' largest batch {hi} (shapes."
                         f"batch.max of {manifest.root}); use at most {hi}, or re-export with "
                         f"sodiff-export --batch 1:{n}:{n}")
    if n < lo:
        raise ValueError(f"--tile-batch {n} is below the engines' smallest batch {lo} (shapes."
                         f"batch.min of {manifest.root}); use at least {lo}")
    return n


# -- layout and blending ---------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """Where an image's tiles go."""

    th: int                       # tile height fed to the encoder
    tw: int                       # tile width
    ys: tuple[int, ...]           # tile row starts
    xs: tuple[int, ...]           # tile column starts
    wys: tuple[np.ndarray, ...]   # per tile row, its blend weights over the rows it covers
    wxs: tuple[np.ndarray, ...]   # per tile column, the same over columns
    stripes: tuple[tuple[int, int], ...]  # tile columns [j0, j1) blended as one band

    @property
    def count(self) -> int:
        return len(self.ys) * len(self.xs)

    def info(self) -> dict:
        return {"count": self.count, "tile": [self.th, self.tw],
                "grid": [len(self.ys), len(self.xs)]}


def plan_layout(g: Geometry, h: int, w: int) -> Layout:
    th = g.fit(h, 0) if h <= g.tile[0] else g.tile[0]
    tw = g.fit(w, 1) if w <= g.tile[1] else g.tile[1]
    ys, xs = tile_starts(h, th, g.overlap, g.align), tile_starts(w, tw, g.overlap, g.align)
    return Layout(th, tw, tuple(ys), tuple(xs), tuple(axis_weights(ys, th, h)),
                  tuple(axis_weights(xs, tw, w)), plan_stripes(xs, min(th, h), tw, h, w))


def plan_stripes(xs: list[int], rows: int, tw: int, h: int, w: int) -> tuple[tuple[int, int], ...]:
    """One stripe of all tile columns, unless the band (`rows` x w) would pass BAND_FLOATS and
    stripes need less: their bands, plus the terms kept for the columns neighbours share (at
    most two per pixel of a tile's width, over the image's height)."""
    most = max(BAND_FLOATS // (3 * rows), 2 * tw)
    if w <= most or rows * most + 2 * h * tw >= rows * w:
        return ((0, len(xs)),)
    return tuple(column_stripes(xs, tw, w, most))


class Band:
    """Blends an image's restored tiles, given stripe by stripe in raster order (`tile_jobs`),
    into `out` (a view shaped like the colour part), a band of one tile's height at a time."""

    def __init__(self, layout: Layout, out: np.ndarray, h: int, w: int):
        self.lay, self.out, self.h, self.w = layout, out, h, w
        self.stripe = self.top = 0
        self.kept: dict[int, list] = {}     # tile row -> the left stripe's shared terms
        self.keep: dict[int, list] = {}     # the same, gathered for the next stripe
        self._open(0)

    def _open(self, s: int) -> None:
        """Start stripe `s`: a zeroed band over its columns, never more rows than the image
        has (a 1-row image's tiles are 8 rows high)."""
        lay = self.lay
        j0, j1 = lay.stripes[s]
        self.stripe, self.top, self.j0, self.j1 = s, 0, j0, j1
        self.x0 = lay.xs[j0]
        last = j1 == len(lay.xs)
        self.x1 = self.w if last else lay.xs[j1]  # columns this stripe completes
        self.share = None if last else lay.xs[j1]  # where the next stripe's columns start
        end = min(lay.xs[j1 - 1] + lay.tw, self.w)
        self.kept, self.keep = self.keep, {}
        self.band = np.zeros((3, min(lay.th, self.h), end - self.x0), np.float32)

    def add(self, iy: int, ix: int, tile: np.ndarray) -> None:
        lay = self.lay
        if not self.j0 <= ix < self.j1:
            self._open(self.stripe + 1)
        if ix == self.j0:  # the left stripe's terms of this row come first, as in raster order
            for x, term in self.kept.pop(iy, ()):
                self.band[:, :term.shape[1], x - self.x0:x - self.x0 + term.shape[2]] += term
        x, wy, wx = lay.xs[ix], lay.wys[iy], lay.wxs[ix]
        term = tile[:, :wy.size, :wx.size] * (wy[:, None] * wx)
        self.band[:, :wy.size, x - self.x0:x - self.x0 + wx.size] += term
        if self.share is not None and x + wx.size > self.share:
            self.keep.setdefault(iy, []).append((self.share, term[:, :, self.share - x:].copy()))
        if ix == self.j1 - 1:
            self._row_done(iy)

    def _row_done(self, iy: int) -> None:
        lay, band, top, rows = self.lay, self.band, self.top, self.band.shape[1]
        done = lay.ys[iy + 1] if iy + 1 < len(lay.ys) else self.h
        x0, x1 = self.x0, self.x1
        self.out[top:done, x0:x1] = to_uint(band[:, :done - top, :x1 - x0], self.out)
        band[:, :rows - (done - top)] = band[:, done - top:]  # numpy buffers the overlap
        band[:, rows - (done - top):] = 0
        self.top = done


@dataclass(frozen=True)
class TileJob:
    image: int                    # which image of the call the tile belongs to
    iy: int                       # tile row
    ix: int                       # tile column


def tile_jobs(image: int, layout: Layout) -> Iterator[TileJob]:
    """Raster order within each column stripe (for most images, the one stripe)."""
    for j0, j1 in layout.stripes:
        for iy in range(len(layout.ys)):
            for ix in range(j0, j1):
                yield TileJob(image, iy, ix)


def in_batches(jobs: Iterable[TileJob], size: int) -> Iterator[list[TileJob]]:
    """Consecutive runs of at most `size` jobs (the stream is read lazily)."""
    batch: list[TileJob] = []
    for job in jobs:
        batch.append(job)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def pad_batch(blocks: list[np.ndarray], least: int) -> np.ndarray:
    """[N, ...] of the blocks, repeating the last up to `least` rows (engines whose smallest
    batch is above N); the repeats' outputs are dropped."""
    return np.concatenate(blocks + blocks[-1:] * max(0, least - len(blocks)), axis=0)


def is_neutral(colour: np.ndarray) -> bool:
    """Whether an RGB array has R = G = B at every pixel, read a band of rows at a time (and
    given up at the first band with colour)."""
    if colour.ndim != 3:
        return False
    rows = max(1, NEUTRAL_CHECK_PIXELS // max(1, colour.shape[1]))
    for y in range(0, colour.shape[0], rows):
        part = colour[y:y + rows]
        if not (np.array_equal(part[..., 0], part[..., 1]) and
                np.array_equal(part[..., 1], part[..., 2])):
            return False
    return True


class Neutral:
    """A grey destination over an RGB output: each grey row written goes to all three."""

    ndim = 2

    def __init__(self, rgb: np.ndarray):
        self.rgb, self.dtype = rgb, rgb.dtype

    def __setitem__(self, rows, grey: np.ndarray) -> None:
        self.rgb[rows] = grey[..., None]


def split_alpha(image: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """The colour part (HxW or HxWx3) and the alpha channel (or None) of a Restorer input;
    ValueError naming a dtype or shape the runtime does not take."""
    if not isinstance(image, np.ndarray) or image.dtype not in SCALES:
        raise ValueError(f"image must be a uint8 or uint16 numpy array, got "
                         f"{getattr(image, 'dtype', type(image).__name__)}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    ok = image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (2, 3, 4))
    if not ok or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image must be HxW, HxWx1 (grey), HxWx2 (grey+alpha), HxWx3 (RGB) or "
                         f"HxWx4 (RGBA) and non-empty, got shape {image.shape}")
    if image.ndim == 3 and image.shape[2] in (2, 4):
        return image[..., :-1].squeeze(-1) if image.shape[2] == 2 else image[..., :3], \
            image[..., -1]
    return image, None
