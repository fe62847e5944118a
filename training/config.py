"""What every stage's config shares: its fields and their CLI options, their checks, and the
CLI entry that turns a config into a run (bad input: one error line; a NaN/inf stop: its own
exit status)."""
from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import click

from sodiff.config import PRESETS

PAPER_CROP = 512  # default crop side for a config that is no preset (presets: their SAIPE side)
EXIT_DIVERGED = 3  # exit status of a run stopped by a NaN/inf loss
MIXED_PRECISION = ("no", "fp16", "bf16")
LR_SCHEDULES = ("constant", "cosine")


def opt(default: Any = dataclasses.MISSING, help: str = "", **click_kw: Any) -> Any:
    """A config field whose `help` documents it here and in `--help`."""
    return field(default=default, metadata={"help": help, **click_kw})


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    out: str = opt(help="output folder: train_state/, logs/ (TensorBoard) and final/")
    data: str | None = opt(None, help="folder of high-quality training images (recursive)")
    crop: int | None = opt(None, help="training crop side in pixels [default: 512 (paper), 64 "
                           "for the tiny preset]")
    qf_min: int = opt(5, help="lowest JPEG quality drawn, inclusive (paper: 5)")
    qf_max: int = opt(95, help="highest JPEG quality drawn, inclusive (paper: 95)")
    batch_size: int = opt(16, help="images per process per micro-batch")
    grad_accum: int = opt(1, help="micro-batches per optimizer step")
    lr: float = opt(2e-4, help="peak learning rate")
    lr_schedule: str = opt("constant", help="constant (paper) or cosine decay to 0 at "
                           "--max-steps", choices=LR_SCHEDULES)
    warmup_steps: int = opt(0, help="linear warm-up steps from 0 to --lr (paper: none)")
    grad_clip: float = opt(0.0, help="clip the gradient norm to this; 0 disables (paper: none)")
    max_steps: int = opt(50_000, help="optimizer steps to train for")
    mixed_precision: str | None = opt(None, help="no, fp16 or bf16 autocast [default: "
                                      "accelerate's: its launch flag or config, else no]",
                                      choices=MIXED_PRECISION)
    cpu: bool = opt(False, help="train on the CPU even when a GPU is present")
    seed: int = opt(0, help="seed of the initialisation, the data order and all noise")
    num_workers: int = opt(4, help="DataLoader worker processes (does not change the data)")
    save_every: int = opt(1000, help="write a train state every N steps (and at the end)")
    keep_last: int = opt(2, help="train states to keep")
    log_every: int = opt(10, help="TensorBoard scalars every N steps")
    val_data: str | None = opt(None, help="held-out image folder for PSNR/SSIM validation")
    val_every: int = opt(1000, help="validate every N steps")
    val_images: int = opt(8, help="validation images (the first N, sorted)")
    val_qf: int = opt(10, help="JPEG quality of the validation inputs")
    val_crop: int | None = opt(None, help="validation images are centre-cropped to at most "
                               "this square [default: as --crop]")
    resume: bool = opt(False, help="continue the run in --out from its newest train state")


def validate_common(cfg: TrainConfig) -> list[str]:
    """Problems with the fields every stage shares (empty when all is well)."""
    p = []
    for name in ("crop", "batch_size", "grad_accum", "max_steps", "save_every", "keep_last",
                 "log_every", "val_every", "val_images", "val_crop"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            p.append(f"{name}={getattr(cfg, name)} must be >= 1")
    if not 1 <= cfg.qf_min <= cfg.qf_max <= 100:
        p.append(f"qf range [{cfg.qf_min}, {cfg.qf_max}] must satisfy 1 <= min <= max <= 100")
    if not 1 <= cfg.val_qf <= 100:
        p.append(f"val_qf={cfg.val_qf} must be in 1..100")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        p.append(f"lr={cfg.lr} must be a positive number")
    for name in ("warmup_steps", "num_workers", "grad_clip"):
        if getattr(cfg, name) < 0:
            p.append(f"{name}={getattr(cfg, name)} must be >= 0")
    if cfg.lr_schedule not in LR_SCHEDULES:
        p.append(f"lr_schedule={cfg.lr_schedule!r} must be one of {LR_SCHEDULES}")
    if cfg.mixed_precision is not None and cfg.mixed_precision not in MIXED_PRECISION:
        p.append(f"mixed_precision={cfg.mixed_precision!r} must be one of {MIXED_PRECISION}")
    return p


def with_crops(cfg: TrainConfig, preset: str) -> TrainConfig:
    """`cfg` with unset crop sides filled in: the preset's SAIPE input side (512 for sd21, the
    paper's crop; 64 for the tiny presets), or the paper's crop for any other config."""
    side = PRESETS[preset].saipe.image_size if preset in PRESETS else PAPER_CROP
    crop = cfg.crop or side
    return dataclasses.replace(cfg, crop=crop, val_crop=cfg.val_crop or crop)


def raise_problems(problems: list[str]) -> None:
    if problems:
        raise ValueError("invalid training config: " + "; ".join(problems))


# Optional numbers default to None, which says nothing of their type: without one click would
# hand the train function a string.
_OPTIONAL_NUMBERS = {"int | None": int, "float | None": float}


def config_options(cls: type) -> Callable:
    """Click options for every field of the config dataclass `cls` (`--field-name`)."""
    def decorate(fn: Callable) -> Callable:
        for f in reversed(dataclasses.fields(cls)):
            meta, flag = dict(f.metadata), "--" + f.name.replace("_", "-")
            help_text, choices = meta.pop("help", ""), meta.pop("choices", None)
            required = f.default is dataclasses.MISSING
            kw: dict[str, Any] = {"help": help_text, "show_default": True, "required": required}
            if not required:
                kw["default"] = f.default
            if isinstance(f.default, bool):
                flag = f"{flag}/--no-{flag[2:]}"
            elif choices:
                kw["type"] = click.Choice(choices)
            elif "type" in meta:
                kw["type"] = meta["type"]
            elif not required and f.default is not None:
                kw["type"] = type(f.default)
            elif f.type in _OPTIONAL_NUMBERS:
                kw["type"] = _OPTIONAL_NUMBERS[f.type]
            fn = click.option(flag, f.name, **kw)(fn)
        return fn
    return decorate


class Diverged(RuntimeError):
    """A loss term or a trained tensor became NaN/inf; nothing of that step was saved."""


def run_cli(train: Callable[[Any], Any], cls: type, kwargs: dict[str, Any]) -> None:
    """Build the config, train, and turn bad input into one error line (no traceback)."""
    try:
        train(cls(**kwargs))
    except Diverged as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(EXIT_DIVERGED)
    except (ValueError, FileNotFoundError) as e:  # CheckpointError, BaseModelError included
        raise click.ClickException(str(e)) from None

