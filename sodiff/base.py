"""The diffusion base: building the UNet and VAE from configs or a local SD2.1-base folder.

Nothing here downloads: a base is a local diffusers folder (`unet/`, `vae/` subfolders, each with
`config.json` and its weights), and anything missing is a `BaseModelError` naming the path.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")


class BaseModelError(FileNotFoundError):
    """The local base-model folder is missing or incomplete."""


def build_unet(config: dict[str, Any]) -> nn.Module:
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(**config)


def build_vae(vae_class: str, config: dict[str, Any]) -> nn.Module:
    import diffusers
    return getattr(diffusers, vae_class)(**config)


def _check_part(base: Path, part: str) -> dict[str, Any]:
    folder = base / part
    if not folder.is_dir():
        raise BaseModelError(f"base model folder {base} has no '{part}/' subfolder; expected a "
                             f"diffusers layout (e.g. a local copy of stable-diffusion-2-1-base)")
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise BaseModelError(f"missing {cfg_file}: the base model folder is incomplete")
    if not any((folder / w).is_file() for w in WEIGHT_FILES):
        raise BaseModelError(f"no weights in {folder}: expected one of {', '.join(WEIGHT_FILES)} "
                             f"(.bin checkpoints: convert them to safetensors first)")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise BaseModelError(f"{cfg_file} is not valid JSON ({e})") from None


def read_base_configs(base_dir: str | Path) -> tuple[dict[str, Any], dict[str, Any], str]:
    """Validate `base_dir` and return (unet config, vae config, vae class name)."""
    base = Path(base_dir).expanduser()
    if not base.is_dir():
        raise BaseModelError(f"base model folder {base} does not exist; pass --base with a local "
                             f"diffusers folder of Stable Diffusion 2.1-base (nothing is downloaded)")
    unet_cfg, vae_cfg = _check_part(base, "unet"), _check_part(base, "vae")
    vae_class = vae_cfg.get("_class_name", "AutoencoderKL")
    return (_init_args("UNet2DConditionModel", unet_cfg), _init_args(vae_class, vae_cfg),
            vae_class)


def _init_args(class_name: str, config: dict[str, Any]) -> dict[str, Any]:
    """The keys of a diffusers `config.json` that the class's constructor takes. Saved configs
    may hold more (AutoencoderTiny writes `block_out_channels`, which it does not accept);
    `from_pretrained` ignores those too, and a config rebuilt from a checkpoint must not
    pass them back."""
    import inspect

    import diffusers

    cls = getattr(diffusers, class_name, None)
    if cls is None:
        return {k: v for k, v in config.items() if not k.startswith("_")}
    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in config.items() if k in params and not k.startswith("_")}


def load_base(base_dir: str | Path, dtype: torch.dtype = torch.float32
              ) -> tuple[nn.Module, nn.Module, dict[str, Any], dict[str, Any], str]:
    """Load the UNet and VAE from a local diffusers folder, offline."""
    import diffusers
    unet_cfg, vae_cfg, vae_class = read_base_configs(base_dir)
    kw = dict(local_files_only=True, torch_dtype=dtype, use_safetensors=True)
    unet = diffusers.UNet2DConditionModel.from_pretrained(base_dir, subfolder="unet", **kw)
    vae = getattr(diffusers, vae_class).from_pretrained(base_dir, subfolder="vae", **kw)
    return unet, vae, unet_cfg, vae_cfg, vae_class


def encode_mean(vae: nn.Module, image: torch.Tensor, scaling: float) -> torch.Tensor:
    """Deterministic latent: the posterior mean (never a sample) times the scaling factor."""
    out = vae.encode(image)
    if hasattr(out, "latent_dist"):
        return out.latent_dist.mean * scaling
    return out.latents * scaling


def decode(vae: nn.Module, latent: torch.Tensor, scaling: float) -> torch.Tensor:
    return vae.decode(latent / scaling).sample
