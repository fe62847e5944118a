"""Sample inputs: calibration images, the calibrated tau, the QF table, and the reference run
of the PyTorch wrappers in pipeline order (parity references and FP16-safety activations)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sodiff.jpeg import compress
from sodiff.model import pad_reflect, resize_for_saipe

from .errors import CalibrationError
from .islands import ModuleActivations
from .parity import ComponentSamples
from .specs import ComponentSpec

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
QF_TABLE_QUALITIES = (5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95)
QF_TABLE_MAX_IMAGES = 16      # images per QF: enough for a stable median, cheap on a CPU
SKIMAGE_IMAGES = ("astronaut", "coffee", "chelsea", "rocket")  # bundled with scikit-image
SYNTHETIC_SIDE = 256          # side of the synthetic images (skimage's are cropped to it)
JPEG_BLOCK = 8                # the predictor sees whole 8x8 blocks from the origin


def list_images(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted; CalibrationError when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CalibrationError(f"calibration folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CalibrationError(f"calibration folder {folder} holds no images "
                               f"({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def load_image(path: Path) -> np.ndarray:
    """uint8 HxWx3 RGB."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB")).copy()
    except (OSError, UnidentifiedImageError) as e:
        raise CalibrationError(f"cannot read calibration image {path}: {e}") from None


def folder_digest(files: list[Path]) -> str:
    """Cheap identity of a set of files (names, sizes, mtimes) for the skip-unchanged hash."""
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 -> [1,3,H,W] float32 in [-1, 1]."""
    return torch.from_numpy(image).permute(2, 0, 1)[None].float().contiguous() / 127.5 - 1


def crop_to_multiple(image: np.ndarray, m: int) -> np.ndarray:
    """Crop bottom/right to multiples of `m` (top-left anchored: the JPEG grid stays put)."""
    h, w = image.shape[:2]
    if h < m or w < m:
        raise CalibrationError(f"image of {w}x{h} pixels is smaller than {m}x{m}")
    return image[: h - h % m, : w - w % m]


def fit(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Reflect-pad bottom/right up to `size`, then crop to it (top-left anchored)."""
    h, w = size
    x = pad_reflect(x, max(0, h - x.shape[-2]), max(0, w - x.shape[-1]))
    return x[..., :h, :w]


@torch.no_grad()
def predict_tau(predictor: nn.Module, image: np.ndarray) -> float:
    """The predictor's deterministic tau for one image at native resolution."""
    x = to_tensor(crop_to_multiple(image, JPEG_BLOCK))
    tau, _, _ = predictor(x, gumbel=False)
    return float(tau[0])


def calibrate_tau(predictor: nn.Module, images: list[np.ndarray]) -> float:
    """Median predicted tau over `images` (the `calibrated` timestep mode)."""
    return float(np.median([predict_tau(predictor, im) for im in images]))


def synthetic_images(seed: int) -> tuple[str, list[np.ndarray]]:
    """Deterministic natural-ish images: scikit-image's bundled photos when importable, else
    smooth gradients with noise. Returns (source name, images)."""
    try:
        from skimage import data
        return "skimage", [getattr(data, n)()[:SYNTHETIC_SIDE, :SYNTHETIC_SIDE]
                           for n in SKIMAGE_IMAGES]
    except Exception:  # noqa: BLE001 - scikit-image absent or without its data files
        pass
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SYNTHETIC_SIDE, 0:SYNTHETIC_SIDE] / SYNTHETIC_SIDE
    images = []
    for k in range(4):
        base = np.stack([np.sin((k + 1) * np.pi * xx), np.cos((k + 2) * np.pi * yy),
                         xx * yy], -1) * 0.4 + 0.5
        noisy = base + rng.normal(0, 0.05, base.shape)
        images.append((np.clip(noisy, 0, 1) * 255).round().astype(np.uint8))
    return "synthetic", images


def qf_table(predictor: nn.Module, images: list[np.ndarray], source: str) -> dict:
    """Median predicted tau per JPEG quality, for the runtime's `--timestep header` mode."""
    images = images[:QF_TABLE_MAX_IMAGES]
    taus = [float(np.median([predict_tau(predictor, compress(im, q)[0]) for im in images]))
            for q in QF_TABLE_QUALITIES]
    return {"qf": list(QF_TABLE_QUALITIES), "tau": taus, "images": len(images),
            "source": source}


def sample_batches(size: tuple[int, int], n: int, real: list[np.ndarray], seed: int
                   ) -> list[tuple[str, torch.Tensor]]:
    """A batch of `n` random images in [-1, 1] and, when given, a batch of up to `n` real
    images fitted to `size`."""
    gen = torch.Generator().manual_seed(seed)
    batches = [("random", torch.rand((n, 3, *size), generator=gen) * 2 - 1)]
    if real:
        batches.append(("real", torch.cat([fit(to_tensor(im), size) for im in real[:n]])))
    return batches


class _Recorder:
    """Calls wrappers under a ModuleActivations tracker and keeps inputs/outputs and the
    largest activations (overall and per submodule) of exported ones."""

    def __init__(self, wrappers: dict[str, nn.Module], specs: dict[str, ComponentSpec],
                 exported: tuple[str, ...]):
        self.wrappers, self.specs = wrappers, specs
        self.results = {name: ComponentSamples() for name in exported}

    def __call__(self, name: str, source: str, *args: torch.Tensor):
        tracker = ModuleActivations(self.wrappers[name])
        with tracker:
            out = self.wrappers[name](*args)
        if name in self.results:
            spec, rec = self.specs[name], self.results[name]
            outs = out if isinstance(out, tuple) else (out,)
            np_ = lambda t: t.detach().float().numpy().copy()  # noqa: E731
            rec.batches.append((source, {t.name: np_(a) for t, a in zip(spec.inputs, args)},
                                {t.name: np_(o) for t, o in zip(spec.outputs, outs)}))
            rec.max_abs = max(rec.max_abs, tracker.max_abs)
            rec.nonfinite |= tracker.nonfinite
            for mine, theirs in ((rec.op_max, tracker.op_max), (rec.out_max, tracker.out_max)):
                for path, m in theirs.items():
                    mine[path] = max(mine.get(path, 0.0), m)
        return out


@torch.no_grad()
def reference_run(wrappers: dict[str, nn.Module], specs: dict[str, ComponentSpec],
                  exported: tuple[str, ...], batches: list[tuple[str, torch.Tensor]],
                  saipe_size: int, t_max: int, seed: int) -> dict[str, ComponentSamples]:
    """Run the float32 wrappers in pipeline order on every batch. Downstream inputs come from
    upstream outputs; on random batches the UNet's timestep is drawn uniformly instead."""
    rec = _Recorder(wrappers, specs, exported)
    gen = torch.Generator().manual_seed(seed + 1)
    baked = "predictor" not in wrappers
    for source, x in batches:
        prompt = rec("saipe", source, resize_for_saipe(x, saipe_size))
        latent = rec("vae_encoder", source, x)
        if baked:
            clean = rec("unet", source, latent, prompt)
        else:
            tau, _ = rec("predictor", source, x)
            if source == "random":
                tau = torch.rand(x.shape[0], generator=gen) * (t_max - 1)
            clean = rec("unet", source, latent, tau, prompt)
        rec("vae_decoder", source, clean)
    return rec.results
