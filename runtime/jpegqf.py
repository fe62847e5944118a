"""The IJG quality factor of a JPEG, read from its quantization tables (for `--timestep header`).

The same logic as `sodiff/jpeg.py` (kept in step by tests/test_runtime_units.py), duplicated
because the runtime never imports `sodiff`. Pillow's `quality=Q` writes exactly libjpeg's tables
for Q; all 100 luma tables differ, so the luma table alone identifies Q, and the chroma tables
only confirm it. Anything else (custom tables, other encoders) is "unknown", never a guess.
"""
from __future__ import annotations

import functools
import io

import numpy as np
from PIL import Image

# ITU-T T.81 Annex K tables (libjpeg's std_luminance/chrominance_quant_tbl), natural order.
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


def scale_table(base: tuple[int, ...], quality: int) -> tuple[int, ...]:
    """libjpeg's `jpeg_quality_scaling` and baseline clamp of `base` at quality 1..100."""
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return tuple(min(max((b * scale + 50) // 100, 1), 255) for b in base)


@functools.lru_cache(maxsize=None)
def _tables() -> dict[int, tuple[tuple[int, ...], tuple[int, ...]]]:
    return {q: (scale_table(IJG_LUMA, q), scale_table(IJG_CHROMA, q)) for q in range(1, 101)}


@functools.lru_cache(maxsize=None)
def _pillow_zigzag() -> bool:
    """Whether this Pillow reports tables in zigzag order (older releases) rather than natural
    order; probed once on a tiny encode because the convention changed between releases."""
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="JPEG", quality=50)
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        luma = tuple(im.quantization[0])
    return luma != IJG_LUMA and luma == tuple(IJG_LUMA[i] for i in ZIGZAG)


def _natural(table) -> tuple[int, ...]:
    table = tuple(int(v) for v in table)
    if len(table) != 64 or not _pillow_zigzag():
        return table
    natural = [0] * 64
    for k, idx in enumerate(ZIGZAG):
        natural[idx] = table[k]
    return tuple(natural)


def quality_from_tables(tables: dict | None) -> int | None:
    """The IJG quality whose tables equal `tables` ({slot: 64 values}, Pillow's
    `im.quantization`), else None."""
    if not tables or 0 not in tables:
        return None
    natural = {slot: _natural(t) for slot, t in tables.items()}
    for q, (luma, chroma) in _tables().items():
        if natural[0] == luma:
            ok = all(t == chroma for slot, t in natural.items() if slot != 0)
            return q if ok else None
    return None


def estimate_quality(im: Image.Image) -> int | None:
    """The IJG quality factor of an opened JPEG (None: not a JPEG, or non-IJG tables)."""
    return quality_from_tables(getattr(im, "quantization", None) or None)


def equivalent_quality(luma: tuple[int, ...]) -> int:
    """The IJG quality whose luma table is nearest to `luma` (natural order) in mean log step:
    a camera's or another encoder's custom table placed on the IJG scale, for the gate."""
    want = np.log(np.maximum(np.asarray(luma, np.float64), 1))
    return min(_tables(), key=lambda q: float(np.abs(
        np.log(np.asarray(_tables()[q][0], np.float64)) - want).mean()))
