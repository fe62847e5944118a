"""Stage 2: one-step diffusion (paper Sec. 3.2-3.3, Eq. 12), starting from a stage-1 checkpoint.

SAIPE and the VAE are frozen; the UNet's LoRA (or the whole UNet when the config has no LoRA)
and the timestep predictor train with AdamW on MSE + L_EA + 1e-2 L_G + 1e-3 L_qf, and a
diffusion-UNet discriminator trains with its own AdamW on Eq. 9; both update every step.
When stage 1 ran without the alignment loss, SAIPE's T_align trains here too (E_down and D_up
stay frozen): the paper's ablation order, the reconstruction branch first, then T_align with
the diffusion model. The predictor has its own parameter groups: the timestep head learns
`--timestep-lr-scale` times slower than its trunk and QF head. `--predictor` starts from a
stage-1.5 predictor (training/predictor.py) and `--tau-prior` makes its timestep head read
its QF head (sodiff.predictor.set_timestep_prior) before the first step.

    python -m training.stage2 --init runs/s1/final --base SD21_DIR --data IMAGES \
        --perceptual dists.safetensors --out runs/s2
    accelerate launch -m training.stage2 ...            (multi-GPU / multi-node)
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import click
import torch
from torch import nn

from runtime.cliopts import CONTEXT_SETTINGS, version_option
from sodiff import checkpoint
from sodiff.base import encode_mean
from sodiff.config import POOL_SCALE_MAX, parse_timestep_mode
from sodiff.model import SODiff

from . import common
from .common import FINAL_DIR, Run, TrainConfig, opt
from .data import JPEGPairs, folder_sources, validation_images
from .discriminator import TRAINABLE, UNetDiscriminator
from .losses import Stage2Weights, stage2_discriminator_loss, stage2_generator_loss
from .monitor import TimestepMonitor

ALIGN_CHOICES = ("auto", "on", "off")
CROSS_ATTENTION = ".attn2."  # diffusers' name of a transformer block's prompt attention


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
    p = common.validate_common(cfg)
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
    common.raise_problems(p)


def training_pairs(cfg: Stage2Config) -> JPEGPairs:
    """The data: `--crop` pairs, or `--crop` patches of a `--view-crop` view."""
    side = cfg.view_crop or cfg.crop
    return JPEGPairs(folder_sources(cfg.data, side), side, (cfg.qf_min, cfg.qf_max), cfg.seed,
                     patch=cfg.crop if cfg.view_crop else None)


def load_perceptual(spec: str) -> nn.Module | None:
    if spec == "none":
        return None
    from .dists import DISTS
    return DISTS.from_file(spec)


def strip_lora(unet: nn.Module) -> nn.Module:
    """The UNet without its (unmerged) LoRA layers: each wrapper replaced by its base layer."""
    from peft.tuners.lora import LoraLayer

    for name, module in [(n, m) for n, m in unet.named_modules() if isinstance(m, LoraLayer)]:
        parent_name, _, child = name.rpartition(".")
        setattr(unet.get_submodule(parent_name) if parent_name else unet, child,
                module.get_base_layer())
    if hasattr(unet, "peft_config"):
        del unet.peft_config
    unet._hf_peft_config_loaded = False
    return unet


def load_disc_unet(folder: str) -> nn.Module:
    from diffusers import UNet2DConditionModel

    path = Path(folder).expanduser()
    sub = "unet" if (path / "unet" / "config.json").is_file() else None
    if sub is None and not (path / "config.json").is_file():
        raise FileNotFoundError(f"--disc-unet {path}: no diffusers UNet there (expected "
                                f"config.json, or unet/config.json)")
    return UNet2DConditionModel.from_pretrained(path, subfolder=sub, local_files_only=True)


def build_discriminator(cfg: Stage2Config, model: SODiff) -> UNetDiscriminator:
    unet = (load_disc_unet(cfg.disc_unet) if cfg.disc_unet
            else strip_lora(copy.deepcopy(model.unet)))
    unet.requires_grad_(True)
    # Never checkpointed: recomputing its blocks in the backward pass would see the parameter
    # flags of the D phase, not the G phase's (see no_param_grads), and refuse.
    unet.disable_gradient_checkpointing()
    return UNetDiscriminator(unet, cfg.disc_trainable, model.alphas_cumprod.cpu())


def stage1_aligned(init: str) -> bool | None:
    """Whether --init's stage 1 ran with the alignment loss (None: the checkpoint does not say)."""
    return checkpoint.read_meta(init).get("training", {}).get("align")


def aligns(cfg: Stage2Config) -> bool:
    """Does T_align train in this run?"""
    if cfg.train_align == "auto":
        return stage1_aligned(cfg.init) is False
    return cfg.train_align == "on"


def apply_tau_prior(model: SODiff, path: str) -> None:
    """`set_timestep_prior` from a training.denoiser noise_levels.json."""
    import json

    from sodiff.predictor import set_timestep_prior

    try:
        table = json.loads(Path(path).expanduser().read_text())["per_qf"]
        qfs = [float(q) for q in table]
        taus = [float(v["tau"]) for v in table.values()]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--tau-prior {path}: not a training.denoiser noise_levels.json "
                         f"({type(e).__name__}: {e})") from None
    set_timestep_prior(model.predictor, qfs, taus)


def prepare_model(cfg: Stage2Config) -> SODiff:
    """The stage-1 model with stage 2's trainable parts switched on, everything else frozen."""
    model = checkpoint.load(cfg.init, cfg.base)
    m = model.cfg.pad_multiple
    for name in ("crop", "view_crop"):
        if (getattr(cfg, name) or 0) % m:
            raise ValueError(f"{name}={getattr(cfg, name)} must be a multiple of {m} (the "
                             f"model's pad_multiple)")
    if cfg.predictor:
        from .predictor import load_predictor

        model.predictor = load_predictor(cfg.predictor)
        model.cfg = model.cfg.replace(predictor=model.predictor.cfg)
    if cfg.tau_prior:
        apply_tau_prior(model, cfg.tau_prior)
    if cfg.pool_scale is not None:
        if not aligns(cfg):
            raise ValueError(f"--pool-scale needs T_align to train, and --train-align "
                             f"{cfg.train_align} does not train it here: add --train-align on")
        try:
            model.saipe.use_cosine_pool(cfg.pool_scale)
        except ValueError as e:
            raise ValueError(f"--pool-scale: {cfg.init}: {e}; drop --pool-scale") from None
        model.cfg = model.cfg.replace(saipe=model.saipe.cfg)
    model.requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    if model.cfg.lora is None:
        model.unet.requires_grad_(True)
    else:
        for name, p in model.unet.named_parameters():
            p.requires_grad_("lora_" in name)
    if cfg.freeze_cross_attention:
        frozen = [p for name, p in model.unet.named_parameters() if CROSS_ATTENTION in name]
        if not frozen:
            raise ValueError(f"--freeze-cross-attention: {cfg.init}'s UNet has no "
                             f"cross-attention layers ('{CROSS_ATTENTION}' in a parameter name)")
        for p in frozen:
            p.requires_grad_(False)
    if aligns(cfg):
        model.saipe.t_align.requires_grad_(True)
    # A fixed timestep never runs the predictor: training it would only waste optimizer state.
    model.predictor.requires_grad_(parse_timestep_mode(model.cfg.timestep_mode) is None)
    if cfg.predictor_lr_scale == 0:  # only the timestep head learns
        for name, p in model.predictor.named_parameters():
            p.requires_grad_(p.requires_grad and name.startswith("timestep_head."))
    return model


def generator_groups(model: SODiff, cfg: Stage2Config) -> list[dict]:
    """AdamW groups: UNet (LoRA or all) at --lr, T_align when it trains at --lr *
    --align-lr-scale, the predictor's trunk and QF head at --lr * --predictor-lr-scale, its
    timestep head at --lr * --timestep-lr-scale."""
    groups = [{"params": [p for p in model.unet.parameters() if p.requires_grad],
               "lr": cfg.lr, "lr_scale": 1.0, "name": "unet"},
              {"params": [p for p in model.saipe.parameters() if p.requires_grad],
               "lr": cfg.lr * cfg.align_lr_scale, "lr_scale": cfg.align_lr_scale,
               "name": "t_align"}]
    for g in model.predictor.param_groups(cfg.lr, cfg.timestep_lr_scale):
        if g["name"] == "predictor":
            g.update(lr=cfg.lr * cfg.predictor_lr_scale, lr_scale=cfg.predictor_lr_scale)
        groups.append(g)
    return [g for g in groups if g["params"]]


def set_train_mode(model: SODiff) -> None:
    model.train()
    model.saipe.eval()
    model.vae.eval()


@contextlib.contextmanager
def no_param_grads(module: nn.Module) -> Iterator[None]:
    """Gradients still flow through `module` to its inputs, but its parameters get none: L_G
    must train the generator only, without touching the discriminator's accumulated grads."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class DiscriminatorStep(nn.Module):
    """Eq. 9 as a module's forward, so that DDP (multi-GPU) syncs the discriminator's grads."""

    def __init__(self, disc: UNetDiscriminator):
        super().__init__()
        self.disc = disc

    def forward(self, z_fake, z_real, prompt, generator=None):
        return stage2_discriminator_loss(self.disc, z_fake, z_real, prompt, generator)


def generator_objective(gen: nn.Module, disc: UNetDiscriminator | None, dists: nn.Module | None,
                        batch: dict[str, torch.Tensor], weights: Stage2Weights,
                        generator: torch.Generator, autocast=None):
    """`(out, loss, terms)` of Eq. 12 for one batch; Gumbel noise on the timestep. The
    discriminator passes L_G's gradient to the generator but keeps none for itself; without
    one (`disc=None`) there is no L_G."""
    out = gen(batch["lq"], gumbel=True, generator=generator, view=batch.get("view"))
    frozen = no_param_grads(disc) if disc is not None else contextlib.nullcontext()
    with autocast or contextlib.nullcontext(), frozen:
        loss, terms = stage2_generator_loss(out, batch["hq"], batch["qf"], dists, disc, weights,
                                            generator)
    return out, loss, terms


def discriminator_terms(run: Run, model: SODiff, d_step: nn.Module, out, batch, g, step: int
                        ) -> dict[str, torch.Tensor]:
    """Eq. 9's backward pass for one micro-batch (fake = this step's restored latent)."""
    with torch.no_grad(), run.acc.autocast():
        z_real = encode_mean(model.vae, batch["hq"], model.cfg.scaling_factor)
    loss_d, d_terms = d_step(out.z_hq.detach(), z_real, out.prompt.detach(), g)
    run.check_finite(d_terms, step + 1)
    run.acc.backward(loss_d)
    return d_terms


def train(cfg: Stage2Config, perceptual: nn.Module | None = None) -> Path:
    """Train stage 2 as `cfg` says; returns the final SODiff checkpoint folder.
    `perceptual` replaces the DISTS that `cfg.perceptual` names (tests use a random one)."""
    validate_train_config(cfg)
    cfg = common.with_crops(cfg, checkpoint.read_meta(cfg.init)["config"]["name"])
    run = Run(cfg, "stage2")
    dists = perceptual if perceptual is not None else load_perceptual(cfg.perceptual)
    model = prepare_model(cfg)
    dataset = training_pairs(cfg)
    opt_g = torch.optim.AdamW(generator_groups(model, cfg), lr=cfg.lr,
                              weight_decay=cfg.weight_decay)
    set_train_mode(model)
    gen, opt_g = run.acc.prepare(model, opt_g)
    parts, optimizers = {"model": model}, {"generator": opt_g}
    disc = d_step = None
    if cfg.w_gan > 0:
        disc = build_discriminator(cfg, model).train()
        opt_d = torch.optim.AdamW([p for p in disc.parameters() if p.requires_grad],
                                  lr=cfg.disc_lr, weight_decay=cfg.weight_decay)
        d_step, optimizers["discriminator"] = run.acc.prepare(DiscriminatorStep(disc), opt_d)
        parts["disc"] = disc
    if dists is not None:
        dists = dists.to(run.device).eval()
    run.track(parts, optimizers)
    val = validation_images(cfg.val_data, cfg.val_crop, cfg.val_qf, cfg.val_images) \
        if cfg.val_data else None
    batches = run.batches(dataset)
    run.begin()
    groups = ", ".join(f"{g['name']} {len(g['params'])} @ x{g['lr_scale']:g}"
                       for g in opt_g.param_groups)
    patches = (f"{cfg.crop} px patches of {cfg.view_crop} px views (prompt and timestep from "
               f"the view)" if cfg.view_crop else f"{cfg.crop} px crops")
    run.info(f"{len(dataset)} training images, {patches}; {len(common.all_params(opt_g))} trained "
             f"generator tensors ({groups}); T_align {'trains' if aligns(cfg) else 'frozen'}; "
             f"L_EA {'OFF (--perceptual none)' if dists is None else 'on'}; "
             f"discriminator {'on' if disc is not None else 'OFF (--w-gan 0)'}")
    monitor = TimestepMonitor(run.info)
    lr_scale = {"generator": 1.0, "discriminator": cfg.disc_lr / cfg.lr}
    for step in range(run.start_step, cfg.max_steps):
        for name, o in optimizers.items():
            common.set_lr(o, common.lr_at(step, cfg) * lr_scale[name])
        sums: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            batch = next(batches)
            g = common.step_generator(cfg.seed, step, micro, run.acc.process_index, run.device)
            with run.acc.accumulate(*[m for m in (gen, d_step) if m is not None]):
                out, loss_g, terms = generator_objective(gen, disc, dists, batch, cfg.weights, g,
                                                         run.acc.autocast())
                run.check_finite(terms, step + 1)
                run.acc.backward(loss_g)
                if d_step is not None:
                    terms.update(discriminator_terms(run, model, d_step, out, batch, g, step))
                if run.acc.sync_gradients and cfg.grad_clip:
                    for o in optimizers.values():
                        run.acc.clip_grad_norm_(common.all_params(o), cfg.grad_clip)
                for o in optimizers.values():
                    o.step()
                for o in optimizers.values():
                    o.zero_grad(set_to_none=True)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.item() / cfg.grad_accum
        done = step + 1
        watch = monitor.update(done, out.logits, out.tau, out.qf, batch["qf"])
        run.log(done, {**sums, **watch, "lr": common.lr_at(step, cfg)})
        run.maybe_validate(done, model.restore, val, model)
        run.maybe_save(done)
    run.close()
    final = Path(cfg.out) / FINAL_DIR
    if run.acc.is_main_process:
        checkpoint.save(model, final, embed_base=True if cfg.embed_base else None,
                        extra={"training": {"stage": 2, "steps": cfg.max_steps,
                                            "align": stage1_aligned(cfg.init),
                                            "t_align_trained": aligns(cfg)}})
        run.info(f"wrote {final}")
    run.acc.wait_for_everyone()
    return final


@version_option()
@click.command(context_settings=CONTEXT_SETTINGS,
               help="Stage 2: train the one-step diffusion model (LoRA + timestep predictor, "
               "with a UNet discriminator) from a stage-1 checkpoint (see README 'Training').")
@common.config_options(Stage2Config)
def main(**kwargs) -> None:
    common.run_cli(train, Stage2Config, kwargs)


if __name__ == "__main__":
    main()
