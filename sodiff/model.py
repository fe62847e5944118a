"""The SODiff pipeline: SAIPE prompt + QF-aware timestep + one-step LoRA UNet between a VAE."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import base as base_mod
from .config import ModelConfig, parse_timestep_mode, validate_config
from .lora import add_lora, has_lora, merge_lora
from .predictor import TimestepPredictor
from .saipe import SAIPE
from .schedule import alphas_cumprod, interp_alpha, x0_from_eps


@dataclass
class SODiffOutput:
    restored: torch.Tensor        # [B,3,H,W] in [-1, 1] (clamped decoder output)
    decoded: torch.Tensor         # the decoder output before clamping (what losses see)
    prompt: torch.Tensor          # SAIPE's image prompt [B,77,D]
    rec: torch.Tensor             # SAIPE's reconstruction at its input size
    tau: torch.Tensor             # [B] the (fractional) timestep used
    qf: torch.Tensor | None       # [B] predicted quality factor (None for a fixed timestep)
    logits: torch.Tensor | None   # [B,t_max] timestep logits (None for a fixed timestep)
    z_lq: torch.Tensor            # E(lq) * s
    z_hq: torch.Tensor            # Eq. 6's clean latent


def resize_for_saipe(image: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear, antialiased when shrinking: the filter PIL's BILINEAR uses, which the
    torch-free runtime reproduces in numpy."""
    if image.shape[-2:] == (size, size):
        return image
    return F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True)


class SODiff(nn.Module):
    """The full model. Build with `SODiff(cfg)` (random weights), `SODiff.from_base(cfg, dir)`,
    or load a checkpoint with `sodiff.checkpoint.load`."""

    def __init__(self, cfg: ModelConfig, unet: nn.Module | None = None,
                 vae: nn.Module | None = None):
        super().__init__()
        validate_config(cfg)
        self.cfg = cfg
        self.base_dir: Path | None = None  # set when the UNet/VAE came from a base folder
        self.saipe = SAIPE(cfg.saipe)
        self.predictor = TimestepPredictor(cfg.predictor)
        self.unet = unet if unet is not None else base_mod.build_unet(cfg.unet)
        self.vae = vae if vae is not None else base_mod.build_vae(cfg.vae_class, cfg.vae)
        self.vae.requires_grad_(False)
        if cfg.lora is not None:
            add_lora(self.unet, cfg.lora)
        self.register_buffer("alphas_cumprod", alphas_cumprod(
            cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end), persistent=False)

    @classmethod
    def from_base(cls, cfg: ModelConfig, base_dir: str | Path) -> "SODiff":
        """Build on a local SD2.1-base folder: its UNet and VAE (and their configs) replace the
        preset's, everything else comes from `cfg`."""
        unet, vae, unet_cfg, vae_cfg, vae_class = base_mod.load_base(base_dir)
        cfg = cfg.replace(unet=unet_cfg, vae=vae_cfg, vae_class=vae_class)
        model = cls(cfg, unet=unet, vae=vae)
        model.base_dir = Path(base_dir)
        return model

    @property
    def lora_merged(self) -> bool:
        return self.cfg.lora is not None and not has_lora(self.unet)

    def merge_lora(self) -> "SODiff":
        """Fold the LoRA into the UNet weights (for export and fast inference). Irreversible."""
        merge_lora(self.unet)
        return self

    def timestep(self, lq: torch.Tensor, mode: str | float | None = None, gumbel: bool = False,
                 generator: torch.Generator | None = None):
        """`(tau, qf, logits)` for `lq` under `mode` (default: the config's timestep mode)."""
        fixed = mode if isinstance(mode, float) else parse_timestep_mode(
            mode or self.cfg.timestep_mode)
        if fixed is None:
            return self.predictor(lq, gumbel=gumbel, generator=generator)
        tau = torch.full((lq.shape[0],), fixed, device=lq.device, dtype=torch.float32)
        return tau, None, None

    def denoise(self, z_lq: torch.Tensor, tau: torch.Tensor, prompt: torch.Tensor
                ) -> torch.Tensor:
        """One UNet step from `z_lq` at fractional `tau`, then Eq. 6 to the clean latent."""
        eps = self.unet(z_lq, tau.to(z_lq.dtype), encoder_hidden_states=prompt.to(z_lq.dtype)
                        ).sample
        alpha = interp_alpha(self.alphas_cumprod, tau)
        return x0_from_eps(z_lq, eps, alpha)

    def forward(self, lq: torch.Tensor, mode: str | float | None = None, gumbel: bool = False,
                generator: torch.Generator | None = None, view: torch.Tensor | None = None
                ) -> SODiffOutput:
        """Restore `lq` ([B,3,H,W] in [-1, 1], H and W multiples of `cfg.pad_multiple`).
        `view` (default `lq`) is the image the prompt and the timestep are computed from: in
        training, the larger crop a patch `lq` was cut from, as inference computes them from
        the whole image."""
        self._check_input(lq)
        view = lq if view is None else view
        if view.shape[:2] != lq.shape[:2]:
            raise ValueError(f"view {tuple(view.shape)} must have the batch and channels of "
                             f"lq {tuple(lq.shape)}")
        s = self.cfg.scaling_factor
        prompt, rec = self.saipe(resize_for_saipe(view, self.cfg.saipe.image_size))
        tau, qf, logits = self.timestep(view, mode, gumbel, generator)
        z_lq = base_mod.encode_mean(self.vae, lq, s)
        z_hq = self.denoise(z_lq, tau, prompt)
        decoded = base_mod.decode(self.vae, z_hq, s)
        return SODiffOutput(decoded.clamp(-1, 1), decoded, prompt, rec, tau, qf, logits, z_lq,
                            z_hq)

    @torch.no_grad()
    def restore(self, lq: torch.Tensor, mode: str | float | None = None,
                keep_colour: bool = True) -> torch.Tensor:
        """Any-size inference: prompt and `tau` from the image as given, then reflect-pad
        bottom/right to `pad_multiple` (the JPEG grid stays put), one step, crop back.
        `keep_colour`: shift each channel so its mean is the input's (`keep_mean_colour`)."""
        h, w = lq.shape[-2:]
        m, s = self.cfg.pad_multiple, self.cfg.scaling_factor
        prompt, _ = self.saipe(resize_for_saipe(lq, self.cfg.saipe.image_size))
        tau, _, _ = self.timestep(lq, mode)
        z_lq = base_mod.encode_mean(self.vae, pad_reflect(lq, -h % m, -w % m), s)
        out = base_mod.decode(self.vae, self.denoise(z_lq, tau, prompt), s)
        out = out.clamp(-1, 1)[..., :h, :w]
        return keep_mean_colour(out, lq) if keep_colour else out

    def _check_input(self, lq: torch.Tensor) -> None:
        m = self.cfg.pad_multiple
        if lq.dim() != 4 or lq.shape[1] != self.cfg.saipe.in_channels:
            raise ValueError(f"expected an image batch [B,{self.cfg.saipe.in_channels},H,W], "
                             f"got shape {tuple(lq.shape)}")
        if lq.shape[-2] % m or lq.shape[-1] % m:
            raise ValueError(f"image size {tuple(lq.shape[-2:])} is not a multiple of {m}; "
                             f"use SODiff.restore(), which pads and crops")


def keep_mean_colour(out: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """`out` shifted, per image and channel, to the mean of `lq`, then clamped to [-1, 1].
    A JPEG keeps each 8x8 block's mean to within half its DC step, so over a whole image (or
    a runtime tile) the input's mean colour is the original's to a fraction of a grey level,
    while a one-step UNet can add a cast of its training set's colours (issue 13: +0.3 grey
    levels of green on LIVE1 at QF 10)."""
    shift = lq.mean((-2, -1), keepdim=True) - out.mean((-2, -1), keepdim=True)
    return (out + shift).clamp(-1, 1)


def pad_reflect(x: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    """Reflect-pad bottom/right; sides shorter than the pad fall back to replicate."""
    if not ph and not pw:
        return x
    mode = "reflect" if ph < x.shape[-2] and pw < x.shape[-1] else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)
