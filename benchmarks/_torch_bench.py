"""The PyTorch side of the latency benchmark: the model, per-component callables with the
exported components' inputs and outputs (docs/engine-dir.md), eager/compiled backends, FLOPs."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from sodiff import base as base_mod
from sodiff.config import ModelConfig, get_preset, parse_timestep_mode
from sodiff.model import SODiff, resize_for_saipe

from ._common import COMPONENTS, PIPELINE

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_TAU = 500.0   # the timestep fed to the UNet when timed alone (any value costs the same)
COMPILE_MODE_GPU = "reduce-overhead"  # torch.compile with CUDA graphs
COMPILE_MODE_CPU = "default"


@dataclass(frozen=True)
class ModelSource:
    preset: str | None        # a preset name (with random_weights, or a base folder)
    random_weights: bool      # time the architecture without any weights
    checkpoint: Path | None   # a SODiff checkpoint folder
    base: Path | None         # the local SD2.1-base folder a checkpoint or preset needs
    config: ModelConfig | None = None  # an explicit config (an engine dir's manifest)

    def describe(self) -> str:
        if self.checkpoint is not None:
            return f"checkpoint {self.checkpoint}"
        name = self.preset or (self.config.name if self.config else "?")
        return f"preset {name}" + (" (random weights)" if self.random_weights else "")


def model_config(src: ModelSource) -> ModelConfig:
    """The architecture `src` describes (a checkpoint's own config when it has one)."""
    if src.config is not None:
        return src.config
    if src.checkpoint is not None:
        from sodiff.checkpoint import read_meta
        return ModelConfig.from_dict(read_meta(src.checkpoint)["config"])
    return get_preset(src.preset)


def _inference_config(cfg: ModelConfig) -> ModelConfig:
    # Deployment merges the LoRA into the UNet, which leaves the plain UNet: building without
    # LoRA gives the same graph and cost without peft's wrappers.
    return cfg.replace(lora=None)


def build_model(src: ModelSource, device: str) -> SODiff:
    """The model in eval mode, LoRA merged, fp32, on `device`."""
    if src.checkpoint is not None:
        from sodiff import checkpoint
        model = checkpoint.load(src.checkpoint, base_dir=src.base)
        if model.cfg.lora is not None:
            model.merge_lora()
        return model.to(device).eval()
    cfg = _inference_config(model_config(src))
    if src.random_weights or src.config is not None:
        with torch.device(device):  # initialise on the device: seconds instead of minutes
            return SODiff(cfg).eval()
    if src.base is None:
        raise ValueError(f"preset {src.preset!r} needs --random-weights (time the architecture) "
                         f"or --base DIR (a local SD2.1-base folder)")
    return SODiff.from_base(cfg, src.base).to(device).eval()


def check_size(cfg: ModelConfig, h: int, w: int) -> None:
    m = cfg.pad_multiple
    if h % m or w % m:
        raise ValueError(f"size {h}x{w} is not a multiple of the preset's pad_multiple {m} "
                         f"(sizes are what the components see, after padding)")


def fixed_tau(cfg: ModelConfig) -> float | None:
    return parse_timestep_mode(cfg.timestep_mode)


class Components:
    """The five exported components of a model as callables, plus the whole pipeline."""

    def __init__(self, model: SODiff):
        self.model = model
        self.cfg = model.cfg
        self.s = model.cfg.scaling_factor
        self.tau = fixed_tau(model.cfg)
        self.unet_fn: Callable[..., torch.Tensor] = model.denoise

    def saipe(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.saipe.prompt(image)

    def predictor(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tau, qf, _ = self.model.predictor(image)
        return tau, qf

    def vae_encoder(self, image: torch.Tensor) -> torch.Tensor:
        return base_mod.encode_mean(self.model.vae, image, self.s)

    def unet(self, latent: torch.Tensor, timestep: torch.Tensor, prompt: torch.Tensor
             ) -> torch.Tensor:
        return self.unet_fn(latent, timestep, prompt)

    def vae_decoder(self, latent: torch.Tensor) -> torch.Tensor:
        return base_mod.decode(self.model.vae, latent, self.s)

    def pipeline(self, image: torch.Tensor) -> torch.Tensor:
        prompt = self.saipe(resize_for_saipe(image, self.cfg.saipe.image_size))
        if self.tau is None:
            tau, _ = self.predictor(image)
        else:
            tau = torch.full((image.shape[0],), self.tau, device=image.device)
        latent = self.unet(self.vae_encoder(image), tau, prompt)
        return self.vae_decoder(latent).clamp(-1, 1)

    def names(self) -> list[str]:
        """Components this model deploys (no predictor under a fixed timestep) + pipeline."""
        return [c for c in COMPONENTS if c != "predictor" or self.tau is None] + [PIPELINE]


def make_inputs(cfg: ModelConfig, h: int, w: int, batch: int, device: str,
                dtype: torch.dtype, seed: int = 0) -> dict[str, tuple[torch.Tensor, ...]]:
    """Random inputs of every component at image size h x w (seeded, same for every backend)."""
    g = torch.Generator().manual_seed(seed)
    f, c, s = cfg.vae_factor, cfg.latent_channels, cfg.saipe.image_size

    def rand(*shape: int, normal: bool = False) -> torch.Tensor:
        t = torch.randn(shape, generator=g) if normal else torch.rand(shape, generator=g) * 2 - 1
        return t.to(device=device, dtype=dtype)

    image = rand(batch, 3, h, w)
    latent = rand(batch, c, h // f, w // f, normal=True)
    timestep = torch.full((batch,), DEFAULT_TAU, device=device, dtype=dtype)
    prompt = rand(batch, cfg.saipe.num_queries, cfg.saipe.prompt_dim, normal=True)
    return {"saipe": (rand(batch, 3, s, s),), "predictor": (image,), "vae_encoder": (image,),
            "unet": (latent, timestep, prompt), "vae_decoder": (latent,), PIPELINE: (image,)}


class TorchRunner:
    """One PyTorch backend: a (possibly half-precision, possibly compiled) copy of the model."""

    def __init__(self, model: SODiff, kind: str, precision: str, device: str,
                 compile_modules: tuple[str, ...] = ("unet",), channels_last: bool = False):
        self.device, self.dtype, self.kind = device, DTYPES[precision], kind
        self.channels_last = channels_last
        if precision != "fp32" or channels_last:
            model = copy.deepcopy(model).to(self.dtype)
        if channels_last:  # 4-D weights (convolutions) NHWC; everything else unchanged
            model = model.to(memory_format=torch.channels_last)
        self.comp = Components(model)
        self.weight_bytes = sum(t.numel() * t.element_size()
                                for t in (*model.parameters(), *model.buffers()))
        self.compiled: tuple[str, ...] = ()
        self.cuda_graphs = kind == "compiled" and device == "cuda"
        if kind == "compiled":
            self.compiled = self._compile(compile_modules)

    def _compile(self, modules: tuple[str, ...]) -> tuple[str, ...]:
        mode = COMPILE_MODE_GPU if self.device == "cuda" else COMPILE_MODE_CPU
        done = []
        for name in modules:
            if name == "unet":
                self.comp.unet_fn = torch.compile(self.comp.model.denoise, mode=mode,
                                                  dynamic=False)
            elif name in COMPONENTS:
                setattr(self.comp, name, torch.compile(getattr(self.comp, name), mode=mode,
                                                       dynamic=False))
            else:
                raise ValueError(f"cannot compile {name!r}; choose from {', '.join(COMPONENTS)}")
            done.append(name)
        return tuple(done)

    def measured(self, name: str) -> bool:
        """Compiled backends time only their compiled components, and the pipeline."""
        return self.kind != "compiled" or name == PIPELINE or name in self.compiled

    def callable(self, name: str, inputs: dict[str, tuple[torch.Tensor, ...]]
                 ) -> Callable[[], Any]:
        fn, args = getattr(self.comp, name), inputs[name]
        if self.channels_last:
            args = tuple(a.contiguous(memory_format=torch.channels_last) if a.dim() == 4 else a
                         for a in args)
        mark = torch.compiler.cudagraph_mark_step_begin if self.cuda_graphs else None

        @torch.no_grad()  # not inference_mode: CUDA-graph trees expect ordinary tensors
        def call() -> Any:
            if mark is not None:
                mark()  # a new CUDA-graph step: the previous outputs may be overwritten
            return fn(*args)
        return call


def count_flops(cfg: ModelConfig, h: int, w: int) -> dict[str, int]:
    """FLOPs of one batch-1 forward of each component and of the pipeline at h x w, counted by
    PyTorch's FlopCounterMode on meta tensors (no memory, no weights, no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = SODiff(_inference_config(cfg)).eval()
    comp = Components(model)
    inputs = make_inputs(cfg, h, w, 1, "meta", torch.float32)
    flops = {}
    for name in comp.names():
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            getattr(comp, name)(*inputs[name])
        flops[name] = int(counter.get_total_flops())
    return flops


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    with torch.device("meta"):
        model = SODiff(_inference_config(cfg))
    parts: dict[str, nn.Module] = {"saipe": model.saipe, "predictor": model.predictor,
                                   "unet": model.unet, "vae": model.vae}
    return {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}
