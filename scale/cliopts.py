"""The Restorer options both front ends (sodiff-batch, sodiff-serve) take, as sodiff-run names
them: one decorator, so the two CLIs cannot drift apart."""
from __future__ import annotations

import click

from runtime.config import CHOICES_BACKEND, CHOICES_DEVICE, CHOICES_TIMESTEP

_OPTIONS = (
    click.option("--backend", type=click.Choice(CHOICES_BACKEND), default="auto",
                 show_default=True, help="As sodiff-run's."),
    click.option("--device", type=click.Choice(CHOICES_DEVICE), default="auto",
                 show_default=True, help="onnxruntime provider (auto: CUDA when installed)."),
    click.option("--tile", type=click.IntRange(min=1), help="Tile side in pixels."),
    click.option("--overlap", type=click.IntRange(min=0), help="Tile overlap in pixels."),
    click.option("--tile-batch", type=click.IntRange(min=1), help="Tiles per engine call "
                 "(default: the engines' largest batch, shapes.batch.max)."),
    click.option("--timestep", type=click.Choice(CHOICES_TIMESTEP), default="model",
                 show_default=True, help="As sodiff-run's."),
    click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the model files."),
    click.option("--no-keep-colour", is_flag=True, help="As sodiff-run's."),
    click.option("--no-jpeg-constraint", is_flag=True, help="As sodiff-run's."),
    click.option("--no-gate", is_flag=True, help="As sodiff-run's."),
)


def restore_options(command):
    """Add the Restorer's options (backend, device, tile, overlap, tile batch, timestep,
    no-verify, no-keep-colour, no-jpeg-constraint, no-gate) to a click command."""
    for option in reversed(_OPTIONS):
        command = option(command)
    return command
