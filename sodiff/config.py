"""Architecture configs and named presets.

One frozen dataclass per part; a model is fully described by a `ModelConfig`, which checkpoints
store as JSON so that a model can be rebuilt from its checkpoint alone.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

FORMAT_VERSION = 1  # checkpoint format; bump on any incompatible change

# SD2.1's noise schedule (scheduler/scheduler_config.json of stable-diffusion-2-1-base).
NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012

SD21_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
    "norm_num_groups": 32,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}

SD21_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 768,
    "scaling_factor": 0.18215,
}

# The tiny preset runs whole photos on a CPU, so attention only runs at the UNet's deepest level
# (1/4 of the latent side) and the VAE is norm- and attention-free (AutoencoderTiny-style):
# attention at full latent resolution would cost O((H*W/4)^2) on a 768x512 photo.
TINY_UNET = {
    "sample_size": 32,
    "in_channels": 8,
    "out_channels": 8,
    "down_block_types": ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "attention_head_dim": 8,
    "cross_attention_dim": 64,
    "use_linear_projection": True,
    "norm_num_groups": 8,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}

TINY_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "encoder_block_out_channels": [48, 48],
    "decoder_block_out_channels": [48, 48],
    "num_encoder_blocks": [1, 1],
    "num_decoder_blocks": [1, 1],
    "act_fn": "relu",
    "latent_channels": 8,
    "scaling_factor": 1.0,
}

# LoRA targets in the SD UNet (OSEDiff's list): attention, feed-forward, resnet and
# down/up-sampler convolutions. peft matches these as module-name suffixes.
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                "ff.net.2", "conv1", "conv2", "conv_shortcut", "conv")

VAE_CLASSES = ("AutoencoderKL", "AutoencoderTiny")
# Predictor front ends: "conv", a learned 8x8 stride-8 convolution on pixels (checkpoints made
# before issue 13); "dct", the fixed block DCT with log-magnitudes (sodiff/predictor.py).
PREDICTOR_FRONTS = ("conv", "dct")


# The presets' predictor: the QF head predicts the normalised target (QF - 50) / 45, and the
# timestep logits are 1/10 of the head's output, so an Adam step of size lr moves them 10x less.
QF_SCALE = 45.0
LOGIT_SCALE = 0.1
POOL_SCALE_MAX = 100.0  # cosine pooling's logit-scale clamp: keeps the softmax finite


@dataclass(frozen=True)
class SAIPEConfig:
    in_channels: int = 3          # image channels
    image_size: int = 512         # SAIPE's input side: every image is resized to this square
    embed_dim: int = 180          # channels after E_down's stem (paper: 180)
    downsample: int = 4           # E_down's spatial reduction (paper: 4x), a power of two
    rstb_depths: tuple[int, ...] = (6, 6)  # Swin layers per RSTB in E_down (paper: 2 RSTBs)
    up_depth: int = 2             # Swin layers in D_up (paper: "fewer" than E_down)
    num_heads: int = 6            # Swin attention heads
    window_size: int = 8          # Swin window side, in tokens
    mlp_ratio: float = 2.0        # Swin feed-forward expansion
    align_patch: int = 4          # T_align unfolds p x p token patches before its input MLP
    align_dim: int = 512          # T_align width (Performer and pooling)
    performer_layers: int = 2     # Performer (FAVOR+) encoder layers
    performer_heads: int = 8      # Performer attention heads
    performer_features: int = 128  # FAVOR+ random features per head
    conv_kernels: tuple[int, ...] = (1, 3, 5)  # multi-scale depthwise convs giving keys/values
    num_queries: int = 77         # learnable pooling queries = prompt tokens (CLIP's 77)
    pool_heads: int = 8           # attention-pooling heads
    prompt_dim: int = 1024        # prompt width = the UNet's cross_attention_dim
    # None rebuilds checkpoints saved before this field: scaled dot-product pooling, whose
    # logits stayed ~0.07 wide, so every query averaged all positions alike (one token x 77).
    pool_scale: float | None = None  # cosine-attention pooling, learnable logit scale starts here


@dataclass(frozen=True)
class PredictorConfig:
    in_channels: int = 3          # image channels
    stem_channels: int = 64       # 8x8 stride-8 stem: one token per JPEG block
    channels: tuple[int, ...] = (64, 128, 256, 256)  # the four residual blocks' widths
    t_max: int = 1000             # timestep candidates 0..t_max-1 (Eq. 11)
    qf_init: float = 50.0         # QF head's initial bias: the middle of the QF range
    t_init: float | None = None   # untrained expected timestep; None: the middle, (t_max-1)/2
    # The defaults below rebuild checkpoints saved before these fields existed exactly.
    front: str = "conv"           # "conv" (learned 8x8 stem) or "dct" (fixed block DCT stem)
    logit_scale: float = 1.0      # logits = scale * head(features): < 1 slows Adam's steps on them
    qf_scale: float = 1.0         # QF = qf_init + qf_scale * head (1: the bias holds qf_init)


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 16                # paper: 16
    alpha: float = 16.0           # scale = alpha / rank
    dropout: float = 0.0
    target_modules: tuple[str, ...] = LORA_TARGETS  # module-name suffixes in the UNet


@dataclass(frozen=True)
class ModelConfig:
    name: str                     # preset name this config came from (informational)
    saipe: SAIPEConfig = field(default_factory=SAIPEConfig)
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    lora: LoRAConfig | None = field(default_factory=LoRAConfig)  # None: UNet fully fine-tuned
    unet: dict[str, Any] = field(default_factory=lambda: dict(SD21_UNET))  # diffusers config
    vae: dict[str, Any] = field(default_factory=lambda: dict(SD21_VAE))    # diffusers config
    vae_class: str = "AutoencoderKL"  # a diffusers VAE class with encode/decode
    timestep_mode: str = "predicted"  # "predicted" or "fixed:N" (N may be fractional)
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
    beta_start: float = BETA_START
    beta_end: float = BETA_END

    @property
    def vae_factor(self) -> int:
        """Pixels per latent cell along one side."""
        if self.vae_class == "AutoencoderTiny":
            return 2 ** (len(self.vae["encoder_block_out_channels"]) - 1)
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae["latent_channels"])

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.get("scaling_factor", 1.0))

    @property
    def pad_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE factor times the UNet's downsampling."""
        return self.vae_factor * 2 ** (len(self.unet["block_out_channels"]) - 1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}")
        d["saipe"] = _sub(SAIPEConfig, d.get("saipe", {}))
        d["predictor"] = _sub(PredictorConfig, d.get("predictor", {}))
        d["lora"] = None if d.get("lora") is None else _sub(LoRAConfig, d["lora"])
        cfg = cls(**d)
        validate_config(cfg)
        return cfg

    def replace(self, **changes: Any) -> "ModelConfig":
        cfg = dataclasses.replace(self, **changes)
        validate_config(cfg)
        return cfg


def _sub(kind: type, d: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown {kind.__name__} keys {sorted(unknown)}")
    # JSON turns tuples into lists; restore them so configs compare equal after a round trip.
    return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def parse_timestep_mode(mode: str) -> float | None:
    """`predicted` -> None; `fixed:N` -> N. Raises ValueError on anything else."""
    if mode == "predicted":
        return None
    if mode.startswith("fixed:"):
        try:
            value = float(mode.split(":", 1)[1])
        except ValueError:
            value = float("nan")
        if not 0 <= value <= NUM_TRAIN_TIMESTEPS - 1:
            raise ValueError(f"timestep mode {mode!r}: N must be a number in [0, "
                             f"{NUM_TRAIN_TIMESTEPS - 1}]")
        return value
    raise ValueError(f"timestep mode {mode!r}: expected 'predicted' or 'fixed:N'")


def validate_config(cfg: ModelConfig) -> None:
    """Raise ValueError naming every inconsistent value in `cfg`."""
    s, p, problems = cfg.saipe, cfg.predictor, []
    if s.downsample < 1 or s.downsample & (s.downsample - 1):
        problems.append(f"saipe.downsample={s.downsample} must be a power of two")
    grid = s.image_size // max(s.downsample, 1)
    if s.image_size % max(s.downsample, 1) or grid % s.window_size:
        problems.append(f"saipe.image_size={s.image_size} / downsample={s.downsample} must be a "
                        f"multiple of window_size={s.window_size}")
    if grid % s.align_patch:
        problems.append(f"saipe token grid {grid} is not a multiple of align_patch={s.align_patch}")
    for name, dim, heads in (("embed_dim", s.embed_dim, s.num_heads),
                             ("align_dim", s.align_dim, s.performer_heads),
                             ("align_dim", s.align_dim, s.pool_heads)):
        if dim % heads:
            problems.append(f"saipe.{name}={dim} is not divisible by {heads} heads")
    if s.pool_scale is not None and not (isinstance(s.pool_scale, (int, float))
                                         and 1 <= s.pool_scale <= POOL_SCALE_MAX):
        problems.append(f"saipe.pool_scale={s.pool_scale!r} must be None or a number in "
                        f"[1, {POOL_SCALE_MAX}]")
    if any(k % 2 == 0 for k in s.conv_kernels):
        problems.append(f"saipe.conv_kernels={s.conv_kernels} must all be odd")
    if s.prompt_dim != cfg.unet.get("cross_attention_dim"):
        problems.append(f"saipe.prompt_dim={s.prompt_dim} differs from the UNet's "
                        f"cross_attention_dim={cfg.unet.get('cross_attention_dim')}")
    if len(p.channels) != 4:
        problems.append(f"predictor.channels={p.channels}: the paper's predictor has 4 blocks")
    if p.t_max < 2 or p.t_max > cfg.num_train_timesteps:
        problems.append(f"predictor.t_max={p.t_max} must be in [2, {cfg.num_train_timesteps}]")
    if p.front not in PREDICTOR_FRONTS:
        problems.append(f"predictor.front={p.front!r} must be one of {PREDICTOR_FRONTS}")
    for name in ("logit_scale", "qf_scale"):
        value = getattr(p, name)
        if not (isinstance(value, (int, float)) and 0 < value < float("inf")):
            problems.append(f"predictor.{name}={value!r} must be a positive number")
    if p.t_init is not None and not 0 < p.t_init < (p.t_max - 1) / 2:
        problems.append(f"predictor.t_init={p.t_init} must be in (0, {(p.t_max - 1) / 2}) "
                        f"(None gives the middle of the range)")
    if cfg.vae_class not in VAE_CLASSES:
        problems.append(f"vae_class={cfg.vae_class!r} must be one of {VAE_CLASSES}")
    elif cfg.latent_channels != cfg.unet.get("in_channels"):
        problems.append(f"VAE latent_channels={cfg.latent_channels} differs from the UNet's "
                        f"in_channels={cfg.unet.get('in_channels')}")
    if cfg.lora is not None and cfg.lora.rank < 1:
        problems.append(f"lora.rank={cfg.lora.rank} must be >= 1")
    try:
        parse_timestep_mode(cfg.timestep_mode)
    except ValueError as e:
        problems.append(str(e))
    if problems:
        raise ValueError("invalid model config: " + "; ".join(problems))


TINY = ModelConfig(
    name="tiny",
    saipe=SAIPEConfig(image_size=64, embed_dim=16, downsample=4, rstb_depths=(1, 1), up_depth=1,
                      num_heads=2, window_size=4, align_patch=2, align_dim=32,
                      performer_layers=1, performer_heads=2, performer_features=16,
                      pool_heads=2, prompt_dim=64),
    predictor=PredictorConfig(stem_channels=16, channels=(16, 16, 32, 32), t_max=1000,
                              front="dct", logit_scale=LOGIT_SCALE, qf_scale=QF_SCALE),
    lora=LoRAConfig(rank=4, alpha=4.0),
    unet=dict(TINY_UNET),
    vae=dict(TINY_VAE),
    vae_class="AutoencoderTiny",
)

# The bundled default (weights/tiny). Its UNet has no pretrained weights to keep, so stage 2
# trains all of it, and it starts at a small timestep, where Eq. 6 with the base UNet's zeroed
# output layer is nearly the identity on the latent (see training/tiny_base.py).
TINY_FULL = dataclasses.replace(
    TINY, name="tiny-full", lora=None,
    predictor=dataclasses.replace(TINY.predictor, t_init=50.0))

PRESETS: dict[str, ModelConfig] = {
    "sd21": ModelConfig(name="sd21", predictor=PredictorConfig(
        front="dct", logit_scale=LOGIT_SCALE, qf_scale=QF_SCALE)),
    "tiny": TINY,
    "tiny-full": TINY_FULL,
}


def get_preset(name: str) -> ModelConfig:
    """The preset called `name`; a ValueError lists the known ones otherwise."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]
