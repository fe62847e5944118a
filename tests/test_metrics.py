import math

import numpy as np
import pytest
from PIL import Image

from conftest import SHARED_DATA
from sodiff import jpeg, metrics

DATA = SHARED_DATA


def _img(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.mark.parametrize("shape", [(32, 32), (32, 32, 3)])
def test_identical_images_psnr_inf_ssim_one(shape):
    a = _img(shape)
    assert metrics.psnr(a, a) == math.inf
    assert metrics.ssim(a, a) == pytest.approx(1.0, abs=1e-12)


def test_known_mse_gives_known_psnr():
    a = np.full((16, 16, 3), 100, np.uint8)
    b = a + 5  # MSE = 25 -> 10 log10(255^2 / 25) = 20 log10(51)
    assert metrics.psnr(a, b) == pytest.approx(20 * math.log10(51), abs=1e-12)
    assert metrics.psnr(a / 255, b / 255, data_range=1.0) == pytest.approx(20 * math.log10(51))


def test_metrics_reject_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        metrics.psnr(np.zeros((16, 16)), np.zeros((16, 17)))
    with pytest.raises(ValueError, match="HxW"):
        metrics.ssim(np.zeros((16, 16, 4)), np.zeros((16, 16, 4)))
    with pytest.raises(ValueError, match="11x11"):
        metrics.ssim(np.zeros((10, 16)), np.zeros((10, 16)))


def test_ssim_constant_offset_matches_closed_form():
    # Constant images: sigmas are 0, so SSIM = (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1).
    a = np.full((20, 20), 100.0)
    b = a + 5
    c1 = (0.01 * 255) ** 2
    expected = (2 * 100 * 105 + c1) / (100 ** 2 + 105 ** 2 + c1)
    assert metrics.ssim(a, b) == pytest.approx(expected, rel=1e-12)


def test_ssim_colour_is_mean_of_channels():
    a, b = _img((24, 24, 3), 1), _img((24, 24, 3), 2)
    per_channel = [metrics.ssim(a[..., c], b[..., c]) for c in range(3)]
    assert metrics.ssim(a, b) == pytest.approx(np.mean(per_channel), rel=1e-12)
    assert metrics.ssim(a, b) < 0.2  # unrelated noise


def test_gaussian_window_matches_cv2_kernel_values():
    # cv2.getGaussianKernel(11, 1.5): centre and edge values (normalised to sum 1).
    k = metrics._gaussian_window()
    assert k.sum() == pytest.approx(1.0)
    assert k[5] == pytest.approx(0.26601172, rel=1e-6)
    assert k[0] == pytest.approx(0.00102838, rel=1e-5)


def test_bef_step_at_block_boundary():
    # 16x16, columns 0..7 = 0 and 8..15 = 10: one step of 10 exactly at the 7|8 column boundary.
    # Squared differences: 100 for the 16 pairs (row r, cols 7|8), 0 everywhere else.
    # Boundary count (FBCNN): H*(W//8-1) + W*(H//8-1) = 16*1 + 16*1 = 32 -> D_B = 1600/32 = 50.
    # Non-boundary count: 16*15 + 16*15 - 32 = 448, sum 0 -> D_N = 0.
    # Scale log2(8)/log2(16) = 3/4 -> BEF = 0.75 * 50 = 37.5.
    y = np.zeros((16, 16))
    y[:, 8:] = 10
    assert metrics.bef(y) == pytest.approx(37.5, rel=1e-12)


def test_bef_step_off_boundary_is_zero():
    # Same step at columns 3|4: D_B = 0 <= D_N, so no blocking.
    y = np.zeros((16, 16))
    y[:, 4:] = 10
    assert metrics.bef(y) == 0.0


def test_bef_fbcnn_boundary_count_for_non_multiple_of_8():
    # W = 20: boundary columns 7|8 and 15|16 (2 of them), but FBCNN counts H*(20//8 - 1) = 16.
    # Step of 10 at 7|8 only: boundary sum 100*16; count 16 + 20*(16//8 - 1) = 36.
    # Non-boundary: 16*19 + 20*15 - 36 = 568, sum 0. Scale 3/4 -> BEF = 0.75 * 1600/36.
    y = np.zeros((16, 20))
    y[:, 8:] = 10
    assert metrics.bef(y) == pytest.approx(0.75 * 1600 / 36, rel=1e-12)


def test_bef_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        metrics.bef(np.zeros((16, 16, 3)))
    with pytest.raises(ValueError, match="16x16"):
        metrics.bef(np.zeros((8, 32)))


def test_psnr_b_equals_psnr_without_blocking_and_is_lower_with_it():
    ref = np.full((16, 16), 50.0)
    smooth = ref + 5  # no blocking: BEF 0
    assert metrics.psnr_b(smooth, ref) == pytest.approx(metrics.psnr(smooth, ref))
    blocky = ref.copy()
    blocky[:, 8:] += 10  # MSE 50, BEF 37.5 (see test_bef_step_at_block_boundary)
    assert metrics.psnr_b(blocky, ref) == pytest.approx(10 * math.log10(255 ** 2 / 87.5))
    assert metrics.psnr_b(blocky, ref) < metrics.psnr(blocky, ref)


def test_psnr_b_uses_bef_of_restored_y_channel():
    ref = np.full((16, 16, 3), 50.0)
    restored = ref.copy()
    restored[:, 8:, :] += 10  # grey step: Y step = 10 * 219/255
    y_step = 10 * (65.481 + 128.553 + 24.966) / 255
    bef_y = 0.75 * (16 * y_step ** 2) / 32
    expected = 10 * math.log10(255 ** 2 / (50 + bef_y))
    assert metrics.psnr_b(restored, ref) == pytest.approx(expected, rel=1e-12)
    # BEF is taken on the first (restored) argument only: swapped, the blocking is in the
    # reference and the "restored" image is flat.
    assert metrics.psnr_b(ref, restored) == pytest.approx(metrics.psnr(ref, restored))


def test_rgb_to_y_white_black():
    img = np.array([[[255, 255, 255], [0, 0, 0]]], np.uint8)
    y = metrics.rgb_to_y(img)
    assert y.dtype == np.float64 and y.shape == (1, 2)
    assert y[0, 0] == pytest.approx(235.0) and y[0, 1] == pytest.approx(16.0)
    with pytest.raises(ValueError, match="HxWx3"):
        metrics.rgb_to_y(np.zeros((4, 4)))


def _jpeg_only_scores(folder: str, quality: int, grey: bool) -> np.ndarray:
    paths = sorted((DATA / folder).glob("*.png"))
    assert paths, f"no PNGs in {DATA / folder}"
    rows = []
    for path in paths:
        with Image.open(path) as im:
            clean = np.asarray(im.convert("L" if grey else "RGB"))
        decoded, _ = jpeg.compress(clean, quality, "4:2:0")
        rows.append([metrics.psnr(decoded, clean), metrics.ssim(decoded, clean),
                     metrics.psnr_b(decoded, clean)])
    return np.mean(rows, axis=0)


needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"benchmark data absent: {DATA}")


@needs_data
@pytest.mark.parametrize("folder, quality, grey, expected", [
    # JPEG-only baselines of docs/data.md (PSNR dB, SSIM, PSNR-B dB).
    ("Classic5", 10, True, (27.82, 0.760, 25.21)),
    ("LIVE1_color", 10, False, (25.69, 0.743, 24.20)),
])
def test_jpeg_only_baseline_matches_readme(folder, quality, grey, expected):
    psnr, ssim, psnrb = _jpeg_only_scores(folder, quality, grey)
    assert psnr == pytest.approx(expected[0], abs=0.02)
    assert ssim == pytest.approx(expected[1], abs=0.002)
    assert psnrb == pytest.approx(expected[2], abs=0.02)
