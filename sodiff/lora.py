"""LoRA on the diffusers UNet through peft: add, merge, save in the diffusers format."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .config import LoRAConfig

ADAPTER = "default"
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' file name for pipeline LoRAs


def add_lora(unet: nn.Module, cfg: LoRAConfig) -> None:
    """Wrap the UNet's target layers with LoRA adapters (B initialised to zero, so the model is
    unchanged until trained) and freeze everything else in the UNet."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                target_modules=list(cfg.target_modules),
                                init_lora_weights="gaussian"), adapter_name=ADAPTER)
    for name, p in unet.named_parameters():
        p.requires_grad_("lora_" in name)


def has_lora(unet: nn.Module) -> bool:
    return any("lora_" in name for name, _ in unet.named_parameters())


def merge_lora(unet: nn.Module) -> int:
    """Fold every LoRA adapter into its base layer and replace the wrapper by the plain layer,
    leaving an ordinary diffusers UNet (what export needs). Returns the number of merged layers."""
    from peft.tuners.lora import LoraLayer

    targets = [(name, m) for name, m in unet.named_modules() if isinstance(m, LoraLayer)]
    for name, module in targets:
        module.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        setattr(parent, child, module.get_base_layer())
    if hasattr(unet, "peft_config"):
        del unet.peft_config
    unet._hf_peft_config_loaded = False
    return len(targets)


def save_diffusers_lora(unet: nn.Module, folder: Path) -> Path:
    """Write the LoRA as diffusers' `pytorch_lora_weights.safetensors` (keys `unet.<peft key>`,
    adapter config in the metadata), which `StableDiffusionPipeline.load_lora_weights` reads."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    layers = {k: v.detach().contiguous()
              for k, v in get_peft_model_state_dict(unet, adapter_name=ADAPTER).items()}
    meta = unet.peft_config[ADAPTER].to_dict()
    meta = {k: sorted(v) if isinstance(v, set) else v for k, v in meta.items()}
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers,
                                              weight_name=LORA_FILE,
                                              unet_lora_adapter_metadata=meta)
    return Path(folder) / LORA_FILE


def lora_parameters(unet: nn.Module) -> list[torch.nn.Parameter]:
    return [p for name, p in unet.named_parameters() if "lora_" in name]
