"""EXIF orientation as exact array moves: the runtime restores a JPEG on its stored grid (where
its 8x8 blocks, tables and coefficients are) and turns only the output upright.

`upright(a, o)` is what a viewer shows for stored pixels `a` with EXIF orientation `o` (the
same pixels as Pillow's `ImageOps.exif_transpose`); `stored` undoes it. Views, no copies.
"""
from __future__ import annotations

import numpy as np

ORIENTATIONS = range(1, 9)
_INVERSE = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 8, 7: 7, 8: 6}  # 90-degree turns swap


def check_orientation(o) -> None:
    if isinstance(o, bool) or not isinstance(o, (int, np.integer)) or o not in ORIENTATIONS:
        raise ValueError(f"orientation={o!r} (expected an EXIF orientation, 1..8)")


def upright(a: np.ndarray, o: int) -> np.ndarray:
    """The stored HxW(xC) array `a` as shown under EXIF orientation `o`."""
    check_orientation(o)
    if o == 2:
        return a[:, ::-1]
    if o == 3:
        return a[::-1, ::-1]
    if o == 4:
        return a[::-1]
    if o == 5:
        return a.swapaxes(0, 1)
    if o == 6:
        return np.rot90(a, -1)
    if o == 7:
        return a[::-1, ::-1].swapaxes(0, 1)
    if o == 8:
        return np.rot90(a, 1)
    return a


def stored(a: np.ndarray, o: int) -> np.ndarray:
    """The upright array `a` back on the grid stored under EXIF orientation `o`."""
    check_orientation(o)
    return upright(a, _INVERSE[int(o)])
