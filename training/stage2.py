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
from pathlib import Path
from typing import Iterator

import click
import torch
from torch import nn

from runtime.cliopts import CONTEXT_SETTINGS, version_option
from sodiff import checkpoint
from sodiff.base import encode_mean
from sodiff.config import parse_timestep_mode
from sodiff.model import SODiff

from . import config, loop
from .common import Run
from .data import JPEGPairs, folder_sources, validation_images
from .discriminator import UNetDiscriminator
from .losses import Stage2Weights, stage2_discriminator_loss, stage2_generator_loss
from .monitor import TimestepMonitor
from .stage2_config import Stage2Config, validate_train_config

CROSS_ATTENTION = ".attn2."  # diffusers' name of a transformer block's prompt attention


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


def export_model(model: SODiff, cfg: Stage2Config, folder: Path) -> Path:
    """The trained SODiff checkpoint at `folder`, with what trained it."""
    return checkpoint.save(model, folder, embed_base=True if cfg.embed_base else None,
                           extra={"training": {"stage": 2, "steps": cfg.max_steps,
                                               "align": stage1_aligned(cfg.init),
                                               "t_align_trained": aligns(cfg)}})


def train(cfg: Stage2Config, perceptual: nn.Module | None = None) -> Path:
    """Train stage 2 as `cfg` says; returns the final SODiff checkpoint folder.
    `perceptual` replaces the DISTS that `cfg.perceptual` names (tests use a random one)."""
    validate_train_config(cfg)
    cfg = config.with_crops(cfg, checkpoint.read_meta(cfg.init)["config"]["name"])
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
    run.info(f"{len(dataset)} training images, {patches}; {len(loop.all_params(opt_g))} trained "
             f"generator tensors ({groups}); T_align {'trains' if aligns(cfg) else 'frozen'}; "
             f"L_EA {'OFF (--perceptual none)' if dists is None else 'on'}; "
             f"discriminator {'on' if disc is not None else 'OFF (--w-gan 0)'}")
    monitor = TimestepMonitor(run.info)
    lr_scale = {"generator": 1.0, "discriminator": cfg.disc_lr / cfg.lr}
    for step in range(run.start_step, cfg.max_steps):
        for name, o in optimizers.items():
            loop.set_lr(o, loop.lr_at(step, cfg) * lr_scale[name])
        sums: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            batch = next(batches)
            g = loop.step_generator(cfg.seed, step, micro, run.acc.process_index, run.device)
            with run.acc.accumulate(*[m for m in (gen, d_step) if m is not None]):
                out, loss_g, terms = generator_objective(gen, disc, dists, batch, cfg.weights, g,
                                                         run.acc.autocast())
                run.check_finite(terms, step + 1)
                run.acc.backward(loss_g)
                if d_step is not None:
                    terms.update(discriminator_terms(run, model, d_step, out, batch, g, step))
                if run.acc.sync_gradients and cfg.grad_clip:
                    for o in optimizers.values():
                        run.acc.clip_grad_norm_(loop.all_params(o), cfg.grad_clip)
                for o in optimizers.values():
                    o.step()
                for o in optimizers.values():
                    o.zero_grad(set_to_none=True)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.item() / cfg.grad_accum
        done = step + 1
        watch = monitor.update(done, out.logits, out.tau, out.qf, batch["qf"])
        run.log(done, {**sums, **watch, "lr": loop.lr_at(step, cfg)})
        run.maybe_validate(done, model.restore, val, model)
        run.maybe_save(done)
    return loop.finish_run(run, lambda final, _: export_model(model, cfg, final))


@version_option()
@click.command(context_settings=CONTEXT_SETTINGS,
               help="Stage 2: train the one-step diffusion model (LoRA + timestep predictor, "
               "with a UNet discriminator) from a stage-1 checkpoint (see README 'Training').")
@config.config_options(Stage2Config)
def main(**kwargs) -> None:
    config.run_cli(train, Stage2Config, kwargs)


if __name__ == "__main__":
    main()
