"""Stage 0: train the preset's VAE as a deterministic autoencoder (the tiny preset's default).

    python -m training.vae --preset tiny --data BSDS500/train --val-data LIVE1_color --out runs/vae

The one-step pipeline only ever uses the encoder's posterior mean (`sodiff.base.encode_mean`)
and decodes it directly, so the VAE is trained as a plain autoencoder on that path: no sampling
and no KL term (a KL would only shape a posterior that is never sampled). The loss is L1, which
gives sharper reconstructions than MSE at the same PSNR and is what the stages use for pixels.

Each batch autoencodes both kinds of input: its first half are the JPEG crops (`lq`: what the
encoder sees at inference), its second half the clean crops (`hq`: what the decoder must be
able to produce). Each input is its own target.

`OUT/final/` is a diffusers folder (`save_pretrained`: config.json and
diffusion_pytorch_model.safetensors) loadable with `<VAE class>.from_pretrained(OUT/final)`,
plus `eval.json`, the whole-image round-trip PSNR on --val-data. Train states and --resume
(bit-exact) are `training.common`'s.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import click
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from runtime.cliopts import CONTEXT_SETTINGS, version_option
from sodiff import metrics
from sodiff.base import build_vae, decode, encode_mean
from sodiff.config import PRESETS, ModelConfig, get_preset
from sodiff.jpeg import compress
from sodiff.model import pad_reflect

from . import config, loop
from .common import Run
from .config import TrainConfig, opt
from .data import JPEGPairs, folder_sources, list_images, load_rgb, to_tensor, to_uint8
from .tiny_base import VAE_FILES

EVAL_FILE = "eval.json"
UNUSED_VAL_QF = 10  # TrainConfig's default; the VAE is validated on clean images only


@dataclass(frozen=True, kw_only=True)
class VAEConfig(TrainConfig):
    preset: str = opt("tiny", help="model preset whose VAE (class and config) is trained",
                      choices=tuple(PRESETS))
    crop: int = opt(48, help="training crop side in pixels (a multiple of the VAE factor)")
    qf_min: int = opt(10, help="lowest JPEG quality of the lq half of a batch, inclusive")
    qf_max: int = opt(95, help="highest JPEG quality of the lq half of a batch, inclusive")
    lr: float = opt(2e-3, help="Adam learning rate")
    lr_schedule: str = opt("cosine", help="constant or cosine decay to 0 at --max-steps",
                           choices=config.LR_SCHEDULES)
    max_steps: int = opt(4000, help="optimizer steps to train for")
    save_every: int = opt(500, help="write a train state every N steps (and at the end)")
    val_every: int = opt(500, help="validate every N steps")
    val_images: int = opt(4, help="validation images during training (the first N, sorted); "
                          "the final eval.json uses every image of --val-data")
    val_crop: int | None = opt(None, help="centre-crop validation images during training to at "
                               "most this square [default: whole images]")
    init: str | None = opt(None, help="diffusers VAE folder of the preset's class to continue "
                           "training from (a new optimizer and schedule) [default: seeded "
                           "random weights]")


def validate_vae_config(cfg: VAEConfig) -> ModelConfig:
    """ValueError naming every bad option; returns the preset's model config."""
    p = config.validate_common(cfg)
    model_cfg = None
    if cfg.preset not in PRESETS:
        p.append(f"preset={cfg.preset!r} must be one of {', '.join(PRESETS)}")
    else:
        model_cfg = get_preset(cfg.preset)
        f = model_cfg.vae_factor
        if cfg.crop % f:
            p.append(f"crop={cfg.crop} must be a multiple of the VAE factor {f}")
        if cfg.init is not None:
            p.extend(init_problems(Path(cfg.init).expanduser(), model_cfg))
    if cfg.data is None:
        p.append("data is required (a folder of high-quality training images)")
    if cfg.batch_size < 2:
        p.append(f"batch_size={cfg.batch_size} must be >= 2: half of each batch is JPEG "
                 f"crops and half clean crops")
    if cfg.val_qf != UNUSED_VAL_QF:
        p.append(f"val_qf={cfg.val_qf} is not used: the VAE is validated on clean images")
    config.raise_problems(p)
    return model_cfg


def init_problems(folder: Path, model_cfg: ModelConfig) -> list[str]:
    """Why `folder` cannot start this preset's VAE training (empty when it can)."""
    missing = [f for f in VAE_FILES if not (folder / f).is_file()]
    if missing:
        return [f"init={str(folder)!r} is not a diffusers VAE folder: {', '.join(missing)} "
                f"missing (OUT/final of training.vae is one)"]
    found = json.loads((folder / "config.json").read_text())
    bad = {k: found.get(k) for k, v in model_cfg.vae.items() if found.get(k) != v}
    if found.get("_class_name") != model_cfg.vae_class:
        bad["_class_name"] = found.get("_class_name")
    if bad:
        return [f"init={str(folder)!r}: {bad} differ from preset {model_cfg.name!r}'s VAE"]
    return []


def build_model(model_cfg: ModelConfig, seed: int, init: str | None = None) -> nn.Module:
    """The preset's VAE: the weights of the folder `init`, or seeded random ones."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = build_vae(model_cfg.vae_class, model_cfg.vae)
    if init is not None:
        from safetensors.torch import load_file

        vae.load_state_dict(load_file(str(Path(init).expanduser() / VAE_FILES[1])))
    return vae


def roundtrip(vae: nn.Module, image: torch.Tensor, factor: int, scaling: float = 1.0
              ) -> torch.Tensor:
    """decode(encode_mean(image)) for an image of any size: reflect-padded to the VAE factor,
    cropped back."""
    h, w = image.shape[-2:]
    z = encode_mean(vae, pad_reflect(image, -h % factor, -w % factor), scaling)
    return decode(vae, z, scaling)[..., :h, :w]


def autoencoder_inputs(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """First half of the batch as JPEGs, the rest clean (each input is its own target)."""
    n = batch["lq"].shape[0] // 2
    return torch.cat([batch["lq"][:n], batch["hq"][n:]])


def l1_loss(vae: nn.Module, x: torch.Tensor, factor: int) -> torch.Tensor:
    """Mean absolute round-trip error in the model's [-1, 1] range."""
    return F.l1_loss(roundtrip(vae, x, factor), x)


def load_clean(folder: str | Path, limit: int | None = None, side: int | None = None
               ) -> list[tuple[str, np.ndarray]]:
    """(name, uint8 HxWx3) of the first `limit` images of `folder` (sorted), whole or
    centre-cropped to at most `side` x `side`."""
    out = []
    for path in list_images(folder)[:limit]:
        image = load_rgb(path)
        if side is not None:
            h, w = image.shape[:2]
            s = min(side, h, w)
            y, x = (h - s) // 2, (w - s) // 2
            image = np.ascontiguousarray(image[y:y + s, x:x + s])
        out.append((path.name, image))
    if not out:
        raise ValueError(f"no images in {folder}")
    return out


@torch.no_grad()
def roundtrip_psnr(vae: nn.Module, images: list[tuple[str, np.ndarray]], factor: int,
                   device: torch.device | str = "cpu", progress: bool = False,
                   qf: int | None = None) -> dict[str, object]:
    """Round-trip PSNR (uint8, all channels) of each image against itself, their mean and the
    mean signed error per channel, VAE in eval mode. With `qf` the VAE gets the image's JPEG at
    that quality (what the one-step model starts from), still compared with the clean image."""
    modes = [(m, m.training) for m in vae.modules()]
    vae.eval()
    per_image, signed = {}, []
    for name, image in tqdm(images, desc="round-trip", disable=not progress, leave=False):
        given = image if qf is None else compress(image, qf)[0]
        out = to_uint8(roundtrip(vae, to_tensor(given)[None].to(device), factor))
        per_image[name] = metrics.psnr(out, image)
        signed.append((out.astype(np.float64) - image).mean(axis=(0, 1)))
    for m, training in modes:
        m.train(training)
    return {"psnr": float(np.mean(list(per_image.values()))), "images": len(per_image),
            "qf": qf, "signed_error_rgb": np.mean(signed, axis=0).tolist(),
            "per_image": per_image}


def evaluate_folder(vae_dir: str | Path, folder: str | Path, device: str = "cpu",
                    qf: int | None = None) -> dict[str, object]:
    """Whole-image round-trip PSNR of the diffusers VAE folder `vae_dir` on `folder` (of the
    images' JPEGs at quality `qf` when given, against the clean images)."""
    import diffusers

    vae_class = json.loads((Path(vae_dir) / "config.json").read_text())["_class_name"]
    vae = getattr(diffusers, vae_class).from_pretrained(str(vae_dir)).to(device)
    factor = ModelConfig(name="eval", vae=dict(vae.config), vae_class=vae_class).vae_factor
    return roundtrip_psnr(vae, load_clean(folder), factor, device, progress=True, qf=qf)


def export(vae: nn.Module, folder: Path, evaluation: dict[str, object] | None) -> Path:
    """Write the diffusers folder (and eval.json) into a temporary folder, then rename it."""
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(str(tmp), safe_serialization=True)
    if evaluation is not None:
        (tmp / EVAL_FILE).write_text(json.dumps(evaluation, indent=2, sort_keys=True))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def final_evaluation(vae: nn.Module, cfg: VAEConfig, factor: int, run: Run) -> dict[str, object]:
    """eval.json: the round-trip PSNR of every --val-data image, whole."""
    evaluation = roundtrip_psnr(vae, load_clean(cfg.val_data), factor, run.device,
                                progress=True)
    evaluation.update(folder=str(cfg.val_data), steps=cfg.max_steps)
    run.info(f"final round-trip PSNR on {cfg.val_data}: {evaluation['psnr']:.3f} dB "
             f"({evaluation['images']} whole images)")
    return evaluation


def train(cfg: VAEConfig) -> Path:
    """Train the preset's VAE as `cfg` says; returns the final diffusers VAE folder."""
    model_cfg = validate_vae_config(cfg)
    factor = model_cfg.vae_factor
    val = load_clean(cfg.val_data, cfg.val_images, cfg.val_crop) if cfg.val_data else None
    run = Run(cfg, "vae")
    dataset = JPEGPairs(folder_sources(cfg.data, cfg.crop), cfg.crop, (cfg.qf_min, cfg.qf_max),
                        cfg.seed)
    vae = build_model(model_cfg, cfg.seed, cfg.init).train()
    optimizer = torch.optim.Adam(vae.parameters(), lr=cfg.lr)
    model, optimizer = run.acc.prepare(vae, optimizer)
    run.track({"vae": vae}, {"adam": optimizer})
    batches = run.batches(dataset)
    run.begin()
    run.info(f"{len(dataset)} training images, {model_cfg.vae_class} (factor {factor}), "
             f"{sum(p.numel() for p in vae.parameters())} parameters")
    for step in range(run.start_step, cfg.max_steps):
        lr = loop.lr_at(step, cfg)
        loop.set_lr(optimizer, lr)
        total = 0.0
        for _ in range(cfg.grad_accum):
            x = autoencoder_inputs(next(batches))
            with run.acc.accumulate(model), run.acc.autocast():
                loss = l1_loss(model, x, factor)
                run.check_finite({"l1": loss}, step + 1)
                run.acc.backward(loss)
                if run.acc.sync_gradients and cfg.grad_clip:
                    run.acc.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            total += loss.item() / cfg.grad_accum
        done = step + 1
        run.log(done, {"l1": total, "lr": lr})
        if val and (done % cfg.val_every == 0 or done == cfg.max_steps) \
                and run.acc.is_main_process:
            result = roundtrip_psnr(vae, val, factor, run.device)
            run.writer.add_scalar("vae/val_psnr", result["psnr"], done)
            run.info(f"step {done}: round-trip PSNR {result['psnr']:.3f} dB on {len(val)} "
                     f"validation images")
        run.maybe_save(done)
    final_eval = partial(final_evaluation, vae, cfg, factor, run) if cfg.val_data else None
    return loop.finish_run(run, lambda final, evaluation: export(
        run.acc.unwrap_model(model), final, evaluation), final_eval)


@version_option()
@click.command(context_settings=CONTEXT_SETTINGS,
               help="Stage 0: train the preset's VAE (deterministic autoencoder, L1) and "
               "write a diffusers VAE folder to OUT/final.")
@config.config_options(VAEConfig)
def main(**kwargs) -> None:
    config.run_cli(train, VAEConfig, kwargs)


if __name__ == "__main__":
    main()
