"""A JPEG file's own quantized DCT coefficients, for the exact quantization constraint.

The decoded pixels give k = round(DCT / q) only up to the decoder's rounding, clipping and
chroma upsampling; at QF >= 80 (steps of 1-3) a few percent of the estimates are off by one,
exactly where the constraint matters. The file holds k itself. jpeglib (libjpeg's coefficient
reader; runtime dependency where its wheels exist, `pip install jpeglib` elsewhere) reads it
without decoding. Where it is not installed, or a file's coefficients do not match what Pillow
decoded (planes, tables, block grid), `read_coefficients` returns None and the constraint
estimates k from the pixels as before; the report says which (`jpeg_constraint`).
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import numpy as np

from .jpegqcs import JpegTables, block_grid, tables_of
from .orient import ORIENTATIONS

_PLANES = ("Y", "Cb", "Cr")
_EXIF_ORIENTATION = 0x0112


def available() -> bool:
    """Whether jpeglib is importable (the file's coefficients can be read at all)."""
    try:
        import jpeglib  # noqa: F401
    except ImportError:
        return False
    return True


def with_coefficients(tables: JpegTables | None, source: str | Path | bytes,
                      shape: tuple[int, int]) -> JpegTables | None:
    """`tables` holding the file's coefficients (`source`: its path or its bytes; `shape`: the
    decoded HxW as stored, before any EXIF rotation), or `tables` as they were where they
    cannot be read."""
    if tables is None:
        return None
    k = read_coefficients(source, tables, shape)
    return tables if k is None else dataclasses.replace(tables, coefficients=k)


def read_coefficients(source: str | Path | bytes, tables: JpegTables,
                      shape: tuple[int, int]) -> tuple[np.ndarray, ...] | None:
    """Per plane of `tables`, the file's k as int16 [block rows, block cols, 8, 8] (natural
    order), or None: jpeglib missing, or the file's planes, quantization tables or block
    grid differ from `tables` and `shape` (then the pixels are not the file's own grid)."""
    try:
        import jpeglib
    except ImportError:
        return None
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _from_bytes(bytes(source), tables, shape)
    try:
        dct = jpeglib.read_dct(str(source))
        planes = [getattr(dct, p) for p in _PLANES[:len(tables.tables)]]
        qt, which = dct.qt, dct.quant_tbl_no
    except (OSError, ValueError, TypeError, IndexError):
        return None  # libjpeg refused what Pillow read: keep the estimate
    if any(p is None for p in planes) or which is None or len(which) < len(planes):
        return None
    for c, (plane, table, factor) in enumerate(zip(planes, tables.tables, tables.factors)):
        if plane.shape != (*block_grid(shape, factor), 8, 8) or \
                not np.array_equal(qt[which[c]].reshape(-1), np.asarray(table)):
            return None
    return tuple(np.ascontiguousarray(p, np.int16) for p in planes)


def _from_bytes(data: bytes, tables: JpegTables, shape: tuple[int, int]
                ) -> tuple[np.ndarray, ...] | None:
    # libjpeg's reader takes a file name: the bytes go to a private temporary file.
    fd, tmp = tempfile.mkstemp(prefix="sodiff-", suffix=".jpg")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return read_coefficients(tmp, tables, shape)
    except OSError:
        return None
    finally:
        Path(tmp).unlink(missing_ok=True)


def jpeg_of(im, raw: str | Path | bytes) -> JpegTables | None:
    """An opened, decoded PIL JPEG's tables with its coefficients (`raw`: the file's path or
    bytes) and EXIF orientation, read before its pixels are turned upright; None where the
    constraint cannot apply (runtime.jpegqcs.tables_of)."""
    tables = with_coefficients(tables_of(im), raw, (im.height, im.width))
    orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
    if tables is None or orientation in (1, None):
        return tables
    if orientation not in ORIENTATIONS:  # a broken tag: Pillow leaves the pixels as stored
        return tables
    return dataclasses.replace(tables, orientation=int(orientation))
