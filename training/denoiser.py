"""Pretrain a tiny preset's UNet as a diffusion denoiser, so that its timestep means a noise level.

    python -m training.denoiser --preset tiny-full --vae weights/tiny-vae \
        --data BSDS500/train --val-data BSDS500/val --out runs/denoiser

SD2.1's UNet knows what each timestep means because it was trained to remove that much noise;
that is what makes choosing `tau` per image worth it (paper Sec. 3.3). The tiny presets have no
such UNet, so this stage makes one: epsilon prediction with SD2.1's schedule
(`sodiff.schedule`), `t` uniform in 0..999, on the frozen stage-0 VAE's latents (posterior mean
times the scaling factor) of clean training crops. The condition is either nothing (all-zero
tokens: the UNet learns the image prior alone) or, with `--saipe`, the prompt that a stage-1
SAIPE (frozen) computes from each crop's JPEG, as stage 2 and inference do: a denoiser that
must guess the image from heavy noise gains from a prompt that describes it, so its
cross-attention learns to read SAIPE's tokens before stage 2 needs it to.

`OUT/final/` is a base folder like `training.tiny_base`'s (`unet/` and `vae/`, diffusers
layout), so `--base OUT/final` works for stage 1 and stage 2, plus `eval.json`: the held-out
noise-prediction MSE at a few timesteps. Train states and --resume are `training.common`'s.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from runtime.cliopts import CONTEXT_SETTINGS, version_option
from sodiff import checkpoint
from sodiff.base import build_unet, encode_mean
from sodiff.config import PRESETS, ModelConfig, get_preset
from sodiff.jpeg import compress
from sodiff.model import resize_for_saipe
from sodiff.schedule import add_noise, alphas_cumprod

from . import config, loop
from .common import Run
from .config import TrainConfig, opt
from .data import JPEGPairs, folder_sources, list_images, load_rgb, to_tensor, to_uint8
from .tiny_base import DEFAULT_VAE, VAE_FILES, check_vae

EVAL_FILE = "eval.json"
NOISE_FILE = "noise_levels.json"  # the JPEG error's noise level per QF (stage 2's tau prior)
NOISE_QFS = (5, 10, 20, 30, 40, 60, 80, 95)
SCALING_IMAGES = 64  # training images whose centre crops set the latent scaling factor
EVAL_TIMESTEPS = (20, 100, 250, 500, 750, 950)  # held-out noise-prediction MSE at these t
EVAL_SEED = 1234                                 # the held-out noise: the same for every run
UNUSED_VAL_QF = 10  # TrainConfig's default; used only with --saipe (the val prompts' JPEG QF)


@dataclass(frozen=True, kw_only=True)
class DenoiserConfig(TrainConfig):
    preset: str = opt("tiny-full", help="tiny preset whose UNet config is trained",
                      choices=tuple(p for p in PRESETS if p.startswith("tiny")))
    vae: str = opt(str(DEFAULT_VAE), help="stage-0 VAE folder (frozen; its latents are the data)")
    crop: int = opt(64, help="clean training crop side in pixels (a multiple of the model's "
                    "pad_multiple)")
    batch_size: int = opt(16, help="crops per process per micro-batch")
    lr: float = opt(5e-4, help="Adam learning rate")
    lr_schedule: str = opt("cosine", help="constant or cosine decay to 0 at --max-steps",
                           choices=config.LR_SCHEDULES)
    warmup_steps: int = opt(100, help="linear warm-up steps from 0 to --lr")
    max_steps: int = opt(3000, help="optimizer steps to train for")
    save_every: int = opt(500, help="write a train state every N steps (and at the end)")
    val_every: int = opt(500, help="held-out noise-prediction MSE every N steps")
    val_images: int = opt(8, help="held-out images (the first N, sorted)")
    val_crop: int | None = opt(128, help="held-out images are centre-cropped to this square")
    scaling: float | None = opt(None, help="latent scaling factor written into the base's VAE "
                                "config [default: 1 / std of the VAE's latents of the first 64 "
                                "training images, so that latents have unit variance as SD2.1's "
                                "0.18215 gives]")
    saipe: str | None = opt(None, help="stage-1 checkpoint (training.stage1's OUT/final) whose "
                            "SAIPE, frozen, gives each crop its prompt from the crop's JPEG "
                            "(QF in --qf-min..--qf-max; --val-qf for the held-out crops), as "
                            "stage 2 does [default: prompt-free, all-zero tokens]")


def validate_denoiser_config(cfg: DenoiserConfig) -> ModelConfig:
    """ValueError naming every bad option; returns the preset's model config."""
    p = config.validate_common(cfg)
    model_cfg = None
    if cfg.preset not in PRESETS or not cfg.preset.startswith("tiny"):
        p.append(f"preset={cfg.preset!r} must be a tiny preset (sd21 has a pretrained UNet)")
    else:
        model_cfg = get_preset(cfg.preset)
        m = model_cfg.pad_multiple
        for name in ("crop", "val_crop"):
            if getattr(cfg, name) is not None and getattr(cfg, name) % m:
                p.append(f"{name}={getattr(cfg, name)} must be a multiple of {m} (the model's "
                         f"pad_multiple)")
    if cfg.data is None:
        p.append("data is required (a folder of high-quality training images)")
    if cfg.saipe is None and cfg.val_qf != UNUSED_VAL_QF:
        p.append(f"val_qf={cfg.val_qf} is not used: without --saipe the denoiser sees clean "
                 f"images only")
    if cfg.saipe is not None and model_cfg is not None:
        p.extend(saipe_problems(cfg.saipe, model_cfg))
    if cfg.scaling is not None and not 0 < cfg.scaling < float("inf"):
        p.append(f"scaling={cfg.scaling} must be a positive number")
    config.raise_problems(p)
    return model_cfg


def saipe_problems(folder: str, model_cfg: ModelConfig) -> list[str]:
    """Why the checkpoint `folder` cannot give this preset's prompts (empty when it can)."""
    try:
        meta = checkpoint.read_meta(Path(folder).expanduser())
    except checkpoint.CheckpointError as e:
        return [f"saipe={folder!r}: {e}"]
    want = json.loads(json.dumps(model_cfg.to_dict()["saipe"]))
    if meta["config"].get("saipe") != want:
        return [f"saipe={folder!r}: its SAIPE config differs from preset {model_cfg.name!r}'s"]
    if meta.get("base") == "external":
        return [f"saipe={folder!r} was trained on an SD2.1-base folder; the denoiser is for the "
                f"tiny presets' stage-1 checkpoints"]
    return []


def load_saipe(folder: str | Path) -> nn.Module:
    """The frozen SAIPE of the stage-1 checkpoint `folder`."""
    return checkpoint.load(Path(folder).expanduser()).saipe.requires_grad_(False).eval()


def jpegs(images: torch.Tensor, qf: int) -> torch.Tensor:
    """The libjpeg round trip at quality `qf` of [-1, 1] images, as [-1, 1] tensors."""
    return torch.stack([to_tensor(compress(to_uint8(x), qf)[0]) for x in images]).to(images)


@torch.no_grad()
def prompts(saipe: nn.Module | None, lq: torch.Tensor, model_cfg: ModelConfig) -> torch.Tensor:
    """SAIPE's prompt of each JPEG crop, or the prompt-free condition without a SAIPE."""
    if saipe is None:
        return null_prompt(model_cfg, lq.shape[0], lq.device)
    return saipe.prompt(resize_for_saipe(lq, model_cfg.saipe.image_size))


def load_vae(folder: str | Path, preset: str) -> nn.Module:
    import diffusers

    folder = Path(folder).expanduser()
    check_vae(folder, preset)
    cls = json.loads((folder / "config.json").read_text())["_class_name"]
    return getattr(diffusers, cls).from_pretrained(str(folder)).requires_grad_(False).eval()


def build_model(model_cfg: ModelConfig, seed: int) -> nn.Module:
    """The preset's UNet, seeded, with its output convolution zeroed (as training.tiny_base)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = build_unet(model_cfg.unet)
    with torch.no_grad():
        unet.conv_out.weight.zero_()
        unet.conv_out.bias.zero_()
    return unet


def null_prompt(model_cfg: ModelConfig, batch: int, device: torch.device) -> torch.Tensor:
    """The prompt-free condition: all-zero tokens [B, 77, D]."""
    s = model_cfg.saipe
    return torch.zeros(batch, s.num_queries, s.prompt_dim, device=device)


def eps_loss(unet: nn.Module, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
             table: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """SD's objective: MSE between the UNet's noise prediction at `t` and the noise."""
    z_t = add_noise(z0, noise, table[t])
    return F.mse_loss(unet(z_t, t, encoder_hidden_states=prompt).sample.float(), noise.float())


@torch.no_grad()
def unit_variance_scaling(vae: nn.Module, images: torch.Tensor) -> float:
    """1 / std of the VAE's posterior means of `images` (4 significant digits): the scaling
    that gives the latents unit variance, which SD2.1's noise schedule assumes."""
    z = torch.cat([encode_mean(vae, x[None], 1.0) for x in images])
    return float(f"{1.0 / z.float().std().item():.4g}")


@torch.no_grad()
def noise_levels(vae: nn.Module, images: torch.Tensor, scaling: float, table: torch.Tensor,
                 qfs: tuple[int, ...] = NOISE_QFS) -> dict[str, dict[str, float]]:
    """Per QF, the RMS of the JPEG's latent error `s * (E(lq) - E(hq))` and the timestep
    whose noise level `sqrt((1 - a) / a)` matches it: where a denoiser of that `t` would
    remove as much as the JPEG added."""
    sigma = ((1 - table) / table).sqrt().cpu().double()
    z = encode_mean(vae, images, scaling)
    out = {}
    for q in qfs:
        rms = float((encode_mean(vae, jpegs(images, q), scaling) - z).pow(2).mean().sqrt())
        t = float(np.interp(rms, sigma.numpy(), np.arange(len(sigma), dtype=np.float64)))
        out[str(q)] = {"latent_rms_error": rms, "tau": t}
    return out


def centre_crops(folder: str | Path, side: int, limit: int) -> torch.Tensor:
    """[N,3,S,S] centre crops in [-1, 1] of the first `limit` images at least `side` wide."""
    crops = []
    for path in list_images(folder):
        image = load_rgb(path)
        h, w = image.shape[:2]
        if min(h, w) < side:
            continue
        y, x = (h - side) // 2, (w - side) // 2
        crops.append(to_tensor(np.ascontiguousarray(image[y:y + side, x:x + side])))
        if len(crops) == limit:
            break
    if not crops:
        raise ValueError(f"no image of at least {side}x{side} in {folder}")
    return torch.stack(crops)


@torch.no_grad()
def evaluate(unet: nn.Module, latents: torch.Tensor, table: torch.Tensor, model_cfg: ModelConfig,
             prompt: torch.Tensor | None = None, timesteps: tuple[int, ...] = EVAL_TIMESTEPS
             ) -> dict[str, float]:
    """Held-out noise-prediction MSE at each of `timesteps` (fixed noise), and their mean.
    With each image's `prompt`, also the mean with the prompts rolled by one image
    (`shuffled_mean`): above `mean` when the UNet reads the prompt."""
    modes = [(m, m.training) for m in unet.modules()]
    unet.eval()
    g = torch.Generator().manual_seed(EVAL_SEED)
    noise = torch.randn(latents.shape, generator=g).to(latents.device)
    given = prompt if prompt is not None else null_prompt(model_cfg, latents.shape[0],
                                                          latents.device)

    def mse(t: int, p: torch.Tensor) -> float:
        tt = torch.full((latents.shape[0],), t, device=latents.device, dtype=torch.long)
        return float(eps_loss(unet, latents, tt, noise, table, p))

    out = {f"t{t}": mse(t, given) for t in timesteps}
    out["mean"] = float(np.mean(list(out.values())))
    if prompt is not None and prompt.shape[0] > 1:
        out["shuffled_mean"] = float(np.mean([mse(t, prompt.roll(1, 0)) for t in timesteps]))
    for m, training in modes:
        m.train(training)
    return out


def export(unet: nn.Module, vae_dir: Path, folder: Path, scaling: float,
           files: dict[str, dict]) -> Path:
    """The base folder (`unet/`, `vae/` with `scaling`, and the json `files`), written beside
    and renamed."""
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    unet.save_pretrained(str(tmp / "unet"), safe_serialization=True)
    (tmp / "vae").mkdir(parents=True)
    for name in VAE_FILES:
        shutil.copy2(vae_dir / name, tmp / "vae" / name)
    vae_cfg = json.loads((vae_dir / "config.json").read_text())
    vae_cfg["scaling_factor"] = scaling
    (tmp / "vae" / "config.json").write_text(json.dumps(vae_cfg, indent=2, sort_keys=True))
    for name, content in files.items():
        (tmp / name).write_text(json.dumps(content, indent=2, sort_keys=True))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def train(cfg: DenoiserConfig) -> Path:
    """Pretrain the preset's UNet as an epsilon-prediction denoiser; returns the base folder."""
    model_cfg = validate_denoiser_config(cfg)
    vae = load_vae(cfg.vae, cfg.preset)
    run = Run(cfg, "denoiser")
    vae = vae.to(run.device)
    s = cfg.scaling or unit_variance_scaling(
        vae, centre_crops(cfg.data, cfg.crop, SCALING_IMAGES).to(run.device))
    table = alphas_cumprod(model_cfg.num_train_timesteps, model_cfg.beta_start,
                           model_cfg.beta_end).to(run.device)
    dataset = JPEGPairs(folder_sources(cfg.data, cfg.crop), cfg.crop, (cfg.qf_min, cfg.qf_max),
                        cfg.seed)
    saipe = load_saipe(cfg.saipe).to(run.device) if cfg.saipe else None
    unet = build_model(model_cfg, cfg.seed).train()
    optimizer = torch.optim.Adam(unet.parameters(), lr=cfg.lr)
    model, optimizer = run.acc.prepare(unet, optimizer)
    run.track({"unet": unet}, {"adam": optimizer})
    val = val_prompt = None
    if cfg.val_data:
        crops = centre_crops(cfg.val_data, cfg.val_crop, cfg.val_images).to(run.device)
        with torch.no_grad():
            val = encode_mean(vae, crops, s)
        if saipe is not None:
            val_prompt = prompts(saipe, jpegs(crops, cfg.val_qf), model_cfg)
    batches = run.batches(dataset)
    run.begin()
    run.info(f"{len(dataset)} training images, {cfg.crop} px clean crops, latents "
             f"{model_cfg.latent_channels}x{cfg.crop // model_cfg.vae_factor}^2 scaled by "
             f"{s:g}, " + (f"prompts from {cfg.saipe}'s SAIPE" if saipe else "prompt-free"))
    for step in range(run.start_step, cfg.max_steps):
        lr = loop.lr_at(step, cfg)
        loop.set_lr(optimizer, lr)
        total = 0.0
        for micro in range(cfg.grad_accum):
            batch = next(batches)
            hq, prompt = batch["hq"], prompts(saipe, batch["lq"], model_cfg)
            g = loop.step_generator(cfg.seed, step, micro, run.acc.process_index, run.device)
            with torch.no_grad():
                z0 = encode_mean(vae, hq, s)
            t = torch.randint(0, model_cfg.num_train_timesteps, (z0.shape[0],), generator=g,
                              device=run.device)
            noise = torch.randn(z0.shape, generator=g, device=run.device)
            with run.acc.accumulate(model), run.acc.autocast():
                loss = eps_loss(model, z0, t, noise, table, prompt)
                run.check_finite({"eps_mse": loss}, step + 1)
                run.acc.backward(loss)
                if run.acc.sync_gradients and cfg.grad_clip:
                    run.acc.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            total += loss.item() / cfg.grad_accum
        done = step + 1
        run.log(done, {"eps_mse": total, "lr": lr})
        if val is not None and (done % cfg.val_every == 0 or done == cfg.max_steps) \
                and run.acc.is_main_process:
            result = evaluate(unet, val, table, model_cfg, val_prompt)
            for k, v in result.items():
                run.writer.add_scalar(f"denoiser/val_{k}", v, done)
            run.info(f"step {done}: held-out eps MSE {result['mean']:.4f} "
                     f"({', '.join(f'{k} {v:.3f}' for k, v in result.items() if k != 'mean')})")
        run.maybe_save(done)

    def final_eval() -> dict[str, dict]:
        """The held-out files: eval.json and noise_levels.json."""
        images = centre_crops(cfg.val_data, cfg.val_crop, cfg.val_images).to(run.device)
        return {EVAL_FILE: {"eps_mse": evaluate(unet, val, table, model_cfg, val_prompt),
                            "prompt": cfg.saipe and {"saipe": str(cfg.saipe),
                                                     "val_qf": cfg.val_qf},
                            "images": int(val.shape[0]), "crop": cfg.val_crop,
                            "folder": str(cfg.val_data), "steps": cfg.max_steps,
                            "seed": cfg.seed, "scaling_factor": s},
                NOISE_FILE: {"scaling_factor": s, "folder": str(cfg.val_data),
                             "images": int(images.shape[0]), "crop": cfg.val_crop,
                             "per_qf": noise_levels(vae, images, s, table)}}

    return loop.finish_run(run, lambda final, files: export(
        run.acc.unwrap_model(model), Path(cfg.vae).expanduser(), final, s, files or {}),
        final_eval if val is not None else None)


@version_option()
@click.command(context_settings=CONTEXT_SETTINGS,
               help="Pretrain a tiny preset's UNet as a diffusion denoiser (epsilon prediction, "
               "SD2.1 schedule) on the stage-0 VAE's latents; writes a base folder to OUT/final.")
@config.config_options(DenoiserConfig)
def main(**kwargs) -> None:
    config.run_cli(train, DenoiserConfig, kwargs)


if __name__ == "__main__":
    main()
