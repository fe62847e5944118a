"""Restorer on identity engine dirs: tiling, padding, blending, channels, timestep sources and
memory, where any mistake changes pixels (the engines pass pixels through unchanged)."""
import tracemalloc

import numpy as np
import pytest

from fixtures.runtime_engines import identity_engine
from runtime import Restorer
from runtime.backends import Component, host_tensor


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("identity")
    return {"dyn": identity_engine(base / "dyn"),
            "fp16_static": identity_engine(base / "fp16", dtype="float16", static=True),
            "fixed": identity_engine(base / "fixed", predicted=False),
            "no_table": identity_engine(base / "notable", qf_table=False)}


def rand(shape, dtype=np.uint8, seed=0):
    top = np.iinfo(dtype).max
    return np.random.default_rng(seed).integers(0, top + 1, shape, dtype=dtype)


@pytest.mark.parametrize("shape", [(1, 1, 3), (7, 13, 3), (8, 8, 3), (64, 64, 3), (65, 130, 3),
                                   (200, 77, 3), (33, 20)])
@pytest.mark.parametrize("tile,overlap", [(None, None), (32, 8), (16, 0), (64, 32)])
def test_identity_engine_returns_the_input_for_any_tiling(dirs, shape, tile, overlap):
    with Restorer(dirs["dyn"], tile=tile, overlap=overlap) as r:
        image = rand(shape, seed=sum(shape))
        out, info = r.restore_info(image)
    assert out.dtype == image.dtype and np.array_equal(out, image)
    side = tile or 64
    assert info["tiles"]["count"] == (1 if max(shape[:2]) <= side else info["tiles"]["count"])
    if max(shape[:2]) > side:
        assert info["tiles"]["count"] > 1


@pytest.mark.parametrize("shape,dtype", [((50, 70, 4), np.uint8), ((40, 90, 2), np.uint8),
                                         ((70, 45), np.uint16), ((30, 33, 3), np.uint16),
                                         ((30, 33, 1), np.uint8)])
def test_channels_alpha_and_16_bit(dirs, shape, dtype):
    image = rand(shape, dtype)
    with Restorer(dirs["dyn"], tile=32, overlap=8) as r:
        out = r.restore(image)
    assert out.shape == image.shape and out.dtype == dtype and np.array_equal(out, image)


class _BlackDecoder:
    """Stands in for the decoder: every pixel black, so only the alpha can survive."""

    fetch = staticmethod(Component.fetch)

    def run(self, **feeds):
        return {"image": host_tensor(np.full(feeds["clean_latent"].shape, -1.0, np.float32))}

    def close(self):
        pass


class _CastDecoder:
    """The identity decoder plus a colour cast that grows to the right, as a UNet's might."""

    fetch = staticmethod(Component.fetch)

    def run(self, **feeds):
        z = feeds["clean_latent"].to_host().astype(np.float32)
        ramp = np.linspace(0.0, 0.1, z.shape[-1], dtype=np.float32)
        return {"image": host_tensor(z + np.array([0.2, -0.1, 0.05], np.float32)[:, None, None]
                                     + ramp)}

    def close(self):
        pass


def _cast_restore(dirs, image, **opts):
    with Restorer(dirs["dyn"], **opts) as r:
        r.engines["vae_decoder"].close()
        r.engines.components["vae_decoder"] = _CastDecoder()
        return r.restore(image)


@pytest.mark.parametrize("tile,overlap", [(None, None), (32, 8)])
def test_each_tile_keeps_the_inputs_mean_colour(dirs, tile, overlap):
    image = rand((50, 70, 3), seed=5) // 2 + 64  # no clipping near the ends of the range
    kept = _cast_restore(dirs, image, tile=tile, overlap=overlap).astype(float)
    cast = _cast_restore(dirs, image, tile=tile, overlap=overlap,
                         keep_colour=False).astype(float)
    means = lambda a: a.mean(axis=(0, 1))  # noqa: E731
    assert np.abs(means(cast) - means(image)).max() > 8  # the cast is there without it
    assert np.abs(means(kept) - means(image)).max() < 0.6  # and gone with it
    # Only the means move: the ramp inside each tile (its detail) stays.
    assert np.abs((kept - kept.mean((0, 1))) - (cast - cast.mean((0, 1)))).mean() < 3


def test_alpha_is_passed_through_even_when_colour_changes(dirs):
    image = rand((20, 30, 4))
    with Restorer(dirs["dyn"], keep_colour=False) as r:
        r.engines["vae_decoder"].close()
        r.engines.components["vae_decoder"] = _BlackDecoder()
        out = r.restore(image)
    assert (out[..., :3] == 0).all() and np.array_equal(out[..., 3], image[..., 3])


def test_fp16_static_engine_pads_small_images_and_tiles_large_ones(dirs):
    with Restorer(dirs["fp16_static"]) as r:
        for shape in [(5, 9, 3), (64, 64, 3), (150, 99, 3)]:
            image = rand(shape)
            out, info = r.restore_info(image)
            assert np.array_equal(out, image)
            assert info["tiles"]["tile"] == [64, 64]


def test_prompt_and_tau_are_computed_once_per_image(dirs, monkeypatch):
    calls = {}

    def counted(real):
        def counting(self, **feeds):
            calls[self.spec.name] = calls.get(self.spec.name, 0) + 1
            return real(self, **feeds)
        return counting

    # SAIPE and the predictor take numpy (__call__); tiles go the device-resident way (run).
    monkeypatch.setattr(Component, "__call__", counted(Component.__call__))
    monkeypatch.setattr(Component, "run", counted(Component.run))
    with Restorer(dirs["dyn"], tile=32, overlap=8) as r:
        _, info = r.restore_info(rand((100, 70, 3)))
    assert calls["saipe"] == 1
    assert calls["vae_encoder"] == calls["unet"] == calls["vae_decoder"] == info["tiles"]["count"]
    assert info["tiles"]["count"] == 12 and calls["predictor"] == 4 * 3  # 32-pixel crops


def test_predictor_sees_the_unpadded_native_image(dirs):
    image = rand((37, 45, 3), seed=3)
    with Restorer(dirs["dyn"]) as r:
        info = r.restore_info(image)[1]
    x = image.astype(np.float32) / np.float32(127.5) - 1
    assert info["tau_source"] == "predictor"
    assert info["tau"] == pytest.approx(500 + 100 * float(x.mean()), abs=1e-3)
    assert info["qf_predicted"] == pytest.approx(50 + 10 * float(x.mean()), abs=1e-3)


def test_header_mode_maps_qf_through_the_manifest_table(dirs):
    image = rand((20, 20, 3))
    with Restorer(dirs["dyn"], timestep="header") as r:
        info = r.restore_info(image, qf=30)[1]
        assert info["tau"] == pytest.approx(550.0) and info["tau_source"] == "header"
        assert r.restore_info(image, qf=95)[1]["tau"] == pytest.approx(100.0)  # clamped
        with pytest.raises(ValueError, match="quantization tables"):
            r.restore(image)


@pytest.mark.parametrize("which,message", [("fixed", "bakes tau=250"),
                                           ("no_table", "no QF-to-tau table")])
def test_header_mode_is_refused_where_it_cannot_work(dirs, which, message):
    with pytest.raises(ValueError, match=message):
        Restorer(dirs[which], timestep="header")


def test_fixed_dir_uses_its_baked_tau_without_a_predictor(dirs):
    with Restorer(dirs["fixed"]) as r:
        assert "predictor" not in r.engines
        out, info = r.restore_info(rand((30, 30, 3)))
    assert info["tau"] == 250.0 and info["tau_source"] == "fixed"


@pytest.mark.parametrize("image,match", [
    (np.zeros((8, 8, 3), np.float32), "uint8 or uint16"),
    (np.zeros((0, 8, 3), np.uint8), "non-empty"),
    (np.zeros((8, 8, 5), np.uint8), "HxWx4"),
    (np.zeros((8,), np.uint8), "HxW"),
    ([[1, 2], [3, 4]], "numpy array"),
])
def test_bad_arrays_are_refused_with_the_reason(dirs, image, match):
    with Restorer(dirs["dyn"]) as r, pytest.raises(ValueError, match=match):
        r.restore(image)


@pytest.mark.parametrize("opts,match", [({"tile": 60}, "multiple of 8"),
                                        ({"tile": 128}, "outside the engines' shapes"),
                                        ({"tile": 32, "overlap": 20}, "too large")])
def test_tile_options_are_checked_against_the_engines(dirs, opts, match):
    with pytest.raises(ValueError, match=match):
        Restorer(dirs["dyn"], **opts)


def test_static_engines_refuse_another_tile(dirs):
    with pytest.raises(ValueError, match="static shape 64x64"):
        Restorer(dirs["fp16_static"], tile=32)


def _extra_peak(r, side):
    image = rand((side, side, 3))
    tracemalloc.start()
    out = r.restore(image)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak - out.nbytes  # what the restore held beyond its output


def test_tiled_memory_does_not_hold_full_size_float_copies(dirs):
    with Restorer(dirs["dyn"], tile=64, overlap=16) as r:
        small, large = _extra_peak(r, 128), _extra_peak(r, 1024)
    full_float = 1024 * 1024 * 3 * 4  # one float32 copy of the large image: 12.6 MB
    assert large < full_float / 4, (small, large)


def test_progress_follows_every_tile(dirs):
    seen = []
    with Restorer(dirs["dyn"], tile=32, overlap=8) as r:
        info = r.restore_info(rand((70, 100, 3)), progress=lambda d, t: seen.append((d, t)))[1]
    n = info["tiles"]["count"]
    assert n > 1 and seen == [(i, n) for i in range(1, n + 1)]
