"""A tiny preset's base folder: what SD2.1-base is to sd21, made from the project's own parts.

    python -m training.tiny_base --vae runs/vae-tiny/final --out runs/tiny-base

No pretrained diffusion model fits the tiny presets, so their "base" is built here: `OUT/vae/`
is the stage-0 VAE (training/vae.py), copied, and `OUT/unet/` a freshly initialised UNet of
the preset's config (seeded) whose output convolution is zeroed. A zero noise prediction makes
Eq. 6 return `z_lq / sqrt(alpha_bar(tau))`, which at the small starting timestep of `tiny-full`
(`predictor.t_init`) is within a few percent of the input latent: the untrained one-step model
starts as the VAE round trip of its input, and stage 2 learns the correction from there. A
random output layer would instead start from noise scaled by `sqrt(1 - alpha_bar)`.

Both parts are diffusers folders (`config.json` + safetensors), so `--base OUT` works wherever
a SD2.1-base folder does (stage 1, stage 2, checkpoint loading).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import click
import torch

from runtime.cliopts import CONTEXT_SETTINGS, version_option
from sodiff.base import BaseModelError, build_unet
from sodiff.config import PRESETS, get_preset

DEFAULT_VAE = Path(__file__).resolve().parents[1] / "weights" / "tiny-vae"
VAE_FILES = ("config.json", "diffusion_pytorch_model.safetensors")


def check_vae(vae_dir: Path, preset: str) -> None:
    """Fail unless `vae_dir` is a diffusers VAE folder of the preset's class and latent size."""
    missing = [f for f in VAE_FILES if not (vae_dir / f).is_file()]
    if missing:
        raise BaseModelError(f"{vae_dir} is not a VAE folder: {', '.join(missing)} missing (make "
                             f"one with `python -m training.vae`)")
    found = json.loads((vae_dir / "config.json").read_text())
    cfg = get_preset(preset)
    want = {"_class_name": cfg.vae_class, "latent_channels": cfg.latent_channels}
    bad = {k: found.get(k) for k, v in want.items() if found.get(k) != v}
    if bad:
        raise ValueError(f"{vae_dir}: {bad} does not fit preset {preset!r}, which needs {want}")


def make_base(vae_dir: str | Path, out: str | Path, preset: str = "tiny-full",
              seed: int = 0) -> Path:
    """Write the base folder `out` (`unet/` and `vae/`); refuses to overwrite anything."""
    vae_dir, out = Path(vae_dir).expanduser(), Path(out).expanduser()
    if preset not in PRESETS or not preset.startswith("tiny"):
        raise ValueError(f"preset={preset!r}: a base is built only for the tiny presets "
                         f"({', '.join(p for p in PRESETS if p.startswith('tiny'))}); sd21 uses "
                         f"a local SD2.1-base folder")
    check_vae(vae_dir, preset)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new --out or remove it")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = build_unet(get_preset(preset).unet)
    with torch.no_grad():
        unet.conv_out.weight.zero_()
        unet.conv_out.bias.zero_()
    unet.save_pretrained(out / "unet", safe_serialization=True)
    (out / "vae").mkdir(parents=True)
    for name in VAE_FILES:
        shutil.copy2(vae_dir / name, out / "vae" / name)
    return out


@version_option()
@click.command(context_settings=CONTEXT_SETTINGS,
               help="Build a tiny preset's base folder (UNet with a zeroed output layer + the "
               "stage-0 VAE) for training.stage1/stage2 --base (see README 'Training').")
@click.option("--vae", "vae_dir", default=str(DEFAULT_VAE), show_default=True,
              help="stage-0 VAE folder (training.vae's OUT/final)")
@click.option("--out", required=True, help="new folder to write (unet/ and vae/)")
@click.option("--preset", default="tiny-full", show_default=True,
              type=click.Choice([p for p in PRESETS if p.startswith("tiny")]),
              help="preset whose UNet config is built")
@click.option("--seed", default=0, show_default=True, help="seed of the UNet's initialisation")
def main(vae_dir: str, out: str, preset: str, seed: int) -> None:
    try:
        folder = make_base(vae_dir, out, preset, seed)
    except (ValueError, OSError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote {folder}")


if __name__ == "__main__":
    main()
