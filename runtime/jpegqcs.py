"""The JPEG quantization constraint: a restored image made consistent with the JPEG it came from.

A JPEG stores, per 8x8 block of each YCbCr plane (chroma after subsampling), the integers
k = round(DCT / q). The original image's coefficients therefore lie in [(k - 1/2) q, (k + 1/2) q];
any restoration outside those intervals is certainly wrong there. Clipping each coefficient of
the restoration into its interval is the orthogonal projection onto that set (the block DCT is
orthonormal), and the original lies inside it, so the projection never moves the restoration
away from the original in that plane (the classic quantization constraint set, QCS). For a
subsampled plane the constraint is on the block mean of each 2x2 (or 2x1) cell, and the
projection adds the same correction to every pixel of a cell.

Not part of the SODiff paper: a post-processing step of this runtime, applied only when the
input's quantization tables are known (a JPEG file's header, or `JpegTables.ijg(qf)` for a
standard-table JPEG) and its pixels are the decoder's output on the file's own grid (before any
EXIF rotation, no ICC conversion). k is the file's own where it could be read
(runtime/jpegcoef.py: `JpegTables.coefficients`); else it is estimated from the decoded pixels,
whose DCT is k q up to the decoder's rounding, clipping and chroma upsampling: right almost
everywhere at low quality, wrong for a few percent of coefficients at QF >= 80, where a step
is 1-3. numpy only; works in strips of one MCU row, so memory does not grow with the image.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .jpegqf import _natural, _tables
from .orient import check_orientation

_N = np.arange(8)
# The orthonormal 8-point DCT-II matrix: coefficients = D @ block @ D.T.
_D = np.sqrt(2 / 8) * np.cos((2 * _N[None] + 1) * _N[:, None] * np.pi / 16)
_D[0] /= np.sqrt(2)
_TO_YCC = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5],
                    [0.5, -0.418688, -0.081312]])  # JFIF; chroma centred on 0
_TO_RGB = np.linalg.inv(_TO_YCC)


@dataclass(frozen=True)
class JpegTables:
    """What the constraint needs to know about a JPEG: per plane, its quantization table and
    its subsampling."""

    tables: tuple[tuple[int, ...], ...]   # per plane (Y or Y, Cb, Cr): 64 steps, natural order
    factors: tuple[tuple[int, int], ...]  # per plane: (rows, cols) of pixels per sample
    # per plane, the file's quantized coefficients k: int16 [block rows, block cols, 8, 8],
    # natural order (runtime/jpegcoef.py); None: estimate k from the decoded pixels
    coefficients: tuple[np.ndarray, ...] | None = field(default=None, compare=False,
                                                        repr=False)
    # EXIF orientation of the file: the image given to the Restorer is upright, and it is
    # restored turned back onto the stored grid, where the blocks are (runtime/orient.py)
    orientation: int = 1

    @classmethod
    def ijg(cls, quality: int, grey: bool = False, subsampling: str = "4:2:0") -> "JpegTables":
        """libjpeg's standard tables at `quality` (what Pillow's `quality=` writes)."""
        if isinstance(quality, bool) or not isinstance(quality, (int, np.integer)) \
                or not 1 <= quality <= 100:
            raise ValueError(f"quality={quality!r} (expected an integer in 1..100)")
        luma, chroma = _tables()[int(quality)]
        if grey:
            return cls((luma,), ((1, 1),))
        f = {"4:2:0": (2, 2), "4:2:2": (1, 2), "4:4:4": (1, 1)}.get(subsampling)
        if f is None:
            raise ValueError(f"subsampling={subsampling!r} (expected 4:2:0, 4:2:2 or 4:4:4)")
        return cls((luma, chroma, chroma), ((1, 1), f, f))

    @property
    def grey(self) -> bool:
        return len(self.tables) == 1

    @property
    def source(self) -> str:
        """Where the constraint's k comes from: "file" (read) or "estimated" (from pixels)."""
        return "estimated" if self.coefficients is None else "file"


def tables_of(im: Image.Image) -> JpegTables | None:
    """The tables of an opened JPEG file (before any conversion), or None where the constraint
    cannot apply: not an L or YCbCr-coded RGB JPEG, or a table or sampling this module does not
    read."""
    quant, layer = getattr(im, "quantization", None), getattr(im, "layer", None)
    if im.format != "JPEG" or im.mode not in ("L", "RGB") or not quant or not layer:
        return None
    if len(layer) != (1 if im.mode == "L" else 3):
        return None
    # An Adobe JPEG with transform 0, or components named R, G, B, stores RGB, not YCbCr.
    if im.mode == "RGB" and (im.info.get("adobe_transform", 1) == 0
                             or [c[0] for c in layer] == [ord("R"), ord("G"), ord("B")]):
        return None
    try:
        tables = tuple(_natural(quant[c[3]]) for c in layer)
        hmax, vmax = max(c[1] for c in layer), max(c[2] for c in layer)
        factors = tuple((vmax // c[2], hmax // c[1]) for c in layer)
    except (KeyError, IndexError, TypeError, ZeroDivisionError):
        return None
    if any(len(t) != 64 for t in tables) or any(f not in ((1, 1), (1, 2), (2, 1), (2, 2))
                                                  for f in factors) or factors[0] != (1, 1):
        return None
    return JpegTables(tables, factors)


def check_tables(jpeg: JpegTables, image: np.ndarray) -> None:
    """ValueError when `jpeg` cannot belong to `image` (planes against channels, bit depth)."""
    if image.dtype != np.uint8:
        raise ValueError(f"jpeg tables given for a {image.dtype} image: JPEGs are 8-bit; "
                         f"drop jpeg=")
    if image.shape[2:] != (() if jpeg.grey else (3,)):
        raise ValueError(f"jpeg tables of {len(jpeg.tables)} plane(s) for an image of shape "
                         f"{image.shape}: a grey JPEG is HxW, a colour one HxWx3")
    check_orientation(jpeg.orientation)
    if jpeg.coefficients is not None:
        want = [block_grid(image.shape[:2], f) for f in jpeg.factors]
        got = [tuple(k.shape) for k in jpeg.coefficients]
        if got != [(*w, 8, 8) for w in want]:
            raise ValueError(f"jpeg coefficients of shapes {got} for a {image.shape[1]}x"
                             f"{image.shape[0]} image (expected {want} blocks of 8x8): they "
                             f"belong to another image, or to it before a rotation")


def block_grid(shape: tuple[int, int], factor: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of 8x8 blocks of a plane sampled every `factor` pixels of an HxW image."""
    return -(-shape[0] // (8 * factor[0])), -(-shape[1] // (8 * factor[1]))


def constrain(out: np.ndarray, lq: np.ndarray, jpeg: JpegTables) -> None:
    """Project `out` (uint8, restored from the decoded JPEG `lq`, same shape) in place onto the
    JPEG's quantization intervals, one MCU row at a time."""
    check_tables(jpeg, lq)
    step = 8 * max(f[0] for f in jpeg.factors)
    for y in range(0, lq.shape[0], step):
        rows = slice(y, y + step)
        if jpeg.grey:
            o = out[rows].astype(np.float64)
            o = _project(o, lq[rows].astype(np.float64), jpeg.tables[0], (1, 1), 128.0,
                         _strip(jpeg, 0, y, step))
            out[rows] = np.clip(np.round(o), 0, 255)
            continue
        o, j = out[rows] @ _TO_YCC.T, lq[rows] @ _TO_YCC.T
        for c in range(3):
            o[..., c] = _project(o[..., c], j[..., c], jpeg.tables[c], jpeg.factors[c],
                                 128.0 if c == 0 else 0.0, _strip(jpeg, c, y, step))
        out[rows] = np.clip(np.round(o @ _TO_RGB.T), 0, 255)


def _strip(jpeg: JpegTables, plane: int, y: int, step: int) -> np.ndarray | None:
    """The file's k of one plane for the pixel rows y..y+step (one MCU row), or None."""
    if jpeg.coefficients is None:
        return None
    rows = 8 * jpeg.factors[plane][0]
    return jpeg.coefficients[plane][y // rows:(y + step) // rows]


def _project(out: np.ndarray, lq: np.ndarray, table: tuple[int, ...],
             factor: tuple[int, int], level: float, k: np.ndarray | None = None) -> np.ndarray:
    """One plane of a strip: block-DCT clipping, in the plane's sampled grid. `level`: the
    encoder's level shift (128 for Y; the chroma planes here are centred already), which puts
    the DC intervals where the encoder's are. `k`: the file's coefficients of the strip's
    blocks (None: estimated from `lq`)."""
    h, w = out.shape
    fy, fx = factor
    # libjpeg extends a partial MCU by repeating the last row and column.
    ph, pw = -h % (8 * fy), -w % (8 * fx)
    o = np.pad(out, ((0, ph), (0, pw)), mode="edge")
    j = np.pad(lq, ((0, ph), (0, pw)), mode="edge")
    if fy * fx > 1:
        o = o.reshape(o.shape[0] // fy, fy, o.shape[1] // fx, fx).mean((1, 3))
        j = j.reshape(j.shape[0] // fy, fy, j.shape[1] // fx, fx).mean((1, 3))
    q = np.asarray(table, np.float64).reshape(8, 8)
    co = _dct(o - level)
    k = np.round(_dct(j - level) / q) if k is None else k.astype(np.float64)
    delta = _idct(np.clip(co, (k - 0.5) * q, (k + 0.5) * q) - co)
    if fy * fx > 1:
        delta = delta.repeat(fy, 0).repeat(fx, 1)
    return out + delta[:h, :w]


def _dct(plane: np.ndarray) -> np.ndarray:
    hb, wb = plane.shape[0] // 8, plane.shape[1] // 8
    return _D @ plane.reshape(hb, 8, wb, 8).transpose(0, 2, 1, 3) @ _D.T


def _idct(coef: np.ndarray) -> np.ndarray:
    hb, wb = coef.shape[:2]
    return (_D.T @ coef @ _D).transpose(0, 2, 1, 3).reshape(hb * 8, wb * 8)
