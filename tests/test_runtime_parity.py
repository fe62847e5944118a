"""The runtime against the PyTorch pipeline (SODiff.restore) on the tiny checkpoint exported by
sodiff-export: within 1/255 per pixel on LIVE1 crops, torch-free. Slow: the export alone takes
about 40 s on 2 CPU cores."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import BLOCK_TORCH, shared_data
from fixtures.runtime_engines import tiny_engine
from runtime import Restorer
from runtime.imageio import read_image
from tolerance import assert_pixels_close

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
# (LIVE1 image, top, left, height, width, JPEG quality): odd sizes exercise the padding.
CROPS = [("bikes.png", 100, 200, 70, 91, 10), ("monarch.png", 200, 300, 128, 128, 30),
         ("parrots.png", 50, 60, 97, 120, 20)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_engine(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def model(tiny):
    from sodiff.checkpoint import load
    return load(tiny[1]).eval()


def lq_crop(name, top, left, h, w, quality):
    from sodiff.jpeg import compress
    with Image.open(shared_data("LIVE1_color") / name) as im:
        clean = np.asarray(im.convert("RGB"))[top:top + h, left:left + w].copy()
    return compress(clean, quality)[0]


def reference(model, image):
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        out = model.restore(x)
        tau = model.timestep(x)[0]
    u8 = ((out[0].permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    return u8, float(tau)


WHOLE = [("bikes.png", 10), ("parrots.png", 20)]  # whole LIVE1 photos (768x512), untiled


@pytest.mark.parametrize("name, quality", WHOLE, ids=[w[0] for w in WHOLE])
def test_whole_live1_photos_match_pytorch_within_one_level(tiny, model, name, quality):
    from sodiff.jpeg import compress
    with Image.open(shared_data("LIVE1_color") / name) as im:
        image = compress(np.asarray(im.convert("RGB")), quality)[0]
    ref, tau = reference(model, image)
    with Restorer(tiny[0]) as r:
        out, info = r.restore_info(image)
    assert info["tiles"]["count"] == 1 and info["tau"] == pytest.approx(tau, abs=1e-2)
    assert_pixels_close(out, ref, 1)


@pytest.mark.parametrize("crop", CROPS, ids=[c[0] for c in CROPS])
def test_restorer_matches_pytorch_within_one_level(tiny, model, crop):
    image = lq_crop(*crop)
    ref, tau = reference(model, image)
    with Restorer(tiny[0]) as r:
        out, info = r.restore_info(image)
    assert info["tiles"]["count"] == 1 and info["tau"] == pytest.approx(tau, abs=1e-2)
    assert_pixels_close(out, ref, 1)
    assert np.abs(out.astype(int) - image.astype(int)).mean() > 1  # the model did something


def test_a_tile_covering_the_image_equals_untiled_exactly(tiny):
    image = lq_crop(*CROPS[2])
    with Restorer(tiny[0]) as r:
        untiled = r.restore(image)
    with Restorer(tiny[0], tile=120, overlap=8) as r:
        covering, info = r.restore_info(image)
    assert info["tiles"]["count"] == 1 and np.array_equal(covering, untiled)
    with Restorer(tiny[0], tile=64, overlap=16) as r:
        tiled, info = r.restore_info(image)
    assert info["tiles"]["grid"] == [2, 3] and tiled.shape == image.shape
    assert not np.array_equal(tiled, untiled)  # the small tiles really were used


def test_predictor_crops_and_header_timestep_on_the_real_engine(tiny, model):
    image = lq_crop("bikes.png", 0, 0, 200, 260, 10)
    with Restorer(tiny[0], tile=128) as r:  # smaller than the image: several tiles
        info = r.restore_info(image)[1]
    assert info["tiles"]["count"] > 1 and 0 <= info["tau"] <= 999
    with Restorer(tiny[0], timestep="header") as r:
        table = r.manifest.qf_table
        info = r.restore_info(image[:64, :64], qf=10)[1]
    assert info["tau"] == pytest.approx(float(np.interp(10, *table)))


@pytest.mark.parametrize("shape", [(1, 1, 3), (7, 13, 3), (9, 130), (140, 8, 4)])
def test_tiny_and_thin_images_restore_without_error(tiny, shape):
    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    with Restorer(tiny[0]) as r:
        out = r.restore(image)
    assert out.shape == image.shape and out.dtype == np.uint8


def test_cli_restores_with_torch_unimportable_like_the_api(tiny, tmp_path):
    image = lq_crop(*CROPS[0])
    Image.fromarray(image).save(tmp_path / "a.jpg", quality=95)
    img = read_image(tmp_path / "a.jpg")
    with Restorer(tiny[0]) as r:  # the CLI reads the file's tables and coefficients
        expected = r.restore(img.array, jpeg=img.jpeg)
        assert not np.array_equal(expected, r.restore(img.array))
    code = BLOCK_TORCH + f"""
import sys
from runtime.cli import main
main(['--engine', {str(tiny[0])!r}, {str(tmp_path / 'a.jpg')!r}, '-o', {str(tmp_path / 'o.png')!r}])
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    with Image.open(tmp_path / "o.png") as im:
        assert np.array_equal(np.asarray(im), expected)
