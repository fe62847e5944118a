"""Batched tiles: tiles go to the encoder, UNet and decoder up to the engines' batch at a time,
across rows and (restore_batch) across images, with the results of one tile at a time."""
import io
import math
import tracemalloc

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import shared_data
from fixtures.runtime_engines import BATCHED_BATCH, batched_tiny_engine, edit_manifest, \
    identity_engine
from runtime import EngineDirError, Restorer, RestoreOptions
from runtime.backends import Component
from runtime.cli import main
from tolerance import assert_pixels_close


def rand(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _batch(lo, hi):
    def change(m):
        m["shapes"]["batch"] = {"min": lo, "opt": hi, "max": hi}
    return change


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("batching")
    out = {"b4": identity_engine(base / "b4"), "b1": identity_engine(base / "b1"),
           "min2": identity_engine(base / "min2"),
           "static4": identity_engine(base / "static4", dtype="float16", static=True)}
    edit_manifest(out["b4"], _batch(1, 4))
    edit_manifest(out["min2"], _batch(2, 4))
    edit_manifest(out["static4"], _batch(1, 4))
    return out


@pytest.fixture(scope="module")
def batched(tmp_path_factory):
    """The tiny model exported as a 128 px engine with --batch 1:2:4."""
    return batched_tiny_engine(tmp_path_factory.mktemp("tiny-batched"))


@pytest.fixture
def batches(monkeypatch):
    """The batch size of every device-resident call, per component."""
    seen = {}
    real = Component.run

    def run(self, **feeds):
        seen.setdefault(self.spec.name, []).append(next(iter(feeds.values())).shape[0])
        return real(self, **feeds)

    monkeypatch.setattr(Component, "run", run)
    return seen


def _lq(name, quality):
    with Image.open(shared_data("LIVE1_color") / name) as im:
        buf = io.BytesIO()
        im.convert("RGB").save(buf, "JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"))


# -- identity engines: any misplaced tile changes pixels ---------------------------------------
@pytest.mark.parametrize("shape", [(70, 100, 3), (200, 77, 3), (64, 64, 3), (33, 20)])
@pytest.mark.parametrize("tile_batch", [None, 1, 3])
def test_batched_tiles_match_one_at_a_time_and_the_input(dirs, batches, shape, tile_batch):
    image = rand(shape, seed=sum(shape))
    with Restorer(dirs["b4"], tile=32, overlap=8, tile_batch=tile_batch) as r:
        out, info = r.restore_info(image)
    n, size = info["tiles"]["count"], tile_batch or 4
    assert np.array_equal(out, image)
    assert info["tiles"]["batch"] == size and info["tiles"]["batches"] == math.ceil(n / size)
    for name in ("vae_encoder", "unet", "vae_decoder"):  # full batches; the rest at the end
        assert batches[name] == [size] * (n // size) + ([n % size] if n % size else [])


def test_default_batch_is_the_engines_largest(dirs):
    with Restorer(dirs["b1"]) as r1, Restorer(dirs["b4"]) as r4:
        assert (r1.tile_batch, r4.tile_batch) == (1, 4)


def test_static_engine_batches_bind_one_set_per_batch_size(dirs, batches):
    image = rand((150, 99, 3))  # 64-px static tiles: a 3x2 grid, batches of 4 and 2
    with Restorer(dirs["static4"]) as r:
        out, info = r.restore_info(image)
        again = r.restore(image[::-1].copy())
        sets = {n: r.engines[n].backend.captured for n in ("saipe", "vae_encoder", "unet")}
    assert np.array_equal(out, image) and np.array_equal(again, image[::-1])
    assert batches["unet"] == [4, 2, 4, 2] and info["tiles"]["count"] == 6
    assert sets == {"saipe": 1, "vae_encoder": 2, "unet": 2}  # reused for the second image


def test_engines_whose_smallest_batch_is_two_get_padded_batches(dirs, batches):
    image = rand((40, 50, 3))  # one tile
    with Restorer(dirs["min2"]) as r:
        out = r.restore(image)
    assert np.array_equal(out, image)
    assert batches["vae_encoder"] == [2]  # the tile and its repeat, whose output is dropped
    with pytest.raises(ValueError, match="--tile-batch 1 is below the engines' smallest batch 2"):
        Restorer(dirs["min2"], tile_batch=1)


def test_batches_keep_the_memory_bound(dirs):
    def extra_peak(r, side):
        image = rand((side, side, 3))
        tracemalloc.start()
        out = r.restore(image)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak - out.nbytes

    with Restorer(dirs["b4"], tile=64, overlap=16) as r:
        large = extra_peak(r, 1024)
    assert large < 1024 * 1024 * 3 * 4 / 4, large  # well under one float copy of the image


def test_progress_counts_every_tile_of_a_batch(dirs):
    seen = []
    with Restorer(dirs["b4"], tile=32, overlap=8) as r:
        info = r.restore_info(rand((70, 100, 3)), progress=lambda d, t: seen.append((d, t)))[1]
    n = info["tiles"]["count"]
    assert info["tiles"]["batches"] < n and seen == [(i, n) for i in range(1, n + 1)]


def test_restore_batch_routes_every_tile_back_to_its_image(dirs, batches):
    images = [rand((70, 100, 3), 1), rand((20, 30, 3), 2), rand((70, 100, 3), 3),
              rand((33, 20), 4), rand((90, 40, 4), 5)]
    with Restorer(dirs["b4"], tile=32, overlap=8) as r:
        outs = r.restore_batch(images)
        tiles = sum(r.restore_info(im)[1]["tiles"]["count"] for im in images)
    assert all(o.shape == i.shape and np.array_equal(o, i) for o, i in zip(outs, images))
    calls = len(batches["unet"]) // 2  # restore_batch's calls, then restore_info's
    assert sum(batches["unet"][:calls]) == tiles and max(batches["unet"]) == 4


# -- the real tiny model -------------------------------------------------------------------------
def test_an_engine_exported_with_batch_1_2_4_gets_batches_of_four(batched, batches):
    assert BATCHED_BATCH[-1] == 4
    image = rand((200, 300, 3))
    with Restorer(batched, threads=1) as r:
        out, info = r.restore_info(image)
        one = Restorer(batched, threads=1, tile_batch=1)
        with one:
            ref = one.restore(image)
    n = info["tiles"]["count"]
    assert r.tile_batch == 4 and n > 4 and max(batches["unet"][:info["tiles"]["batches"]]) == 4
    assert batches["vae_encoder"][:info["tiles"]["batches"]] == \
        [4] * (n // 4) + ([n % 4] if n % 4 else [])
    assert_pixels_close(out, ref, 1)


def test_live1_photo_batched_and_bound_within_one_level_of_todays_path(batched):
    image = _lq("bikes.png", 10)[:256, :384]  # a real photo's crop, several 128 px tiles


    with Restorer(batched, threads=1, io_binding=False, tile_batch=1) as r:
        ref, info = r.restore_info(image)
    assert info["tiles"]["count"] > 4
    for opts in (dict(io_binding=True, tile_batch=1), dict(io_binding=True, tile_batch=None),
                 dict(io_binding=False, tile_batch=3)):
        with Restorer(batched, threads=1, **opts) as r:
            out, got = r.restore_info(image)
        assert_pixels_close(out, ref, 1, msg=str(opts))
        assert got["tiles"]["batches"] == math.ceil(info["tiles"]["count"] / r.tile_batch)


def _distinct_images():
    """Images whose prompts differ (two-tone, gradient, noise, a stripe of each) in sizes that
    mix multi-tile images, whose 128-px tiles are batched across them, with single tiles of
    shapes of their own; with the header QFs below, their taus differ too."""
    two_tone = np.full((200, 300, 3), 30, np.uint8)
    two_tone[:, 150:] = 220
    ramp = np.linspace(0, 255, 180 * 260, dtype=np.float64).reshape(180, 260)
    gradient = np.stack([ramp, ramp[::-1], np.full_like(ramp, 128)], -1).astype(np.uint8)
    return [two_tone, rand((160, 144, 3), 11), gradient, rand((120, 88, 3), 12),
            np.ascontiguousarray(gradient[:96, :128, 0])], [10, 90, 30, 50, 70]


def test_restore_batch_keeps_each_images_prompt_and_tau(batched, tmp_path):
    import shutil
    root = shutil.copytree(batched, tmp_path / "header")
    # A QF table whose taus span the schedule, so a tile restored with another image's tau
    # (or prompt) is far off; the exported tiny model's own table is nearly flat.
    edit_manifest(root, lambda m: m["timestep"].update(
        qf_table={"qf": [10, 90], "tau": [800.0, 100.0]}))
    images, qfs = _distinct_images()
    with Restorer(root, threads=1, timestep="header") as r:
        outs = r.restore_batch(images, qfs)
    with Restorer(root, threads=1, timestep="header", tile_batch=1) as r:
        alone = [r.restore(im, qf) for im, qf in zip(images, qfs)]
        swapped = r.restore(images[0], qfs[1])  # what a mix-up would look like
    assert np.abs(swapped.astype(int) - alone[0].astype(int)).max() > 1
    for o, a in zip(outs, alone):
        assert_pixels_close(o, a, 1)


def test_restore_batch_refuses_mismatched_arguments(dirs):
    with Restorer(dirs["b4"]) as r:
        with pytest.raises(ValueError, match="2 qfs for 1 images"):
            r.restore_batch([rand((8, 8, 3))], [10, 20])
        with pytest.raises(ValueError, match="0 jpegs for 1 images"):
            r.restore_batch([rand((8, 8, 3))], jpegs=[])
        with pytest.raises(ValueError, match="list of arrays"):
            r.restore_batch(rand((8, 8, 3)))


# -- refusals --------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0, -3, 2.0, "4", True])
def test_bad_tile_batch_values_are_refused(dirs, value):
    with pytest.raises(ValueError, match=f"tile_batch={value!r}"):
        Restorer(dirs["b4"], RestoreOptions(tile_batch=value))


def test_tile_batch_above_the_engines_batch_names_both(dirs):
    with pytest.raises(ValueError, match="--tile-batch 5 is above the engines' largest batch 4"):
        Restorer(dirs["b4"], tile_batch=5)
    with pytest.raises(ValueError, match="--tile-batch 2 is above the engines' largest batch 1"):
        Restorer(dirs["b1"], tile_batch=2)


@pytest.mark.parametrize("batch", [{"min": 0, "max": 2}, {"min": 3, "max": 2}, {"max": 2},
                                   {"min": 1, "max": "4"}])
def test_malformed_batch_in_the_manifest_is_refused(tmp_path, batch):
    root = identity_engine(tmp_path / "bad")
    edit_manifest(root, lambda m: m["shapes"].update(batch=batch))
    # The manifest reader or the batch planner refuses it, whichever looks first.
    with pytest.raises(EngineDirError, match="re-export the dir") as e:
        Restorer(root)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("value, message", [
    ("0", "Invalid value for '--tile-batch'"), ("x", "Invalid value for '--tile-batch'"),
    ("9", "--tile-batch 9 is above the engines' largest batch 4")])
def test_cli_refuses_bad_tile_batch_without_a_traceback(dirs, tmp_path, value, message):
    src = tmp_path / "in.png"
    Image.fromarray(rand((40, 40, 3))).save(src)
    res = CliRunner().invoke(main, ["--engine", str(dirs["b4"]), str(src), "--tile-batch", value])
    assert res.exit_code == 2 and message in res.output
    assert "Traceback" not in res.output and not (tmp_path / "in_sodiff.png").exists()


def test_cli_tile_batch_runs(dirs, tmp_path):
    src = tmp_path / "in.png"
    image = rand((70, 100, 3))
    Image.fromarray(image).save(src)
    res = CliRunner().invoke(main, ["--engine", str(dirs["b4"]), str(src), "--tile", "32",
                                    "--overlap", "8", "--tile-batch", "3", "--report"])
    assert res.exit_code == 0, res.output
    assert '"batch": 3' in res.output
    assert np.array_equal(np.asarray(Image.open(tmp_path / "in_sodiff.png")), image)
