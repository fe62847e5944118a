"""JPEG compression and quality-factor estimation with libjpeg's standard (IJG) tables.

numpy + Pillow only (no torch): the torch-free runtime shares this logic.

Facts this module relies on (checked against Pillow 13 / libjpeg-turbo, see tests/test_jpeg.py):
- Pillow's `quality=Q` gives exactly the IJG tables `quality_tables(Q)` for every Q in 1..100.
- Over Q in 1..100 all 100 luma tables are distinct, so the luma table alone identifies Q
  (grey JPEGs have only that table). The chroma tables of Q = 1, 2, 3 are identical (every
  entry clamps to 255), so chroma alone could not tell those apart; it is only used as a
  consistency check.
"""
from __future__ import annotations

import functools
import io
import os
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

# ITU-T T.81 Annex K tables (libjpeg's std_luminance/chrominance_quant_tbl), natural
# (row-major) order.
IJG_LUMA = (
    16, 11, 10, 16, 24, 40, 51, 61,
    12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77,
    24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101,
    72, 92, 95, 98, 112, 100, 103, 99,
)
IJG_CHROMA = (
    17, 18, 24, 47, 99, 99, 99, 99,
    18, 21, 26, 66, 99, 99, 99, 99,
    24, 26, 56, 99, 99, 99, 99, 99,
    47, 66, 99, 99, 99, 99, 99, 99,
) + (99,) * 32

# ZIGZAG[k] = natural (row-major) index of the k-th coefficient in zigzag order.
ZIGZAG = (
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5,
    12, 19, 26, 33, 40, 48, 41, 34, 27, 20, 13, 6, 7, 14, 21, 28,
    35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51,
    58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63,
)

# Pillow's names for chroma subsampling.
_SUBSAMPLING = {"4:4:4": "4:4:4", "4:2:2": "4:2:2", "4:2:0": "4:2:0"}

Source = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image]


def _check_quality(quality) -> int:
    if isinstance(quality, bool) or not isinstance(quality, (int, np.integer)):
        raise ValueError(f"quality must be an integer in 1..100, got {quality!r}")
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"quality must be in 1..100, got {int(quality)}")
    return int(quality)


def _check_image(image) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must have dtype uint8, got {image.dtype}")
    grey = image.ndim == 2
    rgb = image.ndim == 3 and image.shape[2] == 3
    if not (grey or rgb):
        raise ValueError(f"image must be HxW (grey) or HxWx3 (RGB), got shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image must be non-empty, got shape {image.shape}")
    return np.ascontiguousarray(image)


def compress(image: np.ndarray, quality: int,
             subsampling: str = "4:2:0") -> tuple[np.ndarray, bytes]:
    """JPEG-compress `image` in memory with libjpeg's standard tables at quality `quality`.

    `image` is uint8 HxWx3 (RGB) or HxW (grey, encoded as a single-channel JPEG, where
    `subsampling` has no effect). Uses Pillow with `optimize=False` (Huffman optimisation only
    changes the size, never the pixels). Returns (decoded uint8 array of the same shape, JPEG
    bytes).
    """
    quality = _check_quality(quality)
    if subsampling not in _SUBSAMPLING:
        raise ValueError(f"subsampling must be one of {sorted(_SUBSAMPLING)}, "
                         f"got {subsampling!r}")
    image = _check_image(image)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality,
                                subsampling=_SUBSAMPLING[subsampling], optimize=False)
    data = buf.getvalue()
    with Image.open(io.BytesIO(data)) as im:
        # Decode to the input's mode so the output shape always equals the input shape.
        decoded = np.asarray(im.convert("L" if image.ndim == 2 else "RGB"))
    return decoded.copy(), data


def scale_table(base, quality: int) -> tuple[int, ...]:
    """IJG `jpeg_quality_scaling` + baseline clamp: `base` scaled to quality 1..100.

    scale = 5000 // Q (integer division, as libjpeg) for Q < 50, else 200 - 2Q;
    q = clamp((base * scale + 50) // 100, 1, 255).
    """
    quality = _check_quality(quality)
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return tuple(min(max((b * scale + 50) // 100, 1), 255) for b in base)


def quality_tables(quality: int) -> dict[int, tuple[int, ...]]:
    """The {0: luma, 1: chroma} tables (natural order) libjpeg uses at `quality`."""
    return {0: scale_table(IJG_LUMA, quality), 1: scale_table(IJG_CHROMA, quality)}


@functools.lru_cache(maxsize=None)
def _all_quality_tables() -> dict[int, dict[int, tuple[int, ...]]]:
    return {q: quality_tables(q) for q in range(1, 101)}


@functools.lru_cache(maxsize=None)
def _pillow_tables_are_zigzag() -> bool:
    """Whether this Pillow reports `im.quantization` in zigzag order (old Pillow) rather than
    natural order (current Pillow). Probed once by encoding a tiny image, not guessed from the
    version, because the convention changed between releases."""
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="JPEG", quality=50)
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        luma = tuple(im.quantization[0])
    if luma == IJG_LUMA:
        return False
    if luma == tuple(IJG_LUMA[i] for i in ZIGZAG):
        return True
    raise RuntimeError(f"Pillow's quality=50 luma table is not the IJG table: {luma}")


def _to_natural(table) -> tuple[int, ...]:
    table = tuple(int(v) for v in table)
    if len(table) != 64 or not _pillow_tables_are_zigzag():
        return table
    natural = [0] * 64
    for k, idx in enumerate(ZIGZAG):
        natural[idx] = table[k]
    return tuple(natural)


def quality_from_tables(tables: dict[int, list[int]]) -> int | None:
    """The IJG quality 1..100 whose tables reproduce `tables` exactly, else None.

    `tables` maps table slot -> 64 values as Pillow reports them (`im.quantization`; order
    normalised to natural order here). Slot 0 must equal the luma table; every other slot the
    chroma table of the same Q. None means "unknown" (custom tables, wrong length, no slot 0),
    never a guess. The answer is unique because the 100 luma tables are all distinct.
    """
    if not tables or 0 not in tables:
        return None
    natural = {slot: _to_natural(t) for slot, t in tables.items()}
    for q, ref in _all_quality_tables().items():
        if natural[0] != ref[0]:
            continue
        if all(t == ref[1] for slot, t in natural.items() if slot != 0):
            return q
        return None  # luma matched this Q (and no other Q), chroma did not: custom tables
    return None


def _quantization_of(im: Image.Image) -> dict | None:
    # JPEG (and MPO, a JPEG subclass) images carry `quantization`; other formats do not.
    return getattr(im, "quantization", None) or None


def estimate_quality(source: Source) -> int | None:
    """IJG quality factor (1..100) of a JPEG, read from its quantization tables.

    `source` is a path, the JPEG bytes, or an open PIL image. Returns None ("unknown") when no
    IJG quality reproduces the tables exactly (custom tables, other encoders' tables) or when
    the data is not a JPEG. A missing file still raises FileNotFoundError.
    """
    if isinstance(source, Image.Image):
        tables = _quantization_of(source)
        return quality_from_tables(tables) if tables else None
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(source))
    elif not isinstance(source, (str, os.PathLike)):
        raise TypeError("source must be a path, bytes or a PIL image, "
                        f"got {type(source).__name__}")
    try:
        with Image.open(source) as im:
            tables = _quantization_of(im)
    except UnidentifiedImageError:
        return None
    return quality_from_tables(tables) if tables else None
