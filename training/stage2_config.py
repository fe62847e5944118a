"""Stage 2's options (training.stage2): its config fields, their defaults (the paper's where it
gives one) and their checks."""
from __future__ import annotations

from dataclasses import dataclass

from sodiff.config import POOL_SCALE_MAX

from . import config
from .config import TrainConfig, opt
from .discriminator import TRAINABLE
from .losses import Stage2Weights

ALIGN_CHOICES = ("auto", "on", "off")


@dataclass(frozen=True, kw_only=True)
class Stage2Config(TrainConfig):
    init: str = opt(help="stage-1 checkpoint folder (OUT/final of training.stage1)")
    base: str | None = opt(None, help="local SD2.1-base folder (needed when --init was trained "
                           "on one)")
    perceptual: str | None = opt(None, help="DISTS weights file (python -m training.dists "
                                 "convert), or 'none' to train without L_EA")
    disc_unet: str | None = opt(None, help="diffusers UNet folder for the discriminator "
                                "(default: a copy of the base UNet, without LoRA)")
    disc_trainable: str = opt("all", help="discriminator parts that learn: all, or head only",
                              choices=TRAINABLE)
    disc_lr: float = opt(1e-5, help="discriminator AdamW learning rate (same schedule as --lr)")
    gradient_checkpointing: bool = opt(False, help="recompute the UNet's activations in the "
                                       "backward pass: less memory, slower")
    weight_decay: float = opt(1e-2, help="AdamW weight decay of both optimizers (torch's "
                              "default; the paper does not give one)")
    w_mse: float = opt(1.0, help="weight of MSE(restored, hq) (Eq. 7)")
    w_ea: float = opt(1.0, help="weight of L_EA = DISTS(sobel) + DISTS (Eq. 7)")
    w_gan: float = opt(1e-2, help="alpha of Eq. 12: weight of the generator's GAN loss; 0 "
                       "trains without a discriminator (no D network, no D step)")
    w_qf: float = opt(1e-3, help="beta of Eq. 12: weight of L1(QF_pred, QF_gt)")
    w_color: float = opt(0.0, help="weight of the squared mean error of each channel of each "
                         "crop (not in the paper: against a colour cast, which MSE barely "
                         "weighs)")
    batch_size: int = opt(2, help="images per process per micro-batch (paper: 2 per GPU)")
    lr: float = opt(1e-5, help="AdamW learning rate of LoRA and predictor (paper: 1e-5)")
    max_steps: int = opt(150_000, help="optimizer steps (paper: 150k)")
    embed_base: bool = opt(False, help="store the base UNet/VAE in the final checkpoint, so it "
                           "loads without --base (for small bases such as training.tiny_base's)")
    train_align: str = opt("auto", help="train SAIPE's T_align (E_down/D_up stay frozen): on, "
                           "off, or auto = on when --init's stage 1 ran with --no-align",
                           choices=ALIGN_CHOICES)
    predictor: str | None = opt(None, help="stage-1.5 predictor folder (python -m "
                                "training.predictor's OUT/final) replacing --init's predictor")
    tau_prior: str | None = opt(None, help="noise_levels.json of training.denoiser: before the "
                                "first step the timestep head is set to read the QF head, tau "
                                "at each QF's matching noise level")
    timestep_lr_scale: float = opt(0.05, help="the timestep head's learning rate relative to "
                                   "--lr (its trunk and QF head learn at --lr)")
    view_crop: int | None = opt(None, help="side of the compressed crop the prompt and the "
                                "timestep are computed from; the UNet trains on a --crop "
                                "patch of it, cut on the JPEG grid [default: --crop, no "
                                "separate view]")
    pool_scale: float | None = opt(None, help="switch --init's T_align pooling to cosine "
                                   "attention whose learnable logit scale starts here (e.g. "
                                   "10); needs T_align to train. Its dot-product logits stay "
                                   "near 0, so all 77 prompt tokens come out alike")
    freeze_cross_attention: bool = opt(False, help="keep the UNet's cross-attention layers "
                                       "(attn2, the ones that read the prompt) as --init has "
                                       "them: a short continuation otherwise unlearns the "
                                       "prompt's use, which a tiny model barely needs")
    align_lr_scale: float = opt(1.0, help="T_align's learning rate relative to --lr, when it "
                                "trains: < 1 keeps a prompt stage 2 already trained nearly as "
                                "it is while the UNet continues")
    predictor_lr_scale: float = opt(1.0, help="the predictor trunk's and QF head's learning "
                                    "rate relative to --lr; 0 freezes them (keeps a stage-1.5 "
                                    "predictor as it is: small training crops would otherwise "
                                    "pull its whole-image QF estimate)")

    @property
    def weights(self) -> Stage2Weights:
        return Stage2Weights(self.w_mse, self.w_ea, self.w_gan, self.w_qf, self.w_color)


def validate_train_config(cfg: Stage2Config) -> None:
    """ValueError naming every bad or inconsistent option."""
    p = config.validate_common(cfg)
    if cfg.data is None:
        p.append("data is required (a folder of high-quality images)")
    if cfg.perceptual is None:
        p.append("perceptual is required: a DISTS weights file (make it with `python -m "
                 "training.dists convert`) or 'none' to train without the edge-aware DISTS loss")
    if cfg.disc_trainable not in TRAINABLE:
        p.append(f"disc_trainable={cfg.disc_trainable!r} must be one of {TRAINABLE}")
    if not cfg.disc_lr > 0:
        p.append(f"disc_lr={cfg.disc_lr} must be > 0")
    if not cfg.weight_decay >= 0:
        p.append(f"weight_decay={cfg.weight_decay} must be >= 0")
    if cfg.train_align not in ALIGN_CHOICES:
        p.append(f"train_align={cfg.train_align!r} must be one of {ALIGN_CHOICES}")
    if not cfg.timestep_lr_scale > 0:
        p.append(f"timestep_lr_scale={cfg.timestep_lr_scale} must be > 0")
    if not cfg.align_lr_scale > 0:
        p.append(f"align_lr_scale={cfg.align_lr_scale} must be > 0 (--train-align off freezes "
                 f"T_align)")
    if not cfg.predictor_lr_scale >= 0:
        p.append(f"predictor_lr_scale={cfg.predictor_lr_scale} must be >= 0")
    if cfg.pool_scale is not None and not 1 <= cfg.pool_scale <= POOL_SCALE_MAX:
        p.append(f"pool_scale={cfg.pool_scale} must be in [1, {POOL_SCALE_MAX}]")
    if cfg.pool_scale is not None and cfg.train_align == "off":
        p.append("pool_scale needs T_align to train: drop --train-align off")
    if cfg.view_crop is not None and cfg.crop is not None and cfg.view_crop < cfg.crop:
        p.append(f"view_crop={cfg.view_crop} must be >= crop={cfg.crop} (the UNet's patch is "
                 f"cut from the view)")
    p += [f"w_{k}={v} must be >= 0" for k, v in vars(cfg.weights).items() if not v >= 0]
    config.raise_problems(p)

