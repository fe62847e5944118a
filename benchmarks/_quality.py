"""Pieces of the quality benchmark: test sets, restorers (PyTorch checkpoint or engine dir),
per-image scoring with the classic metrics, optional pyiqa metrics (never downloaded), and
the side-by-side crop grid."""
from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image, ImageDraw

from sodiff import jpeg, metrics

# Test sets: folder under the data dir, and whether the protocol is grey (single-channel JPEG
# of the Matlab-style Y image) or colour (RGB, 4:2:0). BSDS500's files are JPEGs of IJG quality
# ~95 themselves: at QF 90-95 their re-compression is nearly lossless.
SETS = {"LIVE1_color": False, "LIVE1_gray": True, "Classic5": True, "BSDS500/test": False}
SET_SUFFIXES = (".png", ".bmp", ".tif", ".jpg")
IQA_METRICS = ("lpips", "dists", "musiq", "maniqa", "clipiqa")
IQA_FULL_REFERENCE = ("lpips", "dists")
# Luma weights of grey = R,G,B mix (BT.601 full range, as PIL's convert("L")): they sum to 1,
# so a grey input replicated to RGB and restored to near-grey comes back unchanged.
GREY_WEIGHTS = np.array([0.299, 0.587, 0.114])
GRID_CROP = 160      # side of each crop in the image grid (pixels, before scaling)
GRID_SCALE = 2       # nearest-neighbour zoom of the crops, so artifacts stay visible
GRID_LABEL_H = 14    # pixel rows for a text label above each column


def list_images(data_dir: Path, name: str) -> list[Path]:
    folder = Path(data_dir) / name
    if not folder.is_dir():
        raise ValueError(f"test set folder {folder} is missing (the test sets live in "
                         f"the data folder of docs/data.md; pass --data DIR)")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in SET_SUFFIXES)
    if not files:
        raise ValueError(f"no images in {folder}")
    return files


def load_reference(path: Path, grey: bool) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("L" if grey else "RGB")).copy()


def to_grey(rgb: np.ndarray) -> np.ndarray:
    """Restored RGB of a grey input -> uint8 grey (luma weights summing to 1, rounded)."""
    return np.clip(np.rint(rgb.astype(np.float64) @ GREY_WEIGHTS), 0, 255).astype(np.uint8)


def to_uint8(x: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8 [0, 255], rounded (what a saved PNG holds)."""
    return np.clip(np.rint((x.astype(np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)


@dataclass
class Restored:
    image: np.ndarray        # uint8, the input's shape
    qf: float | None         # the predictor's quality-factor estimate (None: no predictor)


Restorer = Callable[[np.ndarray, bytes], Restored]  # uint8 HxWx3, its JPEG file -> Restored


def torch_restorer(checkpoint: Path, base: Path | None, device: str) -> Restorer:
    """SODiff.restore on each whole image (LoRA merged): the predictor runs once, its tau is
    then passed as a fixed timestep so restore() does not run it again."""
    import torch
    from sodiff import checkpoint as ckpt

    model = ckpt.load(checkpoint, base_dir=base)
    if model.cfg.lora is not None:
        model.merge_lora()
    model = model.to(device).eval()

    @torch.inference_mode()
    def restore(rgb: np.ndarray, data: bytes) -> Restored:  # the paper's model: no constraint
        lq = torch.from_numpy(rgb).permute(2, 0, 1)[None].float().to(device) / 127.5 - 1
        tau, qf, _ = model.timestep(lq)
        out = model.restore(lq, mode=float(tau[0]))
        image = to_uint8(out[0].permute(1, 2, 0).float().cpu().numpy())
        return Restored(image, None if qf is None else float(qf[0]))
    return restore


def engine_restorer(engine_dir: Path, jpeg_constraint: bool = True) -> Restorer:
    """The torch-free runtime's Restorer (its backend as the engine dir says: onnxruntime for
    ONNX graphs), given the JPEG file as sodiff-run reads it (tables, coefficients, header QF;
    the dir's gate applies); the predicted QF comes from `restore_info`."""
    from runtime import Restorer as RuntimeRestorer
    from runtime.imageio import decode_image
    restorer = RuntimeRestorer(engine_dir, jpeg_constraint=jpeg_constraint)

    def restore(rgb: np.ndarray, data: bytes) -> Restored:
        img = decode_image(data, "benchmark JPEG")
        image, info = restorer.restore_info(img.array, img.qf, jpeg=img.jpeg)
        if image.ndim == 2:  # a grey JPEG went the runtime's grey path
            image = np.repeat(image[..., None], 3, axis=2)
        qf = info.get("qf_predicted")
        return Restored(image, None if qf is None else float(qf))
    return restore


def score(out: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """PSNR, SSIM, PSNR-B of `out` against `ref` (sodiff.metrics, FBCNN conventions)."""
    return {"psnr": metrics.psnr(out, ref), "ssim": metrics.ssim(out, ref),
            "psnr_b": metrics.psnr_b(out, ref)}


def mean_error(out: np.ndarray, ref: np.ndarray) -> list[float]:
    """Mean signed error per channel in grey levels (R, G, B; one value for grey): a colour
    cast shows here long before it costs PSNR."""
    diff = out.astype(np.float64) - ref.astype(np.float64)
    return [float(v) for v in np.atleast_1d(diff.mean(axis=(0, 1)))]


def evaluate_image(ref: np.ndarray, qf: int, grey: bool,
                   restorer: Restorer | None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Compress `ref` at `qf`, score the JPEG and (with a restorer) the restored image.
    Returns the record and the images (jpeg, restored, reference) for the grid and IQA."""
    decoded, data = jpeg.compress(ref, qf)
    header = jpeg.estimate_quality(data)
    rec: dict[str, Any] = {"qf": qf, "header_qf": header, "jpeg": score(decoded, ref)}
    images = {"jpeg": decoded, "reference": ref}
    if restorer is not None:
        rgb = np.repeat(decoded[..., None], 3, axis=2) if grey else decoded
        result = restorer(rgb, data)
        restored = to_grey(result.image) if grey else result.image
        if restored.shape != ref.shape:
            raise RuntimeError(f"restorer returned shape {restored.shape} for an input of "
                               f"shape {ref.shape}")
        rec["restored"] = score(restored, ref)
        rec["restored_bias"] = mean_error(restored, ref)
        rec["predicted_qf"] = result.qf
        images["restored"] = restored
    return rec, images


# ---- pyiqa (optional; weights must already be on disk) -------------------------------------

class NetworkBlocked(OSError):
    """Raised instead of any network access while pyiqa metrics are created."""


@contextlib.contextmanager
def no_network() -> Iterator[None]:
    """Every socket connection and torch.hub download fails inside: pyiqa may only load
    weights that are already on disk (Hugging Face libraries are told to stay offline too)."""
    def refuse(*_a: Any, **_k: Any) -> None:
        raise NetworkBlocked("network access is disabled: weights must already be on disk")

    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    patches = [(socket.socket, "connect"), (socket.socket, "connect_ex"),
               (socket, "create_connection")]
    try:
        import torch.hub
        patches.append((torch.hub, "download_url_to_file"))
    except ImportError:
        pass
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr in patches]
    try:
        for obj, attr, _ in saved:
            setattr(obj, attr, refuse)
        yield
    finally:
        for obj, attr, orig in saved:
            setattr(obj, attr, orig)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def load_iqa(names: tuple[str, ...], device: str,
             create: Callable[..., Any] | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """({name: metric}, {name: why skipped}). `create` defaults to pyiqa.create_metric."""
    if create is None:
        try:
            import pyiqa
        except ImportError:
            return {}, {n: "pyiqa is not installed" for n in names}
        create = pyiqa.create_metric
    loaded, skipped = {}, {}
    for name in names:
        try:
            with no_network():
                loaded[name] = create(name, device=device)
        except Exception as e:  # noqa: BLE001 - any failure to load means: skip, say why
            reason = "weights not on disk" if _caused_by(e, NetworkBlocked) else "failed"
            skipped[name] = f"{reason} ({type(e).__name__}: {str(e)[:120]})"
    return loaded, skipped


def _caused_by(e: BaseException | None, kind: type) -> bool:
    while e is not None:
        if isinstance(e, kind) or kind.__name__ in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def iqa_scores(metric_fns: dict[str, Any], out: np.ndarray, ref: np.ndarray,
               device: str) -> dict[str, float]:
    """pyiqa scores of `out` (full-reference ones against `ref`); inputs in [0, 1], RGB."""
    import torch

    def tensor(a: np.ndarray) -> torch.Tensor:
        a = np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a
        return torch.from_numpy(a).permute(2, 0, 1)[None].float().div(255).to(device)

    result = {}
    with torch.inference_mode():
        for name, fn in metric_fns.items():
            args = (tensor(out), tensor(ref)) if name in IQA_FULL_REFERENCE else (tensor(out),)
            result[name] = float(fn(*args).mean())
    return result


# ---- the side-by-side grid -------------------------------------------------------------------

def crop_box(shape: tuple[int, ...], side: int = GRID_CROP) -> tuple[int, int, int, int]:
    """A centred square crop aligned to the 8x8 JPEG grid (top, left, bottom, right)."""
    h, w = shape[:2]
    side = min(side, h, w)
    top, left = ((h - side) // 2) // 8 * 8, ((w - side) // 2) // 8 * 8
    return top, left, top + side, left + side


def image_grid(rows: list[dict[str, np.ndarray]], columns: tuple[str, ...],
               labels: tuple[str, ...] | None = None) -> Image.Image:
    """One row per image, one labelled column per entry of `columns` (same crop in each)."""
    if not rows:
        raise ValueError("no images for the grid")
    tiles = []
    for row in rows:
        t, l, b, r = crop_box(row["reference"].shape)
        tiles.append([Image.fromarray(row[c][t:b, l:r]).convert("RGB").resize(
            ((r - l) * GRID_SCALE, (b - t) * GRID_SCALE), Image.NEAREST) for c in columns])
    cell = max(max(t.size) for row in tiles for t in row)
    grid = Image.new("RGB", (cell * len(columns), GRID_LABEL_H + cell * len(tiles)), "white")
    draw = ImageDraw.Draw(grid)
    for j, name in enumerate(labels or columns):
        draw.text((j * cell + 4, 1), name, fill="black")
    for i, row in enumerate(tiles):
        for j, tile in enumerate(row):
            grid.paste(tile, (j * cell, GRID_LABEL_H + i * cell))
    return grid
