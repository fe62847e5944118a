"""`sodiff-demo`: thin CLI over `demo.core.run_demo`."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from runtime.cliopts import CONTEXT_SETTINGS, needs_extra, version_option

from .core import PHOTOS, DemoOptions, cache_dir, run_demo, summary

_DEFAULTS = DemoOptions()


@version_option()
@click.command(context_settings=CONTEXT_SETTINGS,
               help="Compress a real photo as JPEG, export the bundled SODiff checkpoint to "
               "ONNX, restore the JPEG with the torch-free runtime, and write the restored "
               "image and a side-by-side comparison (JPEG | restored | original). With "
               "--serve: export, then serve the model behind a before/after page in the "
               "browser instead.")
@click.option("--image", default=_DEFAULTS.image, show_default=True,
              help=f"a scikit-image photo ({', '.join(PHOTOS)}) or a clean image file")
@click.option("--qf", default=_DEFAULTS.qf, show_default=True, type=click.IntRange(1, 100),
              help="JPEG quality factor of the compressed input")
@click.option("--out", default=str(_DEFAULTS.out), show_default="the current folder",
              help="folder for the JPEG, the restored image and the comparison")
@click.option("--engine", default=None,
              help="engine dir to (re)export into; unchanged components are reused "
                   f"[default: {cache_dir()}/engines/tiny for the bundled model; the cache "
                   f"is $XDG_CACHE_HOME/sodiff]")
@click.option("--checkpoint", default=None,
              help="SODiff checkpoint folder [default: the bundled tiny model]")
@click.option("--threads", default=0, show_default=True, type=click.IntRange(0),
              help="onnxruntime threads (0: onnxruntime decides)")
@click.option("--serve", is_flag=True,
              help="instead of the comparison: serve the model behind sodiff-serve's "
                   "before/after page at http://127.0.0.1:PORT/ until Ctrl-C (the 'ray' extra)")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535),
              help="with --serve: the HTTP port")
def main(image: str, qf: int, out: str, engine: str | None, checkpoint: str | None,
         threads: int, serve: bool, port: int) -> None:
    with needs_extra("sodiff-demo", "export"):  # the demo exports: onnx and torch
        import export.pipeline  # noqa: F401 (fail here, before any work, when they are absent)
    if serve:
        with needs_extra("sodiff-demo", "ray"):
            import ray.serve  # noqa: F401 (as above)
    from export.errors import ExportError
    from runtime.errors import BackendError, EngineDirError, ImageError

    opts = DemoOptions(image, qf, Path(out), Path(engine) if engine else None,
                       Path(checkpoint) if checkpoint else None, threads)
    try:
        if serve:
            from .serve import serve_demo
            serve_demo(opts, port, log=lambda m: click.echo(m, err=True))
            return
        result = run_demo(opts)
    except (ExportError, EngineDirError, BackendError, ImageError, ValueError, RuntimeError,
            OSError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(getattr(e, "exit_code", 1))
    click.echo(summary(result))


if __name__ == "__main__":
    main()
