"""What every sodiff click CLI shares: `-h` beside `--help`, `--version`, and a one-line
hint naming the extra to install when a part's dependencies are missing.

It lives in `runtime` because every install has the runtime and the runtime imports nothing
from the other parts; the export, demo, scale, training and benchmark CLIs use it too.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager

import click

from .version import DIST, package_version

# One help setup for every command: `-h` works wherever `--help` does, and help text uses up
# to 100 columns on wide terminals rather than click's 80 (option names here are long).
CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def version_option():
    """Click's `--version`, printing e.g. `sodiff-run (sodiff) 0.1.0` (as `version_line`)."""
    return click.version_option(package_version(), "--version",
                                message=f"%(prog)s ({DIST}) %(version)s",
                                help="Show the sodiff version and exit.")


# The third-party modules each extra brings (pyproject.toml's optional-dependencies), by the
# name they import as: a CLI missing one of them names the extra instead of a traceback.
EXTRA_MODULES = {
    "export": ("torch", "diffusers", "peft", "safetensors", "onnx", "onnxruntime", "onnxscript",
               "polygraphy", "onnx_graphsurgeon"),
    "ray": ("ray", "prometheus_client"),
}


@contextmanager
def needs_extra(tool: str, extra: str):
    """Inside the block, a missing module of `extra` ends `tool` with one line naming the
    extra to install (exit 1); any other import error propagates."""
    try:
        yield
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        if top not in EXTRA_MODULES[extra]:
            raise
        click.echo(f"error: {tool} needs the '{extra}' extra ({top} is not installed): "
                   f"pip install '.[{extra}]' from the sodiff checkout", err=True)
        sys.exit(1)
