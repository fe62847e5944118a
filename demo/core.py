"""The demo as a library call: `run_demo(DemoOptions(...)) -> DemoResult`."""
from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from .figure import comparison, worst_crops

CACHE_NAME = "sodiff"  # $XDG_CACHE_HOME/sodiff (default ~/.cache/sodiff) holds exported engines
PHOTOS = ("astronaut", "coffee", "chelsea")  # real photographs bundled with scikit-image
# One tile covers every bundled photo (the largest side is 600), so no tile seams; the
# runtime tiles bigger images with overlap.
DYNAMIC = ((8, 8), (256, 256), (512, 512))
Log = Callable[[str], None]


@dataclass(frozen=True)
class DemoOptions:
    image: str = "astronaut"            # a scikit-image photo name, or a clean image file
    qf: int = 10                        # JPEG quality the photo is compressed at
    out: Path = Path(".")               # restored image and comparison go here (the cwd)
    engine: Path | None = None          # engine dir, re-exported when stale (None: the cache's)
    checkpoint: Path | None = None      # checkpoint folder (None: the bundled weights/tiny)
    threads: int = 0                    # onnxruntime intra-op threads (0: its default)


@dataclass
class DemoResult:
    files: dict[str, Path]              # what was written: jpeg, restored, comparison
    metrics: dict[str, dict[str, float]]  # {"jpeg": {...}, "restored": {...}}
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per stage
    info: dict = field(default_factory=dict)  # the runtime's restore_info (tau, ms per stage)


def cache_dir() -> Path:
    """The user's cache folder for sodiff: `$XDG_CACHE_HOME/sodiff`, else `~/.cache/sodiff`
    (the XDG rule: an unset, empty or relative XDG_CACHE_HOME means the default)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return root / CACHE_NAME


def engine_dir(opts: DemoOptions) -> Path:
    """`opts.engine`, or the cache's engine dir for the checkpoint: `engines/tiny` for the
    bundled one, `engines/<name>-<hash of its path>` for another, so two never share one."""
    if opts.engine is not None:
        return opts.engine
    if opts.checkpoint is None:
        return cache_dir() / "engines" / "tiny"
    where = str(Path(opts.checkpoint).resolve())
    return cache_dir() / "engines" / (f"{Path(where).name}-"
                                      f"{hashlib.sha256(where.encode()).hexdigest()[:8]}")


def validate_options(opts: DemoOptions) -> None:
    """ValueError naming every bad option."""
    problems = []
    if not isinstance(opts.qf, int) or not 1 <= opts.qf <= 100:
        problems.append(f"qf={opts.qf!r} must be an integer in 1..100")
    if opts.image not in PHOTOS and not Path(opts.image).is_file():
        problems.append(f"image={opts.image!r} is neither one of {', '.join(PHOTOS)} nor an "
                        f"image file")
    if opts.out.exists() and not opts.out.is_dir():
        problems.append(f"out={opts.out} exists and is not a folder")
    if problems:
        raise ValueError("invalid demo options: " + "; ".join(problems))


def load_photo(image: str) -> tuple[str, np.ndarray]:
    """(name, uint8 RGB array) of a scikit-image photo or an image file."""
    if image in PHOTOS:
        try:
            import skimage.data
        except ImportError:
            raise RuntimeError("scikit-image is not installed; run `make demo` (it installs "
                               "what the demo needs) or `pip install '.[demo]'`") from None
        return image, np.ascontiguousarray(getattr(skimage.data, image)()[..., :3])
    with Image.open(image) as im:
        return Path(image).stem, np.asarray(im.convert("RGB")).copy()


def scores(out: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    from sodiff.metrics import psnr, psnr_b, ssim

    return {"psnr": psnr(out, ref), "psnr_b": psnr_b(out, ref), "ssim": ssim(out, ref)}


def export_engine(opts: DemoOptions, log: Log) -> None:
    """Export the checkpoint to ONNX; unchanged components are reused (the manifest's hashes)."""
    from export.options import ExportOptions
    from export.pipeline import run_export

    run_export(ExportOptions(out=engine_dir(opts), checkpoint=opts.checkpoint, dynamic=DYNAMIC),
               log=log)


def restore(opts: DemoOptions, data: bytes, seconds: dict[str, float]) -> tuple[np.ndarray, dict]:
    """The runtime on the JPEG file `data`, read as sodiff-run reads it: its tables,
    coefficients and header QF."""
    from runtime import Restorer, RestoreOptions
    from runtime.imageio import decode_image

    img = decode_image(data, "demo JPEG")

    t = time.perf_counter()
    with Restorer(engine_dir(opts), RestoreOptions(backend="ort", device="cpu",
                                              threads=opts.threads)) as r:
        seconds["load engines"] = time.perf_counter() - t
        t = time.perf_counter()
        out, info = r.restore_info(img.array, img.qf, jpeg=img.jpeg)
        seconds["restore"] = time.perf_counter() - t
    return out, info


def run_demo(opts: DemoOptions = DemoOptions(), log: Log = lambda m: print(m, file=sys.stderr)
             ) -> DemoResult:
    """Compress a real photo at `opts.qf`, export and run the bundled model, write the restored
    image and the comparison to `opts.out`, and return metrics and timings."""
    from sodiff.jpeg import compress

    validate_options(opts)
    seconds: dict[str, float] = {}
    name, original = load_photo(opts.image)
    jpeg, data = compress(original, opts.qf)
    t = time.perf_counter()
    export_engine(opts, log)
    seconds["export"] = time.perf_counter() - t
    log(f"[restore] {name} {original.shape[1]}x{original.shape[0]} at QF {opts.qf}, "
        f"onnxruntime on the CPU")
    restored, info = restore(opts, data, seconds)
    metrics = {"jpeg": scores(jpeg, original), "restored": scores(restored, original)}
    opts.out.mkdir(parents=True, exist_ok=True)
    files = {"jpeg": opts.out / f"{name}_q{opts.qf}.jpg",
             "restored": opts.out / f"{name}_q{opts.qf}_sodiff.png",
             "comparison": opts.out / f"{name}_q{opts.qf}_comparison.png"}
    files["jpeg"].write_bytes(data)
    Image.fromarray(restored).save(files["restored"])
    m = metrics
    columns = [(f"JPEG q{opts.qf}: {m['jpeg']['psnr']:.2f} dB", jpeg),
               (f"SODiff tiny: {m['restored']['psnr']:.2f} dB", restored),
               ("original", original)]
    comparison(columns, worst_crops(jpeg, original)).save(files["comparison"])
    return DemoResult(files, metrics, seconds, info)


def summary(result: DemoResult) -> str:
    """The report printed at the end: metrics before/after, then time per stage."""
    j, r = result.metrics["jpeg"], result.metrics["restored"]
    lines = ["", "|        | PSNR (dB) | PSNR-B (dB) | SSIM   |", "|---|---|---|---|",
             f"| JPEG   | {j['psnr']:9.2f} | {j['psnr_b']:11.2f} | {j['ssim']:.4f} |",
             f"| SODiff | {r['psnr']:9.2f} | {r['psnr_b']:11.2f} | {r['ssim']:.4f} |",
             f"| gain   | {r['psnr'] - j['psnr']:+9.2f} | {r['psnr_b'] - j['psnr_b']:+11.2f} | "
             f"{r['ssim'] - j['ssim']:+.4f} |", "",
             f"timestep tau {result.info['tau']:.1f} ({result.info['tau_source']}), predicted "
             f"QF {_num(result.info['qf_predicted'])}", "", "time per stage:"]
    lines += [f"  {k:<14} {v:8.2f} s" for k, v in result.seconds.items()]
    lines += [f"    {k:<12} {v:8.1f} ms" for k, v in result.info["ms"].items()]
    lines += ["", *[f"wrote {p}" for p in result.files.values()]]
    return "\n".join(lines)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"
