"""Checkpoints: one folder per model, rebuilt from the folder alone.

Layout:
    sodiff.json                       format, format_version, config, base ("embedded"/"external")
    model.safetensors                 the weights (all of them, or only the trained ones)
    pytorch_lora_weights.safetensors  the UNet LoRA in diffusers' format, for other tools

A model built on a local SD2.1-base folder saves only what it trained (SAIPE, predictor, LoRA):
loading needs the same base again. Any other model (the tiny preset) embeds its UNet and VAE.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import __version__
from .config import FORMAT_VERSION, ModelConfig
from .lora import save_diffusers_lora
from .model import SODiff

META_FILE = "sodiff.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_NAME = "sodiff-checkpoint"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message says what is wrong."""


def _is_base_key(key: str, model: SODiff) -> bool:
    if key.startswith("vae."):
        return True
    return key.startswith("unet.") and model.cfg.lora is not None and "lora_" not in key


def saved_state(model: SODiff, embed_base: bool) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint of `model` holds."""
    return {k: v for k, v in model.state_dict().items()
            if embed_base or not _is_base_key(k, model)}


def save(model: SODiff, folder: str | Path, embed_base: bool | None = None,
         extra: dict[str, Any] | None = None) -> Path:
    """Write `model` to `folder` atomically (a crash leaves the old checkpoint, or none)."""
    if model.lora_merged:
        raise CheckpointError("cannot save a model whose LoRA was merged; save before merging")
    folder = Path(folder)
    embed = model.base_dir is None if embed_base is None else embed_base
    state = {k: v.detach().cpu().contiguous() for k, v in saved_state(model, embed).items()}
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "sodiff_version": __version__,
            "config": model.cfg.to_dict(), "base": "embedded" if embed else "external",
            "num_tensors": len(state), **(extra or {})}
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if model.cfg.lora is not None:
            save_diffusers_lora(model.unet, tmp)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        _replace_dir(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _replace_dir(new: Path, folder: Path) -> None:
    old = None
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(new, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_meta(folder: str | Path) -> dict[str, Any]:
    """Validate and return a checkpoint's `sodiff.json`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    meta_file = folder / META_FILE
    if not meta_file.is_file():
        raise CheckpointError(f"{folder} is not a SODiff checkpoint: {META_FILE} is missing")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_file} is corrupted (not valid JSON: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{meta_file} is not a SODiff checkpoint description")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{folder}: checkpoint format version {meta.get('format_version')!r}"
                              f" is not supported (this sodiff reads version {FORMAT_VERSION})")
    return meta


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is corrupted or truncated ({e})") from None


def check_state(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor],
                where: Path) -> None:
    """Raise CheckpointError naming missing, unexpected and mis-shaped tensors."""
    problems = []
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        problems.append(f"{len(missing)} missing tensors (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors (e.g. {', '.join(unexpected[:3])})")
    for k in sorted(set(expected) & set(found)):
        if expected[k].shape != found[k].shape:
            problems.append(f"{k}: shape {tuple(found[k].shape)} in the checkpoint, "
                            f"{tuple(expected[k].shape)} in the model")
    if problems:
        raise CheckpointError(f"{where} does not fit its config: " + "; ".join(problems))


def load(folder: str | Path, base_dir: str | Path | None = None,
         map_location: str | torch.device = "cpu") -> SODiff:
    """Rebuild the model of checkpoint `folder`; `base_dir` is needed for an external base."""
    folder = Path(folder)
    meta = read_meta(folder)
    try:
        cfg = ModelConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{folder / META_FILE}: bad model config ({e})") from None
    weights = read_weights(folder)
    if meta.get("base") == "external":
        if base_dir is None:
            raise CheckpointError(f"checkpoint {folder} was trained on a local SD2.1-base folder "
                                  f"and needs it again: pass --base DIR")
        model = SODiff.from_base(cfg, base_dir)
        _check_base(cfg, model.cfg, base_dir)
    else:
        model = SODiff(cfg)
    check_state(saved_state(model, meta.get("base") != "external"), weights, folder / WEIGHTS_FILE)
    model.load_state_dict(weights, strict=False)
    return model.to(map_location)


def _check_base(saved: ModelConfig, loaded: ModelConfig, base_dir: str | Path) -> None:
    for part in ("unet", "vae"):
        a, b = getattr(saved, part), getattr(loaded, part)
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if diff:
            raise CheckpointError(f"base folder {base_dir}: its {part} config differs from the one "
                                  f"the checkpoint was trained on in {', '.join(diff[:5])}")

