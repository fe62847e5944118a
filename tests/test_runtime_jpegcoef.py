"""runtime/jpegcoef.py: the file's own quantized coefficients, read, checked and used by the
exact quantization constraint; the estimate only where they cannot be read."""
import io
import sys

import numpy as np
import pytest
from PIL import Image

from runtime.imageio import decode_image, read_image
from runtime.jpegcoef import read_coefficients, with_coefficients
from runtime.jpegqcs import _D, JpegTables, constrain, tables_of

pytest.importorskip("jpeglib")

STEP = 16  # every step of the known table: half a step (8) is far above the pixels' rounding


def _idct_blocks(coef: np.ndarray) -> np.ndarray:
    hb, wb = coef.shape[:2]
    return (_D.T @ coef @ _D).transpose(0, 2, 1, 3).reshape(hb * 8, wb * 8)


def _known_jpeg(rng, hb=5, wb=7):
    """A grey JPEG written with a known table (every step STEP) from pixels made of known k:
    pixels = IDCT(k q) + 128, rounded, so an encoder's DCT of them is k q within 1 level."""
    k = np.zeros((hb, wb, 8, 8))
    k[..., :3, :3] = rng.integers(-3, 4, (hb, wb, 3, 3))
    k[..., 0, 0] = rng.integers(-4, 5, (hb, wb))
    pixels = np.clip(np.rint(_idct_blocks(k * STEP) + 128), 0, 255).astype(np.uint8)
    assert 0 < pixels.min() and pixels.max() < 255  # nothing clipped: k is the truth
    buf = io.BytesIO()
    Image.fromarray(pixels, "L").save(buf, "JPEG", qtables=[[STEP] * 64])
    return k.astype(np.int16), buf.getvalue()


def test_the_coefficients_read_are_those_written_with_known_tables():
    k, data = _known_jpeg(np.random.default_rng(0))
    img = decode_image(data, "known.jpg")
    assert img.jpeg.tables == ((STEP,) * 64,) and img.jpeg.source == "file"
    assert np.array_equal(img.jpeg.coefficients[0], k)


def test_colour_coefficients_sit_on_each_planes_own_grid():
    rng = np.random.default_rng(1)
    rgb = np.clip(rng.normal(128, 40, (37, 53, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=30)  # 4:2:0, both sides partial MCUs
    img = decode_image(buf.getvalue(), "c.jpg")
    assert [c.shape for c in img.jpeg.coefficients] == [(5, 7, 8, 8), (3, 4, 8, 8),
                                                         (3, 4, 8, 8)]
    # At QF 30 the decoded pixels give the same k almost everywhere (the estimate's premise).
    y = img.array.astype(float) @ np.array([0.299, 0.587, 0.114])
    y = np.pad(y, ((0, 3), (0, 3)), mode="edge") - 128
    q = np.asarray(img.jpeg.tables[0], float).reshape(8, 8)
    est = np.round(_D @ y.reshape(5, 8, 7, 8).transpose(0, 2, 1, 3) @ _D.T / q)
    assert np.mean(est == img.jpeg.coefficients[0]) > 0.95  # 0.974 on this noise


def test_the_exact_projection_uses_the_files_k_not_the_pixels():
    k, data = _known_jpeg(np.random.default_rng(2))
    img = decode_image(data, "known.jpg")
    noisy = np.clip(img.array + np.random.default_rng(3).normal(0, 12, img.array.shape), 0,
                    255).astype(np.uint8)
    exact, fooled = noisy.copy(), noisy.copy()
    constrain(exact, img.array, img.jpeg)
    constrain(fooled, np.zeros_like(img.array), img.jpeg)  # pixels that say nothing
    assert np.array_equal(exact, fooled)
    coef = _D @ (exact.astype(float) - 128).reshape(5, 8, 7, 8).transpose(0, 2, 1, 3) @ _D.T
    assert np.abs(coef / STEP - k).max() <= 0.5 + 4.0 / STEP  # in k's cells, up to rounding
    estimated = noisy.copy()
    constrain(estimated, np.zeros_like(img.array), JpegTables(img.jpeg.tables,
                                                                img.jpeg.factors))
    assert not np.array_equal(estimated, exact)  # without k, the pixels decide


def test_coefficients_of_another_image_are_refused():
    _, data = _known_jpeg(np.random.default_rng(4))
    with Image.open(io.BytesIO(data)) as im:
        tables = tables_of(im)
    assert read_coefficients(data, tables, (40, 56)) is not None
    assert read_coefficients(data, tables, (56, 40)) is None  # the grid turned: not this one
    other = JpegTables(((8,) * 64,), ((1, 1),))
    assert read_coefficients(data, other, (40, 56)) is None  # tables differ
    wrong = with_coefficients(tables, data, (40, 56))
    with pytest.raises(ValueError, match="coefficients of shapes"):
        constrain(np.zeros((48, 56), np.uint8), np.zeros((48, 56), np.uint8), wrong)


def test_without_jpeglib_the_estimate_runs_and_the_report_says_so(tmp_path, monkeypatch):
    from runtime.batch import report_line
    _, data = _known_jpeg(np.random.default_rng(5))
    path = tmp_path / "a.jpg"
    path.write_bytes(data)
    assert read_image(path).jpeg.source == "file"  # from a path as from bytes
    monkeypatch.setitem(sys.modules, "jpeglib", None)  # import jpeglib now fails
    img = read_image(path)
    assert img.jpeg is not None and img.jpeg.coefficients is None
    assert img.jpeg.source == "estimated"
    assert report_line(constraint_k=img.jpeg.source)["constraint_k"] == "estimated"


def test_a_pil_jpeg_opened_from_a_file_brings_its_coefficients(tmp_path):
    from fixtures.runtime_engines import identity_engine
    from runtime import Restorer
    from test_runtime_jpegqcs import _blur_decoder
    rng = np.random.default_rng(6)
    rgb = np.clip(rng.normal(128, 50, (40, 56, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "n.jpg", quality=95)  # where the estimate errs
    img = read_image(tmp_path / "n.jpg")
    with Restorer(identity_engine(tmp_path / "engine")) as r:
        _blur_decoder(r)
        exact = r.restore(img.array, jpeg=img.jpeg)
        estimated = r.restore(img.array, jpeg=JpegTables(img.jpeg.tables, img.jpeg.factors))
        with Image.open(tmp_path / "n.jpg") as im:
            got = np.asarray(r.restore(im))
    assert not np.array_equal(exact, estimated)
    assert np.array_equal(got, exact)
