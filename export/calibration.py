"""The 8-bit components' calibration set: JPEG crops of the calibration images (or of
scikit-image's bundled photos) at the engines' optimum size, run through the float32 PyTorch
pipeline so that each component is calibrated on its real inputs; and the held-out images
the quality check restores (export/quality.py)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CalibrationError

CALIBRATION_QFS = (5, 10, 15, 20, 30, 40, 50, 60)  # the JPEG qualities crops are calibrated at
HELD_OUT = 8                # images of --calibration kept apart for the quality check
HELD_OUT_SIDE = 256         # held-out images are centre crops of at most this side (and
#                             of at most twice the traced size)
# scikit-image's bundled photos (no download): calibration and held-out sets never overlap.
DEFAULT_CALIBRATION = ("astronaut", "coffee", "rocket", "hubble_deep_field",
                       "immunohistochemistry", "gravel", "brick", "moon")
DEFAULT_HELD_OUT = ("chelsea", "camera", "coins", "grass")


@dataclass
class CalibrationSet:
    source: str                      # "calibration folder DIR" or "scikit-image photos"
    crops: list[np.ndarray]          # JPEG-decoded uint8 HxWx3 crops at the traced size
    qfs: list[int]                   # the JPEG quality of each crop
    held_out: list[tuple[str, np.ndarray]]  # (name, clean uint8 image) for the quality check
    sha256: str                      # of the crops' pixels and qualities, in order

    def to_dict(self) -> dict:
        return {"source": self.source, "crops": len(self.crops), "qf": sorted(set(self.qfs)),
                "sha256": self.sha256, "held_out": [n for n, _ in self.held_out]}


def _skimage_images(names: tuple[str, ...]) -> list[tuple[str, np.ndarray]]:
    try:
        from skimage import data
    except ImportError:
        raise CalibrationError("int8/fp8 without --calibration calibrate on scikit-image's "
                               "bundled photos, and scikit-image is not installed: pip install "
                               "'sodiff[export]', or pass --calibration DIR") from None
    out = []
    for n in names:
        im = np.asarray(getattr(data, n)())
        out.append((n, np.repeat(im[..., None], 3, -1) if im.ndim == 2 else im[..., :3]))
    return out


def _folder_images(folder: Path) -> tuple[list[tuple[str, np.ndarray]],
                                          list[tuple[str, np.ndarray]]]:
    from .samples import list_images, load_image
    files = list_images(folder)
    if len(files) < 2:
        raise CalibrationError(f"--calibration {folder}: int8/fp8 need at least 2 images (one "
                               f"to calibrate on, one held out to measure the loss on)")
    held = min(HELD_OUT, max(1, len(files) // 4))
    named = [(p.name, load_image(p)) for p in files]
    return named[:-held], named[-held:]


def _centre(image: np.ndarray, side: int) -> np.ndarray:
    h, w = image.shape[:2]
    top, left = max(0, (h - side) // 2), max(0, (w - side) // 2)
    return image[top:top + side, left:left + side]


def calibration_set(folder: Path | None, count: int, size: tuple[int, int], seed: int
                    ) -> CalibrationSet:
    """`count` crops of `size` (H, W), each JPEG-compressed at the next of CALIBRATION_QFS,
    taken in turn from the calibration images at seeded positions; plus the held-out images."""
    from sodiff.jpeg import compress

    from .samples import fit, to_tensor
    if folder is not None:
        calib, held = _folder_images(folder)
        source = f"calibration folder {Path(folder).name}"
    else:
        calib, held = _skimage_images(DEFAULT_CALIBRATION), _skimage_images(DEFAULT_HELD_OUT)
        source = "scikit-image photos"
    rng = np.random.default_rng(seed)
    h, w = size
    crops, qfs, digest = [], [], hashlib.sha256()
    for i in range(count):
        _, im = calib[i % len(calib)]
        top = int(rng.integers(0, max(1, im.shape[0] - h + 1)))
        left = int(rng.integers(0, max(1, im.shape[1] - w + 1)))
        crop = im[top:top + h, left:left + w]
        if crop.shape[:2] != (h, w):  # a small image: reflect-padded as the parity samples are
            x = fit(to_tensor(np.ascontiguousarray(crop)), size)
            crop = np.rint((x[0].permute(1, 2, 0).numpy() + 1) * 127.5).clip(0, 255)
            crop = crop.astype(np.uint8)
        qf = CALIBRATION_QFS[i % len(CALIBRATION_QFS)]
        decoded, _ = compress(np.ascontiguousarray(crop), qf)
        crops.append(decoded)
        qfs.append(qf)
        digest.update(decoded.tobytes() + qf.to_bytes(1, "little"))
    side = min(HELD_OUT_SIDE, 2 * max(size))  # a few tiles: the check restores each 8 times
    held = [(n, np.ascontiguousarray(_centre(im, side))) for n, im in held]
    return CalibrationSet(source, crops, qfs, held, digest.hexdigest())


def calibration_feeds(build, wrappers: dict, names: list[str], cfg, log
                      ) -> tuple[CalibrationSet, dict[str, list[dict[str, np.ndarray]]]]:
    """The calibration crops run through the float32 PyTorch pipeline: each quantized
    component's real inputs, batch by batch."""
    import time

    import torch

    from .samples import reference_run, to_tensor
    t0 = time.perf_counter()
    plan = build.plan
    cal = calibration_set(plan.calibration, plan.calibration_count, build.opt_size, plan.seed)
    batch = 8
    batches = [("calibration", torch.cat([to_tensor(c) for c in cal.crops[i:i + batch]]))
               for i in range(0, len(cal.crops), batch)]
    recs = reference_run(wrappers, build.specs, tuple(names), batches, cfg.saipe.image_size,
                         cfg.predictor.t_max, plan.seed)
    log(f"[calibration] {len(cal.crops)} crops of {cal.source} at "
        f"{build.opt_size[0]}x{build.opt_size[1]}, QF {min(cal.qfs)}-{max(cal.qfs)}, through the "
        f"float32 pipeline (sha256 {cal.sha256[:12]}; held out: "
        f"{', '.join(n for n, _ in cal.held_out)}) ({time.perf_counter() - t0:.1f} s)")
    return cal, {n: [ins for _, ins, _ in recs[n].batches] for n in names}
