"""Training data: high-quality crops, JPEG-compressed in memory at a random quality (Sec. 4.1).

Determinism: the data stream is a pure function of (seed, global position). Position p falls in
epoch `p // n` at index `p % n`; the image is `permutation(seed, epoch)[index]` and its crop and
QF come from `default_rng([seed, epoch, index])`. Nothing depends on DataLoader workers, their
seeds, or how many items were prefetched, so a run resumed at position p sees exactly the items
an uninterrupted run would have seen.
"""
from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler

from sodiff import metrics
from sodiff.jpeg import compress

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm")
PAPER_QF_RANGE = (5, 95)  # uniform random JPEG quality, both ends included (Sec. 4.1)
MIN_VAL_SIDE = 11  # SSIM's 11x11 window
# A 4:2:0 JPEG's minimum coded unit: a patch cut at multiples of it has the block grid (luma
# and chroma) at its origin, as a whole image has.
MCU_SIDE = 16
# Everything Pillow raises on a broken, truncated or hostile file.
_READ_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError,
                Image.DecompressionBombError)


class DataWarning(UserWarning):
    """An image that is skipped (unreadable, too small); one warning per file."""


@dataclass(frozen=True)
class Source:
    """One training image: where it is, its size, and the captioned crop (stage 1) if any."""
    path: Path
    size: tuple[int, int]                         # (width, height)
    box: tuple[int, int, int, int] | None = None  # [x0, y0, x1, y1]; None: random crop
    store_index: int | None = None                # row of the text-embedding store


def list_images(folder: str | Path) -> list[Path]:
    """Image files under `folder` (recursive), sorted so that every process sees one order."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ValueError(f"image folder {folder} does not exist")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def _image_size(path: Path) -> tuple[int, int] | None:
    """Width and height from the header alone, or None (with a warning) when unreadable."""
    try:
        with Image.open(path) as im:
            return im.size
    except _READ_ERRORS as e:
        warnings.warn(f"skipping unreadable image {path} ({type(e).__name__}: {e})", DataWarning)
        return None


def _too_small(path: Path, size: tuple[int, int], side: int) -> bool:
    if min(size) >= side:
        return False
    warnings.warn(f"skipping {path}: {size[0]}x{size[1]} is smaller than the {side}px crop",
                  DataWarning)
    return True


def folder_sources(folder: str | Path, crop: int) -> list[Source]:
    """Readable images of at least `crop` x `crop` under `folder`; the rest warn once each."""
    paths = list_images(folder)
    sizes = [(p, _image_size(p)) for p in paths]
    sources = [Source(p, s) for p, s in sizes if s is not None and not _too_small(p, s, crop)]
    if not sources:
        raise ValueError(f"no usable training images in {folder}: {len(paths)} image files, none "
                         f"readable and at least {crop}x{crop} (try a smaller --crop)")
    return sources


def store_sources(store) -> list[Source]:
    """The captioned crops of a text-embedding store (stage 1); broken entries warn once each."""
    sources = []
    for i in range(len(store)):
        path, box = store.meta(i)  # without reading the embedding
        path = Path(path)
        size = _image_size(path)
        if size is None:
            continue
        x0, y0, x1, y1 = (int(v) for v in box)
        if not (0 <= x0 < x1 <= size[0] and 0 <= y0 < y1 <= size[1]):
            warnings.warn(f"skipping store entry {i}: box {list(box)} is outside {path} "
                          f"({size[0]}x{size[1]})", DataWarning)
            continue
        sources.append(Source(path, size, (x0, y0, x1, y1), i))
    if not sources:
        raise ValueError("no usable entries in the text-embedding store")
    return sources


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The randomness (crop, QF) of the item at `index` of `epoch`."""
    return np.random.default_rng([seed, epoch, index])


class StreamSampler(Sampler):
    """Endless keys `(epoch, index, item)` for global positions `start, start + 1, ...`.

    With `world` processes, each global batch of `batch_size * world` positions is split in
    rank order, so the union over ranks is the single-process stream.
    """

    def __init__(self, n: int, seed: int, batch_size: int, start: int = 0, rank: int = 0,
                 world: int = 1):
        self.n, self.seed, self.batch_size = n, seed, batch_size
        self.start, self.rank, self.world = start, rank, world
        self._perm: tuple[int, np.ndarray] | None = None

    def key(self, position: int) -> tuple[int, int, int]:
        epoch, index = divmod(position, self.n)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, epoch_permutation(self.n, self.seed, epoch))
        return epoch, index, int(self._perm[1][index])

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        per_step = self.batch_size * self.world
        first = self.start + self.rank * self.batch_size
        for step in itertools.count():
            base = first + step * per_step
            for position in range(base, base + self.batch_size):
                yield self.key(position)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 -> float32 3xHxW in [-1, 1] (the model's range)."""
    return torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float() / 127.5 - 1


def load_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def random_crop(image: np.ndarray, side: int, rng: np.random.Generator) -> np.ndarray:
    h, w = image.shape[:2]
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    return image[y:y + side, x:x + side]


def box_crop(image: np.ndarray, box: tuple[int, int, int, int], side: int) -> np.ndarray:
    """The captioned box, resized to `side` (bicubic) when its size differs."""
    x0, y0, x1, y1 = box
    region = image[y0:y1, x0:x1]
    if region.shape[:2] == (side, side):
        return region
    return np.asarray(Image.fromarray(region).resize((side, side), Image.BICUBIC))


class JPEGPairs(Dataset):
    """(lq, hq, qf) training pairs: a crop of a source image and its in-memory JPEG.

    Indexed by the keys of `StreamSampler`. An image that fails to decode (a truncated file the
    header check could not see) is replaced by the next source in the epoch's order, with one
    warning per file and process. `store` adds the text embedding of each captioned crop.
    With `patch`, `lq`/`hq` are a `patch`-sized square of the compressed crop, cut on the
    JPEG's MCU grid, and `view` is the whole compressed crop: the prompt and the timestep can
    then be computed from as much of the image as inference gives them, while the UNet trains
    on small patches.
    """

    def __init__(self, sources: Sequence[Source], crop: int, qf_range: tuple[int, int],
                 seed: int, store=None, patch: int | None = None):
        if patch is not None and not 0 < patch <= crop:
            raise ValueError(f"patch={patch} must be in 1..crop={crop}")
        self.sources, self.crop, self.qf_range = list(sources), crop, qf_range
        self.seed, self.store, self.patch = seed, store, patch
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.sources)

    def _decode(self, i: int) -> np.ndarray | None:
        if i in self._bad:
            return None
        try:
            return load_rgb(self.sources[i].path)
        except _READ_ERRORS as e:
            self._bad.add(i)
            warnings.warn(f"skipping unreadable image {self.sources[i].path} "
                          f"({type(e).__name__}: {e})", DataWarning)
            return None

    def __getitem__(self, key: tuple[int, int, int]) -> dict[str, torch.Tensor]:
        epoch, index, item = key
        rng = item_rng(self.seed, epoch, index)
        qf = int(rng.integers(self.qf_range[0], self.qf_range[1] + 1))
        for j in (item + k for k in range(len(self))):
            j %= len(self)
            image = self._decode(j)
            if image is not None:
                break
        else:
            raise RuntimeError("every training image failed to decode")
        src = self.sources[j]
        hq = (box_crop(image, src.box, self.crop) if src.box is not None
              else random_crop(image, self.crop, rng))
        lq, _ = compress(np.ascontiguousarray(hq), qf)
        out = {"lq": to_tensor(lq), "hq": to_tensor(hq), "qf": torch.tensor(float(qf))}
        if self.patch is not None:
            y, x = (MCU_SIDE * int(rng.integers(0, (n - self.patch) // MCU_SIDE + 1))
                    for n in lq.shape[:2])
            cut = (slice(y, y + self.patch), slice(x, x + self.patch))
            out.update(view=out["lq"], lq=to_tensor(lq[cut]), hq=to_tensor(hq[cut]))
        if self.store is not None:
            out["text"] = torch.as_tensor(np.asarray(self.store[src.store_index][2]),
                                          dtype=torch.float32)
        return out


@dataclass(frozen=True)
class ValImage:
    name: str
    lq: torch.Tensor   # [1,3,S,S] in [-1, 1]
    hq: np.ndarray     # uint8 SxSx3


def validation_images(folder: str | Path, side: int, qf: int, limit: int) -> list[ValImage]:
    """The first `limit` readable images of `folder` (sorted), centre-cropped to a square of
    at most `side`, compressed at the fixed quality `qf`."""
    out = []
    for path in list_images(folder):
        if len(out) == limit:
            break
        try:
            image = load_rgb(path)
        except _READ_ERRORS as e:
            warnings.warn(f"skipping unreadable validation image {path} ({e})", DataWarning)
            continue
        h, w = image.shape[:2]
        s = min(side, h, w)
        if s < MIN_VAL_SIDE:
            continue
        y, x = (h - s) // 2, (w - s) // 2
        hq = np.ascontiguousarray(image[y:y + s, x:x + s])
        out.append(ValImage(path.name, to_tensor(compress(hq, qf)[0])[None], hq))
    if not out:
        raise ValueError(f"no usable validation images in {folder}")
    return out


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[1,3,H,W] or [3,H,W] in [-1, 1] -> uint8 HxWx3 (rounded, as a saved PNG would be)."""
    x = image.detach().float().squeeze(0).clamp(-1, 1).add(1).mul(127.5).round()
    return x.byte().permute(1, 2, 0).cpu().numpy()


@torch.no_grad()
def evaluate(fn: Callable[[torch.Tensor], torch.Tensor], images: list[ValImage],
             device: torch.device) -> dict[str, float]:
    """Mean PSNR/SSIM of `fn(lq)` (an image in [-1, 1] of the input's size) against the
    references, and the JPEG input's own PSNR for scale."""
    psnr, ssim, jpeg = [], [], []
    for im in images:
        out = to_uint8(fn(im.lq.to(device)))
        psnr.append(metrics.psnr(out, im.hq))
        ssim.append(metrics.ssim(out, im.hq))
        jpeg.append(metrics.psnr(to_uint8(im.lq), im.hq))
    return {"psnr": float(np.mean(psnr)), "ssim": float(np.mean(ssim)),
            "psnr_jpeg": float(np.mean(jpeg))}
