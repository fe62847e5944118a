"""`sodiff-run`: a thin click front end of `runtime.batch` and `runtime.Restorer`."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from .cliopts import CONTEXT_SETTINGS, version_option
from .config import (CHOICES_BACKEND, CHOICES_DEVICE, CHOICES_TIMESTEP, DEFAULT_MAX_PIXELS,
                     DEFAULT_QUALITY, OUTPUT_SUFFIX, RestoreOptions)

EXIT_FAILED, EXIT_UNUSABLE, EXIT_INTERRUPTED = 1, 2, 130  # 130: 128 + SIGINT, the shells' own


@version_option()
@click.command(context_settings=CONTEXT_SETTINGS)
@click.option("--engine", "engine", required=True, type=click.Path(path_type=Path),
              help="Engine dir written by sodiff-export.")
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help=f"Output file (one input) or folder (mirrors input folders). Default: "
                   f"beside each input as NAME{OUTPUT_SUFFIX}.png.")
@click.option("--format", "fmt", type=click.Choice(["png", "jpg", "webp"]), default="png",
              show_default=True, help="Format of outputs the batch names (an -o FILE's "
                                      "extension decides its own).")
@click.option("--quality", type=click.IntRange(1, 100), default=DEFAULT_QUALITY,
              show_default=True, help="JPEG/WebP output quality.")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs (never inputs).")
@click.option("--backend", type=click.Choice(CHOICES_BACKEND), default="auto",
              show_default=True, help="auto: what the engine dir holds (ONNX: onnxruntime, "
                                      "engines: TensorRT).")
@click.option("--device", type=click.Choice(CHOICES_DEVICE), default="auto",
              show_default=True, help="onnxruntime provider (auto: CUDA when installed).")
@click.option("--tile", type=click.IntRange(min=1), help="Tile side in pixels (default: the "
                                                         "engines' largest shape).")
@click.option("--overlap", type=click.IntRange(min=0), help="Tile overlap in pixels "
                                                            "(default: a quarter tile).")
@click.option("--tile-batch", type=click.IntRange(min=1), help="Tiles per encoder/UNet/decoder "
              "call (default: the engines' largest batch, shapes.batch.max).")
@click.option("--timestep", type=click.Choice(CHOICES_TIMESTEP), default="model",
              show_default=True, help="model: the predictor (or the dir's fixed tau); header: "
                                      "tau from the JPEG quantization tables' quality.")
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="onnxruntime CPU threads (0: onnxruntime decides).")
@click.option("--max-pixels", type=click.IntRange(min=0), default=DEFAULT_MAX_PIXELS,
              show_default=True, help="Decompression-bomb limit in pixels (0: none).")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the model files.")
@click.option("--no-keep-colour", is_flag=True, help="Leave the UNet's colours as they are "
              "(default: each tile's mean colour is set to the input's).")
@click.option("--no-jpeg-constraint", is_flag=True, help="Keep restored block-DCT coefficients "
              "outside the JPEG's quantization intervals (default: a JPEG input's output is "
              "projected onto them).")
@click.option("--no-gate", is_flag=True, help="Keep the restoration at every quality (default: "
              "where the engine dir's measured gate says the model stops helping, at high QF, "
              "the output moves toward the JPEG's own decode).")
@click.option("--report", is_flag=True, help="One JSON line per image on stdout (QF, tau, "
                                             "size, ms per stage).")
def main(engine, inputs, output, fmt, quality, overwrite, backend, device, tile, overlap,
         tile_batch, timestep, threads, max_pixels, no_verify, no_keep_colour,
         no_jpeg_constraint, no_gate, report):
    """Restore JPEG-compressed images with a SODiff engine dir.

    INPUT: files, folders (searched recursively) and glob patterns.
    """
    from tqdm import tqdm

    from .batch import BatchOptions, collect_inputs, plan_jobs, remove_stale_temps, run_batch
    from .errors import BackendError, EngineDirError
    from .pipeline import Restorer

    skipped: list[Path] = []
    found, refused = collect_inputs(list(inputs), skipped)
    opts = BatchOptions(out=output, fmt=fmt, quality=quality, overwrite=overwrite,
                        max_pixels=max_pixels)
    try:
        jobs = refused + plan_jobs(found, opts)
    except ValueError as e:
        _die(str(e), EXIT_UNUSABLE)
    if not jobs:
        _die("no input images found", EXIT_UNUSABLE)
    try:
        restorer = Restorer(engine, RestoreOptions(
            backend=backend, device=device, tile=tile, overlap=overlap, tile_batch=tile_batch,
            timestep=timestep, threads=threads, verify_hashes=not no_verify,
            keep_colour=not no_keep_colour, jpeg_constraint=not no_jpeg_constraint,
            gate=not no_gate))
    except (EngineDirError, BackendError, ValueError) as e:
        _die(str(e), EXIT_UNUSABLE)
    if no_verify:
        click.echo("warning: --no-verify: the model files' sha256 hashes are not checked (only "
                   "their sizes)", err=True)
    say = lambda msg: tqdm.write(msg, file=sys.stderr)  # noqa: E731 - keeps the bar intact
    bar = lambda total: tqdm(total=total, unit="image", file=sys.stderr, disable=None)  # noqa
    stale = remove_stale_temps(jobs)
    if stale:
        click.echo(f"removed {stale} temporary file(s) an interrupted earlier run left", err=True)
    try:
        with restorer, _StopOnSignal(say) as stop:
            summary = run_batch(restorer, jobs, opts, sys.stdout if report else None, say, bar,
                                _TileBar(), stop)
    except KeyboardInterrupt:  # a second signal: the image in progress was abandoned
        _die("interrupted during an image; its output was not written", EXIT_INTERRUPTED)
    _summarise(summary, len(skipped))


def _summarise(summary, skipped: int) -> None:
    line = f"{summary.done} restored, {len(summary.failed)} failed"
    line += f", {skipped} skipped (not images)" if skipped else ""
    line += f", {summary.not_started} not started (interrupted)" if summary.not_started else ""
    click.echo(line, err=True)
    if summary.failed:
        click.echo("failed:", err=True)
        for _, reason in summary.failed:
            click.echo(f"  {reason}", err=True)
    if summary.not_started:
        sys.exit(EXIT_INTERRUPTED)
    if summary.failed:
        sys.exit(EXIT_FAILED)


class _StopOnSignal:
    """SIGINT and SIGTERM ask the batch to stop after the current image (its output is
    finished or its temporary file removed); a second one stops at once (KeyboardInterrupt,
    which removes the temporary file of a write in progress)."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self, say):
        self.say, self.asked, self.old = say, False, {}

    def __enter__(self):
        import signal
        for name in self.SIGNALS:
            sig = getattr(signal, name)
            try:
                self.old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave the signals alone
                pass
        return lambda: self.asked

    def _handle(self, signum, frame) -> None:
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True
        self.say("interrupted: stopping after the current image (again to stop now)")

    def __exit__(self, *exc) -> None:
        import signal
        for sig, handler in self.old.items():
            signal.signal(sig, handler)


class _TileBar:
    """A second bar for images that go through several tiles; gone when the image is done."""

    def __init__(self):
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        from tqdm import tqdm
        if total < 2:
            return
        if self.bar is not None and (self.bar.total != total or done <= self.bar.n):
            self.bar.close()  # the last image failed halfway: start afresh
            self.bar = None
        if self.bar is None:
            self.bar = tqdm(total=total, unit="tile", leave=False, file=sys.stderr,
                            disable=None)
        self.bar.update(done - self.bar.n)
        if done == total:
            self.bar.close()
            self.bar = None


def _die(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
