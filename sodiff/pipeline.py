"""A diffusers-style front end: `SODiffPipeline`, a `DiffusionPipeline` over the four parts.

    pipe = SODiffPipeline.from_checkpoint()            # the bundled tiny model
    restored = pipe(Image.open("photo.jpg")).images[0]
    pipe.save_pretrained("sodiff-tiny")                # diffusers' folder layout
    pipe = SODiffPipeline.from_pretrained("sodiff-tiny")

The folder holds `model_index.json` and one subfolder per component: `unet` (the UNet with
its LoRA merged, a plain `UNet2DConditionModel`), `vae`, `saipe` and `predictor` (the two
SODiff parts, as diffusers models). Only local folders load: nothing is ever downloaded.
Outputs equal `SODiff.restore`'s: the same steps on the same weights.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from numbers import Real
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline, ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.utils import BaseOutput
from PIL import Image

from . import base as base_mod
from . import bundled
from .config import (BETA_END, BETA_START, NUM_TRAIN_TIMESTEPS, ModelConfig, PredictorConfig,
                     SAIPEConfig, _sub, parse_timestep_mode)
from .model import keep_mean_colour, pad_reflect, resize_for_saipe
from .predictor import TimestepPredictor
from .saipe import SAIPE
from .schedule import alphas_cumprod, interp_alpha, x0_from_eps

OUTPUT_TYPES = ("pil", "np", "pt")  # PIL images; HxWx3 float32 arrays and [3,H,W] tensors in [0, 1]


class SAIPEModel(ModelMixin, ConfigMixin):
    """SAIPE as a diffusers model, so pipelines save and load it: image -> (prompt, rec)."""

    @register_to_config
    def __init__(self, architecture: dict | None = None):
        super().__init__()
        self.net = SAIPE(_sub(SAIPEConfig, architecture or {}))  # `architecture`: SAIPEConfig

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net(image)


class PredictorModel(ModelMixin, ConfigMixin):
    """The QF-aware timestep predictor as a diffusers model: image -> (tau, qf, logits)."""

    @register_to_config
    def __init__(self, architecture: dict | None = None):
        super().__init__()
        self.net = TimestepPredictor(_sub(PredictorConfig, architecture or {}))

    def forward(self, image: torch.Tensor):
        return self.net(image)


@dataclass
class SODiffPipelineOutput(BaseOutput):
    images: list                  # restored images, in `output_type`, one per input
    timesteps: list[float]        # the (fractional) timestep tau each image was restored at
    qf: list[float] | None        # the predicted JPEG quality per image (None: fixed timestep)


class SODiffPipeline(DiffusionPipeline):
    """One-step JPEG artifact removal (SODiff) as a diffusers pipeline; see the module doc."""

    model_cpu_offload_seq = "saipe->predictor->vae->unet"

    def __init__(self, unet, vae, saipe: SAIPEModel, predictor: PredictorModel,
                 timestep_mode: str = "predicted", num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
                 beta_start: float = BETA_START, beta_end: float = BETA_END,
                 scaling_factor: float | None = None):
        super().__init__()
        parse_timestep_mode(timestep_mode)  # ValueError naming a bad mode, before anything else
        self.register_modules(unet=unet, vae=vae, saipe=saipe, predictor=predictor)
        if scaling_factor is None:  # SODiff's rule: the VAE config's factor, else 1
            scaling_factor = float(dict(vae.config).get("scaling_factor", 1.0))
        self.register_to_config(timestep_mode=timestep_mode,
                                num_train_timesteps=num_train_timesteps, beta_start=beta_start,
                                beta_end=beta_end, scaling_factor=scaling_factor)
        # The VAE factor times the UNet's downsampling, computed as ModelConfig does.
        self.pad_multiple = ModelConfig(name="pipeline", unet=dict(unet.config),
                                        vae=dict(vae.config),
                                        vae_class=type(vae).__name__).pad_multiple
        self._alphas: torch.Tensor | None = None

    @classmethod
    def from_checkpoint(cls, folder: str | Path | None = None, base: str | Path | None = None
                        ) -> "SODiffPipeline":
        """A SODiff checkpoint folder (default: the bundled tiny model) as a pipeline, its UNet
        LoRA merged. `base`: the local SD2.1-base folder an external-base checkpoint needs."""
        from .checkpoint import load

        model = load(folder if folder is not None else bundled.checkpoint_dir(), base).eval()
        if model.cfg.lora is not None:
            model.merge_lora()
        saipe, predictor = SAIPEModel(dataclasses.asdict(model.cfg.saipe)), PredictorModel(
            dataclasses.asdict(model.cfg.predictor))
        saipe.net, predictor.net = model.saipe, model.predictor  # the loaded weights themselves
        cfg = model.cfg
        return cls(model.unet, model.vae, saipe.eval(), predictor.eval(), cfg.timestep_mode,
                   cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end, cfg.scaling_factor)

    @classmethod
    def from_pretrained(cls, folder: str | Path, **kwargs) -> "SODiffPipeline":
        """Load a folder written by `save_pretrained`; local folders only, never the Hub."""
        folder = Path(folder)
        if not (folder / "model_index.json").is_file():
            raise ValueError(f"{folder} is not a saved SODiffPipeline (no model_index.json); "
                             f"pass a folder written by save_pretrained (nothing is downloaded)")
        kwargs.setdefault("local_files_only", True)
        return super().from_pretrained(str(folder), **kwargs)

    @torch.no_grad()
    def __call__(self, image, timestep: float | None = None, output_type: str = "pil",
                 return_dict: bool = True, keep_colour: bool = True):
        """Restore one PIL image or a list of them (any size; converted to RGB). `timestep`:
        None for the checkpoint's mode (the predictor, unless it was fixed), or a number in
        [0, num_train_timesteps - 1] to fix it. `output_type`: pil, np or pt. `keep_colour`:
        the input's mean colour, as `SODiff.restore`."""
        images = _check_call(image, timestep, output_type, self.config.num_train_timesteps,
                             keep_colour)
        outs, taus, qfs = [], [], []
        for im in images:
            restored, tau, qf = self._restore(_to_tensor(im, self.device, self.unet.dtype),
                                              timestep, keep_colour)
            outs.append(_convert(restored, output_type))
            taus.append(float(tau))
            qfs.append(None if qf is None else float(qf))
        qf_out = None if any(q is None for q in qfs) else qfs
        if not return_dict:
            return (outs,)
        return SODiffPipelineOutput(images=outs, timesteps=taus, qf=qf_out)

    def _restore(self, lq: torch.Tensor, timestep: float | None, keep_colour: bool):
        """SODiff.restore's steps: prompt and tau from the image as given, reflect-pad to
        `pad_multiple`, one UNet step (Eq. 6), decode, crop back, the input's mean colour."""
        h, w = lq.shape[-2:]
        m, s = self.pad_multiple, self.config.scaling_factor
        prompt, _ = self.saipe(resize_for_saipe(lq, self.saipe.net.cfg.image_size))
        tau, qf = self._timestep(lq, timestep)
        z_lq = base_mod.encode_mean(self.vae, pad_reflect(lq, -h % m, -w % m), s)
        eps = self.unet(z_lq, tau.to(z_lq.dtype), encoder_hidden_states=prompt.to(z_lq.dtype)
                        ).sample
        z_hq = x0_from_eps(z_lq, eps, interp_alpha(self._alpha_table(lq.device), tau))
        out = base_mod.decode(self.vae, z_hq, s)
        out = out.clamp(-1, 1)[..., :h, :w]
        out = keep_mean_colour(out, lq) if keep_colour else out
        return out, tau[0], None if qf is None else qf[0]

    def _timestep(self, lq: torch.Tensor, timestep: float | None):
        fixed = float(timestep) if timestep is not None else parse_timestep_mode(
            self.config.timestep_mode)
        if fixed is None:
            tau, qf, _ = self.predictor(lq)
            return tau, qf
        return torch.full((lq.shape[0],), fixed, device=lq.device, dtype=torch.float32), None

    def _alpha_table(self, device: torch.device) -> torch.Tensor:
        if self._alphas is None or self._alphas.device != device:
            c = self.config
            self._alphas = alphas_cumprod(c.num_train_timesteps, c.beta_start, c.beta_end
                                          ).to(device)
        return self._alphas


def _check_call(image, timestep, output_type: str, steps: int,
                keep_colour: bool = True) -> list[Image.Image]:
    """The inputs as a list of PIL images; ValueError naming each bad argument."""
    images = [image] if isinstance(image, Image.Image) else image
    problems = []
    if not isinstance(images, (list, tuple)) or not images or not all(
            isinstance(im, Image.Image) for im in images):
        problems.append(f"image must be a PIL image or a non-empty list of them, got "
                        f"{type(image).__name__}")
    if timestep is not None and (isinstance(timestep, bool) or not isinstance(timestep, Real)
                                 or not 0 <= timestep <= steps - 1):
        problems.append(f"timestep={timestep!r} must be None (the checkpoint's mode) or a "
                        f"number in [0, {steps - 1}]")
    if output_type not in OUTPUT_TYPES:
        problems.append(f"output_type={output_type!r} must be one of {', '.join(OUTPUT_TYPES)}")
    if not isinstance(keep_colour, bool):
        problems.append(f"keep_colour={keep_colour!r} must be True or False")
    if problems:
        raise ValueError("SODiffPipeline: " + "; ".join(problems))
    return list(images)


def _to_tensor(im: Image.Image, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """RGB uint8 -> [1,3,H,W] in [-1, 1], the scaling training and export use."""
    x = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)[None]
    return (x.float() / 127.5 - 1).to(device=device, dtype=dtype)


def _convert(out: torch.Tensor, output_type: str):
    """[1,3,H,W] in [-1, 1] -> the requested type (uint8 rounding as training's to_uint8)."""
    unit = (out[0].float().cpu() + 1) / 2
    if output_type == "pt":
        return unit
    if output_type == "np":
        return unit.permute(1, 2, 0).numpy()
    pixels = out[0].float().cpu().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())
