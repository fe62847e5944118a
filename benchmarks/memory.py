"""Peak memory of the torch-free runtime against image size: tiles stream, so a 4096x4096
image should need little more than a 512x512 one.

    python benchmarks/memory.py                       # exports the tiny preset, 512 and 4096
    python benchmarks/memory.py --engine DIR --sizes 512,2048 --tile 128 --overlap 16

Each size runs in a fresh child process (peak RSS is per process: `resource.getrusage`'s
ru_maxrss), which builds a `Restorer`, makes a uint8 RGB image of that size and restores it.
The child reports its peak RSS after loading the engines (the baseline) and after the restore.
Writes benchmarks/results/memory-cpu.json.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
from runtime.cliopts import CONTEXT_SETTINGS, version_option

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "memory-cpu.json"
TINY_SHAPES = ((8, 8), (64, 64), (128, 128))  # the tiny engine: dynamic 8..128 pixels


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter (VmHWM) so that the restore's own peak can be read
    apart from the engine loading's; Linux only."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def vm_hwm_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def parse_size(text: str) -> tuple[int, int]:
    """(H, W) of a --sizes entry: a square side ("512") or HxW ("1000000x1")."""
    h, _, w = text.lower().partition("x")
    return int(h), int(w or h)


def label(h: int, w: int):
    """A run's "size": the side of a square (as before), else "HxW"."""
    return h if h == w else f"{h}x{w}"


def synthetic_image(h: int, w: int | None = None, seed: int = 0):
    """A uint8 RGB image with structure (gradients) and JPEG-like noise, made row band by row
    band so the generator itself never holds more than the image."""
    import numpy as np

    w = h if w is None else w
    rng = np.random.default_rng(seed)
    image = np.empty((h, w, 3), np.uint8)
    x = np.arange(w, dtype=np.float32)
    step = max(1, min(256, (1 << 20) // w))
    for y in range(0, h, step):
        rows = np.arange(y, min(y + step, h), dtype=np.float32)[:, None]
        base = 128 + 60 * np.sin(x / 37.0) * np.cos(rows / 53.0)
        noise = rng.integers(-12, 13, (rows.shape[0], w, 3), dtype=np.int16)
        image[y:y + rows.shape[0]] = np.clip(base[..., None] + noise, 0, 255).astype(np.uint8)
    return image


def measure_child(engine: Path, size: tuple[int, int], tile: int | None, overlap: int | None,
                  threads: int) -> dict:
    """Runs in the child process: one restore, its peak memory and time."""
    from runtime import Restorer

    with Restorer(engine, tile=tile, overlap=overlap, threads=threads) as r:
        loaded = peak_rss_mb()
        reset = reset_peak_rss()
        image = synthetic_image(*size)
        t0 = time.perf_counter()
        out, info = r.restore_info(image)
        seconds = time.perf_counter() - t0
        restore_peak = vm_hwm_mb() if reset else None
    assert out.shape == image.shape
    return {"size": label(*size), "baseline_rss_mb": round(loaded, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            # the peak from just after loading to the end of the restore (image included)
            "restore_peak_rss_mb": None if restore_peak is None else round(restore_peak, 1),
            "image_mb": round(image.nbytes / 2**20, 1), "seconds": round(seconds, 1),
            "tiles": info["tiles"], "torch_loaded": "torch" in sys.modules}


def export_tiny(out: Path) -> Path:
    """The tiny preset with seeded random weights, dynamic shapes up to 128 pixels: a small tile,
    so that the 4096x4096 image really goes through many tiles."""
    from export.options import ExportOptions
    from export.pipeline import run_export

    run_export(ExportOptions(out=out, preset="tiny", random_weights=True, dynamic=TINY_SHAPES,
                             samples=1), log=lambda m: click.echo(m, err=True))
    return out


def run_child(engine: Path, size: tuple[int, int], tile, overlap, threads: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--engine", str(engine),
           "--sizes", f"{size[0]}x{size[1]}", "--threads", str(threads)]
    cmd += ["--tile", str(tile)] if tile else []
    cmd += ["--overlap", str(overlap)] if overlap is not None else []
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise click.ClickException(f"child for {size[0]}x{size[1]} failed: "
                                   f"{proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@version_option()
@click.command(context_settings=CONTEXT_SETTINGS)
@click.option("--engine", type=click.Path(path_type=Path), help="Engine dir (default: export "
                                                                 "the tiny preset to a temp dir).")
@click.option("--sizes", default="512,4096,1x1000000,1000000x1,64x700000", show_default=True,
              help="Image sizes: square sides or HxW (tall and wide strips, a wide band).")
@click.option("--tile", type=int, default=None, help="Tile side (default: the engine's max).")
@click.option("--overlap", type=int, default=16, show_default=True, help="Tile overlap.")
@click.option("--threads", type=int, default=0, show_default=True,
              help="onnxruntime threads (0: all cores).")
@click.option("--out", type=click.Path(path_type=Path), default=OUT, show_default=True)
@click.option("--child", is_flag=True, hidden=True)
def main(engine, sizes, tile, overlap, threads, out, child):
    """Peak RSS of one restore per image size, each in its own process."""
    sides = [parse_size(s) for s in sizes.split(",")]
    if child:
        click.echo(json.dumps(measure_child(engine, sides[0], tile, overlap, threads)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        engine = engine or export_tiny(Path(tmp) / "engine")
        manifest = json.loads((Path(engine) / "manifest.json").read_text())
        runs = []
        for side in sides:
            runs.append(run_child(engine, side, tile, overlap, threads))
            click.echo(json.dumps(runs[-1]), err=True)
            write_result(out, manifest, runs, tile, overlap, threads)  # a killed run keeps these


def write_result(out: Path, manifest: dict, runs: list[dict], tile, overlap, threads) -> None:
    peak = {r["size"]: r["peak_rss_mb"] for r in runs}
    restore = {r["size"]: r.get("restore_peak_rss_mb") for r in runs}
    first = runs[0]["size"]
    result = {
        "what": "peak RSS (ru_maxrss) of a child process restoring one uint8 RGB image with "
                "runtime.Restorer on the CPU (onnxruntime), engines loaded first",
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count()},
        "engine": {"preset": manifest["preset"], "shapes": manifest["shapes"],
                   "random_weights": manifest["random_weights"]},
        "settings": {"tile": tile, "overlap": overlap, "threads": threads},
        "runs": runs,
        "ratios": {f"{s}/{first}": round(peak[s] / peak[first], 3) for s in peak if s != first},
        "restore_ratios": {f"{s}/{first}": round(restore[s] / restore[first], 3)
                           for s in restore if s != first and restore[s] and restore[first]},
        # issue 15's target: at most 1.5x the first size's restore peak, plus the image's own
        # input and output arrays (2 x image_mb)
        "targets": {str(r["size"]): {
            "limit_mb": round(1.5 * restore[first] + 2 * r["image_mb"], 1),
            "restore_peak_rss_mb": restore[r["size"]],
            "ok": restore[r["size"]] <= 1.5 * restore[first] + 2 * r["image_mb"]}
            for r in runs if r["size"] != first and restore[r["size"]] and restore[first]},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    if __package__ in (None, ""):
        sys.path.insert(0, str(REPO))
    main()
