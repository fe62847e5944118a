"""What every stage's training loop shares around its own step: the learning-rate schedule,
the noise generator of each micro-batch, the parameters to clip, and the end of the run."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .common import FINAL_DIR, Run
from .config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then constant or
    cosine. Pure, so the schedule's whole state is the step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(cfg.max_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group at `lr` times its own `lr_scale` (1 when it has none)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def all_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters of every group (for gradient clipping)."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def step_generator(seed: int, step: int, micro: int, rank: int,
                   device: torch.device) -> torch.Generator:
    """The generator of one micro-batch's noise (Gumbel, discriminator timesteps): a pure
    function of its coordinates, so resuming needs no generator state."""
    sub = int(np.random.default_rng([seed, step, micro, rank]).integers(2 ** 62))
    return torch.Generator(device=device).manual_seed(sub)


def finish_run(run: Run, export: Callable[[Path, Any], object],
               final_eval: Callable[[], Any] | None = None) -> Path:
    """End `run`: on the main process `export(OUT/final, final_eval())` (None for the
    evaluation without `final_eval`), then every process waits for it. Returns OUT/final."""
    # Closed first, so that the final evaluation's messages and progress bar do not land in
    # the training bar's line.
    run.close()
    final = run.out / FINAL_DIR
    if run.acc.is_main_process:
        evaluation = final_eval() if final_eval is not None else None
        export(final, evaluation)
        run.info(f"wrote {final}")
    run.acc.wait_for_everyone()
    return final
