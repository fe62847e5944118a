"""Stage 1: train SAIPE (paper Sec. 3.1, Eq. 5): L1(rec, hq) + lambda_align * MSE(prompt, e_text).

    python -m training.stage1 --preset sd21 --base SD21_DIR --embeddings STORE --out runs/s1
    python -m training.stage1 --preset tiny --no-align --data IMAGES --out runs/s1-tiny

The output, `OUT/final`, is a SODiff checkpoint whose SAIPE is trained (UNet, VAE and predictor
as built: the base's for sd21, seeded random ones for tiny); stage 2 starts from it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click
import torch
import torch.nn.functional as F

from runtime.cliopts import CONTEXT_SETTINGS, version_option
from sodiff import checkpoint
from sodiff.base import read_base_configs
from sodiff.config import PRESETS, ModelConfig, get_preset
from sodiff.model import SODiff, resize_for_saipe
from sodiff.saipe import SAIPE

from . import config, loop
from .common import Run
from .config import TrainConfig, opt
from .data import JPEGPairs, folder_sources, store_sources, validation_images
from .losses import stage1_loss


@dataclass(frozen=True, kw_only=True)
class Stage1Config(TrainConfig):
    preset: str = opt("sd21", help="model preset (sd21: the paper; tiny: tests and demos)",
                      choices=tuple(PRESETS))
    base: str | None = opt(None, help="local SD2.1-base diffusers folder; the final checkpoint "
                           "refers to it (required for sd21)")
    embeddings: str | None = opt(None, help="text-embedding store of captioned crops (python -m "
                                 "training.text_embeddings); its crops are the training data")
    align: bool = opt(True, help="alignment loss on (needs --embeddings); --no-align trains the "
                      "reconstruction branch only, on --data")
    lambda_align: float = opt(0.5, help="weight of MSE(prompt, text embedding) (paper: 0.5)")
    batch_size: int = opt(16, help="images per process per micro-batch (paper: 16 in total)")
    lr: float = opt(2e-4, help="Adam learning rate (paper: 2e-4)")
    max_steps: int = opt(50_000, help="optimizer steps (paper: 50k)")


def validate_train_config(cfg: Stage1Config) -> None:
    """ValueError naming every bad or inconsistent option."""
    p = config.validate_common(cfg)
    if cfg.preset not in PRESETS:
        p.append(f"preset={cfg.preset!r} must be one of {', '.join(PRESETS)}")
    elif not cfg.preset.startswith("tiny") and cfg.base is None:
        p.append(f"preset={cfg.preset!r} needs base (a local SD2.1-base folder) so that the "
                 f"final checkpoint can refer to it")
    if cfg.align and cfg.embeddings is None:
        p.append("align=True needs embeddings (a text-embedding store); pass --no-align to train "
                 "without the alignment loss on --data")
    if cfg.align and cfg.data is not None:
        p.append(f"data={cfg.data!r} is not used with the alignment loss (the store's crops are "
                 f"the data); drop it or pass --no-align")
    if not cfg.align and cfg.embeddings is not None:
        p.append(f"embeddings={cfg.embeddings!r} given with --no-align")
    if not cfg.align and cfg.data is None:
        p.append("--no-align needs data (a folder of high-quality images)")
    if not cfg.lambda_align >= 0:
        p.append(f"lambda_align={cfg.lambda_align} must be >= 0")
    config.raise_problems(p)


def build_dataset(cfg: Stage1Config, model_cfg: ModelConfig) -> JPEGPairs:
    qf_range = (cfg.qf_min, cfg.qf_max)
    if not cfg.align:
        return JPEGPairs(folder_sources(cfg.data, cfg.crop), cfg.crop, qf_range, cfg.seed)
    from .text_embeddings import EmbeddingStore

    store = EmbeddingStore(cfg.embeddings)
    want = (model_cfg.saipe.num_queries, model_cfg.saipe.prompt_dim)
    if len(store) and tuple(store[0][2].shape) != want:
        raise ValueError(f"text embeddings in {cfg.embeddings} have shape "
                         f"{tuple(store[0][2].shape)}; preset {cfg.preset!r} prompts are {want}")
    return JPEGPairs(store_sources(store), cfg.crop, qf_range, cfg.seed, store)


def check_base(cfg: Stage1Config) -> None:
    """Fail now, not after training, if the final checkpoint could not be built on `--base`."""
    if cfg.base is None:
        return
    unet, vae, vae_class = read_base_configs(cfg.base)
    get_preset(cfg.preset).replace(unet=unet, vae=vae, vae_class=vae_class)


def rec_at_input_size(saipe: torch.nn.Module, lq: torch.Tensor, size: int) -> torch.Tensor:
    """SAIPE's reconstruction, resized back to the input's size (for validation)."""
    rec = saipe(resize_for_saipe(lq, size))[1]
    return F.interpolate(rec, size=lq.shape[-2:], mode="bilinear", align_corners=False,
                         antialias=True)


def export_model(saipe: SAIPE, cfg: Stage1Config, folder: Path) -> Path:
    """A SODiff checkpoint holding the trained SAIPE, at `folder`."""
    model_cfg = get_preset(cfg.preset)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # the tiny preset's random UNet/VAE: same for every run
        model = SODiff.from_base(model_cfg, cfg.base) if cfg.base else SODiff(model_cfg)
    model.saipe.load_state_dict(saipe.state_dict())
    return checkpoint.save(model, folder, extra={"training": {
        "stage": 1, "steps": cfg.max_steps, "align": cfg.align}})


def train(cfg: Stage1Config) -> Path:
    """Train SAIPE as `cfg` says; returns the final SODiff checkpoint folder."""
    validate_train_config(cfg)
    cfg = config.with_crops(cfg, cfg.preset)
    check_base(cfg)
    run = Run(cfg, "stage1")
    model_cfg = get_preset(cfg.preset)
    dataset = build_dataset(cfg, model_cfg)
    size = model_cfg.saipe.image_size
    saipe = SAIPE(model_cfg.saipe).train()
    optimizer = torch.optim.Adam(saipe.parameters(), lr=cfg.lr)
    model, optimizer = run.acc.prepare(saipe, optimizer)
    run.track({"saipe": saipe}, {"adam": optimizer})
    val = validation_images(cfg.val_data, cfg.val_crop, cfg.val_qf, cfg.val_images) \
        if cfg.val_data else None
    batches = run.batches(dataset)
    run.begin()
    run.info(f"{len(dataset)} training crops; alignment loss "
             f"{'on (lambda %g)' % cfg.lambda_align if cfg.align else 'OFF (--no-align)'}")
    for step in range(run.start_step, cfg.max_steps):
        loop.set_lr(optimizer, loop.lr_at(step, cfg))
        sums: dict[str, float] = {}
        for _ in range(cfg.grad_accum):
            batch = next(batches)
            with run.acc.accumulate(model):
                prompt, rec = model(resize_for_saipe(batch["lq"], size))
                loss, terms = stage1_loss(prompt, rec, resize_for_saipe(batch["hq"], size),
                                          batch.get("text"), cfg.lambda_align)
                run.check_finite(terms, step + 1)
                run.acc.backward(loss)
                if run.acc.sync_gradients and cfg.grad_clip:
                    run.acc.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.item() / cfg.grad_accum
        done = step + 1
        run.log(done, {**sums, "lr": loop.lr_at(step, cfg)})
        run.maybe_validate(done, lambda lq: rec_at_input_size(saipe, lq, size), val, saipe)
        run.maybe_save(done)
    return loop.finish_run(run, lambda final, _: export_model(saipe, cfg, final))


@version_option()
@click.command(context_settings=CONTEXT_SETTINGS,
               help="Stage 1: train SAIPE, the semantic-aligned image prompt extractor "
               "(paper defaults; see README 'Training').")
@config.config_options(Stage1Config)
def main(**kwargs) -> None:
    config.run_cli(train, Stage1Config, kwargs)


if __name__ == "__main__":
    main()
