"""Very wide images blend in column stripes (issue 15, item 8): the band that blends a row of
tiles no longer grows with the width, and the striped output is the one-band output, bit for
bit."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from fixtures.runtime_engines import identity_engine, tiny_engine
from runtime import Restorer, tiles
from runtime.tiling import axis_weights, column_stripes, tile_starts
from tolerance import assert_pixels_close


def rand(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_engine(tmp_path_factory.mktemp("tiny-wide"))[0]


@pytest.fixture
def striped(monkeypatch):
    """Stripes of about `most` pixels for every image, however narrow; `most` is settable."""
    chosen = {"most": 130, "seen": []}

    def plan(xs, rows, tw, h, w):
        found = tuple(column_stripes(xs, tw, w, chosen["most"]))
        chosen["seen"].append(found)
        return found
    monkeypatch.setattr(tiles, "plan_stripes", plan)
    return chosen


def _blend_floats(h: int, w: int, tile: int, overlap: int, most: int | None) -> np.ndarray:
    """The float sums a Band writes for random float tiles (before the uint conversion), with
    stripes of about `most` pixels (None: one band)."""
    ys, xs = tile_starts(h, tile, overlap, 8), tile_starts(w, tile, overlap, 8)
    stripes = column_stripes(xs, tile, w, most) if most else [(0, len(xs))]
    lay = tiles.Layout(tile, tile, tuple(ys), tuple(xs), tuple(axis_weights(ys, tile, h)),
                       tuple(axis_weights(xs, tile, w)), tuple(stripes))
    rng = np.random.default_rng(0)
    restored = {(iy, ix): rng.standard_normal((3, tile, tile)).astype(np.float32)
                for iy in range(len(ys)) for ix in range(len(xs))}
    out = np.full((h, w, 3), np.nan, np.float32)
    band = tiles.Band(lay, out, h, w)
    for job in tiles.tile_jobs(0, lay):
        band.add(job.iy, job.ix, restored[job.iy, job.ix])
    return out


@pytest.mark.parametrize("overlap", [16, 40])  # 40 of 64: three tiles over some pixels
def test_striped_band_sums_every_pixel_in_raster_order(monkeypatch, overlap):
    """Float sums, before rounding to uint hides the last bits: any other order of additions
    (float addition is not associative) shows here."""
    monkeypatch.setattr(tiles, "to_uint", lambda chw, like: chw.transpose(1, 2, 0))
    one = _blend_floats(136, 1000, 64, overlap, None)
    assert not np.isnan(one).any()
    for most in (64, 130, 300):
        assert np.array_equal(_blend_floats(136, 1000, 64, overlap, most), one)


def test_striped_blend_is_the_one_band_blend_bit_for_bit(tiny, striped, monkeypatch):
    """The tiny engine (real VAE and UNet arithmetic) on 3 x 21 tiles of 64 px: stripes of
    two or three tile columns give the same bytes as one band over the whole width."""
    image = rand((136, 1000, 3))
    with Restorer(tiny, tile=64, overlap=16) as r:
        striped_out, info = r.restore_info(image)
        assert info["tiles"]["grid"] == [3, 21]
        assert len(striped["seen"][-1]) >= 7
        monkeypatch.undo()
        one_band = r.restore(image)
    assert np.array_equal(striped_out, one_band)


@pytest.mark.parametrize("shape", [(40, 700), (40, 700, 3), (40, 700, 2), (40, 700, 4), "grey-rgb"])
def test_stripes_keep_every_mode_and_restore_batch(tmp_path, striped, monkeypatch, shape):
    """Grey, grey+alpha, RGBA and neutral RGB (written as grey to all three channels) go the
    same striped way, with uneven tile spacing (overlap 24, stripes of one to two tiles)."""
    image = np.repeat(rand((40, 700))[..., None], 3, 2) if shape == "grey-rgb" else rand(shape)
    striped["most"] = 70
    with Restorer(identity_engine(tmp_path / "engine"), tile=64, overlap=24) as r:
        got = r.restore(image)
        batch = r.restore_batch([image, image[:, ::-1].copy()])
        monkeypatch.undo()
        assert np.array_equal(got, r.restore(image))
        assert np.array_equal(batch[1], r.restore(image[:, ::-1].copy()))
    assert np.array_equal(batch[0], got)
    assert_pixels_close(got, image, 1)  # the identity engine: the input back


def test_a_wide_image_blends_in_memory_that_does_not_grow_with_its_width(tmp_path):
    """32 x 600,000: one band over the whole width was 3 x 32 x 600,000 floats (230 MB);
    besides the input and output, the restore now holds little more than one BAND_FLOATS
    band (16 MiB) and a row of SAIPE's resize."""
    image = np.full((32, 600_000, 3), 100, np.uint8)
    image[:, ::7] = 50  # not neutral grey: the colour path
    with Restorer(identity_engine(tmp_path / "engine", shape_max=(512, 512))) as r:
        tracemalloc.start()
        out, info = r.restore_info(image)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert info["tiles"]["grid"][0] == 1 and info["tiles"]["count"] > 1000
    assert np.array_equal(out, image)
    extra = peak - out.nbytes
    assert extra < 3 * tiles.BAND_FLOATS * 4, f"{extra / 2**20:.0f} MiB besides the output"
