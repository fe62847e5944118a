"""runtime/jpegqcs.py: the JPEG quantization constraint, and where the runtime applies it."""
import io

import numpy as np
import pytest
from PIL import Image

from conftest import shared_data
from runtime import Restorer
from runtime.imageio import decode_image
from runtime.jpegqcs import _D, JpegTables, constrain, tables_of
from tolerance import assert_pixels_close


def _jpeg(array, quality, **kw):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "JPEG", quality=quality, **kw)
    data = buf.getvalue()
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im).copy(), tables_of(im), data


@pytest.fixture(scope="module")
def photo():
    with Image.open(shared_data("LIVE1_color") / "bikes.png") as im:
        return np.asarray(im.convert("RGB"))[:100, :133].copy()  # partial MCUs on both sides


@pytest.mark.parametrize("subsampling,factor", [(2, (2, 2)), (1, (1, 2)), (0, (1, 1))])
def test_tables_of_a_pillow_jpeg_are_the_ijg_tables(photo, subsampling, factor):
    _, tables, _ = _jpeg(photo, 20, subsampling=subsampling)
    name = {2: "4:2:0", 1: "4:2:2", 0: "4:4:4"}[subsampling]
    assert tables == JpegTables.ijg(20, subsampling=name)
    assert tables.factors == ((1, 1), factor, factor)
    grey = _jpeg(photo[..., 1].copy(), 20)[1]
    assert grey == JpegTables.ijg(20, grey=True) and grey.grey


def test_tables_of_non_jpegs_and_rgb_coded_jpegs_are_none(photo):
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, "PNG")
    with Image.open(buf) as im:
        assert tables_of(im) is None
    _, _, data = _jpeg(photo, 50)
    with Image.open(io.BytesIO(data)) as im:
        assert tables_of(im) is not None
        im.info["adobe_transform"] = 0  # an Adobe JPEG that stores RGB planes
        assert tables_of(im) is None


@pytest.mark.parametrize("grey", [False, True])
def test_a_decoded_jpeg_is_its_own_projection(photo, grey):
    image = photo[..., 0].copy() if grey else photo
    lq, tables, _ = _jpeg(image, 10)
    out = lq.copy()
    constrain(out, lq, tables)
    assert_pixels_close(out, lq, 1)
    assert np.mean(out != lq) < 0.01


def _blocks(plane):
    h, w = (plane.shape[0] // 8) * 8, (plane.shape[1] // 8) * 8
    b = plane[:h, :w].astype(float) - 128
    return _D @ b.reshape(h // 8, 8, w // 8, 8).transpose(0, 2, 1, 3) @ _D.T


def test_projection_lands_in_the_intervals_and_moves_towards_the_original(photo):
    clean = photo[..., 1].copy()
    lq, tables, _ = _jpeg(clean, 50)
    noisy = np.clip(clean + np.random.default_rng(0).normal(0, 20, clean.shape), 0, 255
                    ).astype(np.uint8)
    out = noisy.copy()
    constrain(out, lq, tables)
    q = np.asarray(tables.tables[0], float).reshape(8, 8)
    k = np.round(_blocks(lq) / q)
    outside = lambda a: np.abs(_blocks(a) / q - k) > 0.5 + 2 / q  # noqa: E731 (uint8 rounding)
    # 26% of the noisy image's coefficients are outside their intervals, 0.8% after (the
    # uint8 rounding and clipping of the output).
    assert outside(noisy).mean() > 0.2 and outside(out).mean() < 0.02
    err = lambda a: np.mean((a.astype(float) - clean) ** 2)  # noqa: E731
    assert err(out) < 0.8 * err(noisy)  # a projection onto a set holding the original


def test_colour_projection_helps_a_blurred_restoration(photo):
    lq, tables, _ = _jpeg(photo, 10)
    from PIL import ImageFilter
    blurred = np.asarray(Image.fromarray(photo).filter(ImageFilter.GaussianBlur(1.5)))
    out = blurred.copy()
    constrain(out, lq, tables)
    err = lambda a: np.mean((a.astype(float) - photo) ** 2)  # noqa: E731
    assert err(out) < err(blurred)


@pytest.mark.parametrize("image,tables,match", [
    (np.zeros((8, 8, 3), np.uint16), JpegTables.ijg(10), "8-bit"),
    (np.zeros((8, 8, 3), np.uint8), JpegTables.ijg(10, grey=True), "plane"),
    (np.zeros((8, 8), np.uint8), JpegTables.ijg(10), "plane"),
])
def test_tables_that_cannot_belong_to_the_image_are_refused(image, tables, match):
    with pytest.raises(ValueError, match=match):
        constrain(image.copy(), image, tables)


@pytest.mark.parametrize("quality,subsampling", [(0, "4:2:0"), (101, "4:2:0"), (True, "4:2:0"),
                                                 (10, "4:1:1")])
def test_bad_ijg_arguments_are_named(quality, subsampling):
    with pytest.raises(ValueError, match="quality=|subsampling="):
        JpegTables.ijg(quality, subsampling=subsampling)


# -- in the Restorer ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from fixtures.runtime_engines import identity_engine
    return identity_engine(tmp_path_factory.mktemp("qcs") / "dyn")


def _blur_decoder(r):
    """The identity decoder, blurred: a restoration the constraint has something to fix in."""
    from runtime.backends import Component, host_tensor

    class Blur:
        fetch = staticmethod(Component.fetch)

        def run(self, **feeds):
            z = feeds["clean_latent"].to_host().astype(np.float32)
            return {"image": host_tensor((z + np.roll(z, 1, -1) + np.roll(z, 1, -2)) / 3)}

        def close(self):
            pass
    r.engines["vae_decoder"].close()
    r.engines.components["vae_decoder"] = Blur()


@pytest.mark.parametrize("tile", [None, 32])
def test_restorer_applies_the_constraint_when_given_tables(engine, photo, tile):
    lq, tables, _ = _jpeg(photo[:60, :70].copy(), 10)
    with Restorer(engine, tile=tile, overlap=8 if tile else None) as r:
        _blur_decoder(r)
        plain, info = r.restore_info(lq)
        projected, info_on = r.restore_info(lq, jpeg=tables)
    assert not info["jpeg_constraint"] and info_on["jpeg_constraint"]
    expected = plain.copy()
    constrain(expected, lq, tables)
    assert not np.array_equal(plain, projected) and np.array_equal(projected, expected)
    with Restorer(engine, jpeg_constraint=False) as r:
        _blur_decoder(r)
        out, info = r.restore_info(lq, jpeg=tables)
    assert not info["jpeg_constraint"] and np.array_equal(out, r_plain(engine, lq))


def r_plain(engine, lq):
    with Restorer(engine) as r:
        _blur_decoder(r)
        return r.restore(lq)


def test_restore_batch_and_pil_jpegs_carry_their_tables(engine, photo):
    lq, tables, data = _jpeg(photo[:40, :56].copy(), 10)
    with Restorer(engine) as r:
        _blur_decoder(r)
        one = r.restore_info(lq, jpeg=tables)[0]
        assert np.array_equal(r.restore_batch([lq, lq], jpegs=[tables, None])[0], one)
        with Image.open(io.BytesIO(data)) as im:
            assert np.array_equal(np.asarray(r.restore(im)), one)
        with pytest.raises(ValueError, match="expected runtime.JpegTables"):
            r.restore(lq, jpeg={"luma": 1})


def test_decoded_files_carry_tables_also_when_rotated(photo):
    _, tables, data = _jpeg(photo, 30)
    assert decode_image(data, "a.jpg").jpeg == tables
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the tables hold on the stored grid, which the Restorer uses
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, "JPEG", quality=30, exif=exif.tobytes())
    rotated = decode_image(buf.getvalue(), "b.jpg")
    assert rotated.jpeg.tables == tables.tables and rotated.jpeg.orientation == 6
    assert rotated.array.shape == (photo.shape[1], photo.shape[0], 3)
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, "PNG")
    assert decode_image(buf.getvalue(), "c.png").jpeg is None
