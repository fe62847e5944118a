"""Classic JPEG-artifact-removal metrics (numpy only), FBCNN conventions.

All metrics take images in [0, 255] (uint8 or float), HxW (grey) or HxWx3 (RGB), and compute in
float64. No border crop. Benchmark averages are means of the per-image values.

- `psnr`: one MSE over all pixels and channels; identical images give +inf.
- `ssim`: Wang et al. with an 11x11 Gaussian (sigma 1.5) and 'valid' filtering, as FBCNN's
  `calculate_ssim` (cv2.filter2D then a 5-pixel crop); RGB = mean of the per-channel SSIMs.
- `bef`: FBCNN's `_blocking_effect_factor` (including its boundary counts, see `bef`).
- `psnr_b`: 10 log10(255^2 / (MSE + BEF)), MSE over all channels, BEF of the restored image's
  BT.601 Y channel (the image itself when grey).
"""
from __future__ import annotations

import numpy as np

BLOCK = 8


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"images must have the same shape, got {a.shape} and {b.shape}")
    _check_layout(a)
    return a, b


def _check_layout(img: np.ndarray) -> None:
    if not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)):
        raise ValueError(f"image must be HxW or HxWx3, got shape {img.shape}")


def psnr(a, b, data_range: float = 255.0) -> float:
    """PSNR in dB over all pixels and channels; +inf for identical images."""
    a, b = _pair(a, b)
    mse = np.mean((a - b) ** 2)
    if mse == 0:
        return float("inf")
    return float(10.0 * np.log10(data_range ** 2 / mse))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    # Same 1-D kernel as cv2.getGaussianKernel(11, 1.5); the 2-D window is its outer product,
    # so filtering is done separably.
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    k = np.exp(-(x ** 2) / (2 * sigma ** 2))
    return k / k.sum()


def _filter_valid(img: np.ndarray, k: np.ndarray) -> np.ndarray:
    """'valid' separable filtering of a 2-D image with the symmetric 1-D kernel `k`."""
    n = len(k)
    h, w = img.shape
    rows = sum(k[i] * img[i:h - n + 1 + i, :] for i in range(n))
    return sum(k[i] * rows[:, i:w - n + 1 + i] for i in range(n))


def _ssim_channel(a: np.ndarray, b: np.ndarray) -> float:
    c1 = (0.01 * 255) ** 2
    c2 = (0.03 * 255) ** 2
    k = _gaussian_window()
    mu_a, mu_b = _filter_valid(a, k), _filter_valid(b, k)
    var_a = _filter_valid(a * a, k) - mu_a ** 2
    var_b = _filter_valid(b * b, k) - mu_b ** 2
    cov = _filter_valid(a * b, k) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(ssim_map.mean())


def ssim(a, b) -> float:
    """SSIM (Wang et al. 2004) of two [0, 255] images; RGB = mean over the three channels.

    Images must be at least 11x11 (valid filtering with the 11x11 window).
    """
    a, b = _pair(a, b)
    if min(a.shape[:2]) < 11:
        raise ValueError(f"ssim needs images of at least 11x11, got shape {a.shape}")
    if a.ndim == 2:
        return _ssim_channel(a, b)
    return float(np.mean([_ssim_channel(a[..., c], b[..., c]) for c in range(3)]))


def rgb_to_y(img) -> np.ndarray:
    """ITU-R BT.601 studio-range luma, Matlab `rgb2ycbcr` style, as float64 in [16, 235].

    Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255 with R, G, B in [0, 255]
    (i.e. the usual formula for R, G, B in [0, 1]). Not rounded.
    """
    img = np.asarray(img, dtype=np.float64)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"rgb_to_y needs an HxWx3 image, got shape {img.shape}")
    return img @ np.array([65.481, 128.553, 24.966]) / 255.0 + 16.0


def bef(y) -> float:
    """Blocking effect factor of a 2-D image in [0, 255] (FBCNN `_blocking_effect_factor`).

    D_B = mean squared difference across 8x8 block boundaries (between columns 7|8, 15|16, ...
    and likewise rows), D_N = the same over all other adjacent pairs,
    BEF = log2(8) / log2(min(H, W)) * max(D_B - D_N, 0).
    As in FBCNN, the boundary counts used for the means are H*(W//8 - 1) + W*(H//8 - 1), which
    undercounts by one line per axis when the size is not a multiple of 8 (e.g. W = 634 has 79
    boundary columns but counts 78); kept so numbers stay comparable.
    """
    y = np.asarray(y, dtype=np.float64)
    if y.ndim != 2:
        raise ValueError(f"bef needs a 2-D (single-channel) image, got shape {y.shape}")
    h, w = y.shape
    if min(h, w) < 2 * BLOCK:
        raise ValueError(f"bef needs images of at least 16x16, got shape {y.shape}")
    dh = (y[:, :-1] - y[:, 1:]) ** 2  # dh[:, j]: columns j | j+1
    dv = (y[:-1, :] - y[1:, :]) ** 2  # dv[i, :]: rows i | i+1
    cols = np.arange(BLOCK - 1, w - 1, BLOCK)
    rows = np.arange(BLOCK - 1, h - 1, BLOCK)
    boundary_sum = dh[:, cols].sum() + dv[rows, :].sum()
    nonboundary_sum = dh.sum() + dv.sum() - boundary_sum
    n_boundary = h * (w // BLOCK - 1) + w * (h // BLOCK - 1)
    n_nonboundary = h * (w - 1) + w * (h - 1) - n_boundary
    d_b = boundary_sum / n_boundary
    d_n = nonboundary_sum / n_nonboundary
    if d_b <= d_n:
        return 0.0
    return float(np.log2(BLOCK) / np.log2(min(h, w)) * (d_b - d_n))


def psnr_b(restored, reference) -> float:
    """PSNR-B in dB: 10 log10(255^2 / (MSE + BEF)).

    MSE is over all pixels and channels of the two images; BEF is that of the *restored* image,
    on its BT.601 Y channel (`rgb_to_y`) for RGB, on the image itself for grey. +inf only when
    both terms are 0.
    """
    restored, reference = _pair(restored, reference)
    mse = np.mean((restored - reference) ** 2)
    y = restored if restored.ndim == 2 else rgb_to_y(restored)
    total = mse + bef(y)
    if total == 0:
        return float("inf")
    return float(10.0 * np.log10(255.0 ** 2 / total))
