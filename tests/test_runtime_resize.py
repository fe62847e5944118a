"""SAIPE's resize on tall, narrow and very wide images (issue 15, item 8): working memory is a
band of rows and the output, not the image's height times saipe_size, and the output-by-output
weights of very long sides still match torch."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from runtime.resize import resize, resize_rows
from tolerance import PIPELINE, assert_close


def _peak_mb(fn) -> float:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 2 ** 20
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("h,w", [(300_000, 1), (64, 200_000)])
def test_resize_memory_does_not_grow_with_a_long_side(h, w):
    row = np.linspace(-1, 1, w * 3, dtype=np.float32).reshape(1, w, 3)
    read = lambda y0, y1: np.repeat(row, y1 - y0, axis=0)  # noqa: E731 - made per band
    # Before: H x 64 x 3 float32 kept whole (220 MB for 300,000 rows), or 64 rows of a
    # 200,000-wide image converted at once (147 MB).
    peak = _peak_mb(lambda: resize_rows(read, h, w, (64, 64)))
    assert peak < 40, f"{peak:.1f} MB"  # a band of rows and its temporaries


@pytest.mark.parametrize("h,w,size", [(3, 300_000, (16, 16)), (40_000, 2, (32, 32)),
                                      (2, 3, (64, 64))])
def test_long_sides_still_match_torch(h, w, size):
    x = np.random.default_rng(0).uniform(-1, 1, (3, h, w)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x)[None], size=size, mode="bilinear",
                        align_corners=False, antialias=True)[0].numpy()
    # numpy against torch's kernel: other tap weights, another order of sums over many taps.
    assert_close(resize(x, size), ref, PIPELINE)


def test_band_size_never_changes_a_narrow_image_s_result():
    x = np.random.default_rng(1).uniform(-1, 1, (1001, 3, 3)).astype(np.float32)
    whole = resize_rows(lambda a, b: x[a:b], 1001, 3, (40, 40))
    assert np.array_equal(whole, resize_rows(lambda a, b: x[a:b], 1001, 3, (40, 40), rows=7))
