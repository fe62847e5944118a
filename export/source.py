"""Where the exported model comes from: seeded random weights of a preset, or a checkpoint
(the bundled one by default), with what identifies them for the skip-unchanged hashes."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from sodiff import bundled
from sodiff.base import BaseModelError
from sodiff.checkpoint import META_FILE, WEIGHTS_FILE, CheckpointError
from sodiff.config import get_preset
from sodiff.model import SODiff

from . import manifest as mf
from .errors import ExportError, MissingCheckpointError, OptionError
from .plan import ExportPlan
from .samples import folder_digest

DEFAULT_CHECKPOINT = bundled.checkpoint_dir()  # the wheel's copy, or the checkout's weights/tiny


@dataclass
class Loaded:
    model: SODiff
    checkpoint: dict   # the manifest's `checkpoint` entry
    identity: dict     # what the weights' identity is, for the skip-unchanged hashes


def load_model(plan: ExportPlan) -> Loaded:
    """The model to export: seeded random weights of a preset, or a checkpoint."""
    if plan.random_weights:
        try:
            cfg = get_preset(plan.preset)
        except ValueError as e:
            raise OptionError(f"--preset: {e}") from None
        torch.manual_seed(plan.seed)
        return Loaded(SODiff(cfg).eval(), {"path": None, "sha256": None,
                                           "random_seed": plan.seed},
                      {"random": cfg.to_dict(), "seed": plan.seed})
    folder = Path(plan.checkpoint) if plan.checkpoint is not None else DEFAULT_CHECKPOINT
    if plan.checkpoint is None and not folder.is_dir():
        raise MissingCheckpointError(
            f"no --checkpoint given and the bundled default checkpoint {folder} is missing; "
            f"pass --checkpoint DIR, or --preset NAME --random-weights for an untrained model")
    try:
        from sodiff.checkpoint import load
        model = load(folder, plan.base)
    except (CheckpointError, BaseModelError) as e:
        raise ExportError(str(e)) from None
    sha = mf.sha256_files([folder / META_FILE, folder / WEIGHTS_FILE])
    base = None
    if plan.base is not None:
        files = sorted(p for p in Path(plan.base).rglob("*") if p.is_file())
        base = folder_digest(files)
    return Loaded(model.eval(), {"path": str(folder), "sha256": sha},
                  {"checkpoint": sha, "base": base})
