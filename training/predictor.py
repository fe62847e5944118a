"""Stage 1.5: pretrain the timestep predictor's trunk and QF head on QF regression alone.

    python -m training.predictor --preset tiny-full --data BSDS500/train --val-data BSDS500/val \
        --out runs/predictor

Stage 2 trains the predictor only through its (small) share of the loss; starting from random
weights it never learned to see the compression (issue 13). Here it learns just that: the L1
distance of the QF head's normalised output to `(QF - 50) / 45`, QF uniform in 5..95, on
native-resolution crops (never resized: the 8x8 grid is the signal) with the JPEG grid at the
crop's origin, as at inference. The timestep head does not train here.

`OUT/final/` holds `predictor.safetensors` and `predictor.json` (the predictor config and the
held-out QF MAE); `training.stage2 --predictor OUT/final` starts from it. Train states and
--resume (bit-exact) are `training.common`'s.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import click
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from runtime.cliopts import CONTEXT_SETTINGS, version_option
from sodiff.config import PRESETS, PredictorConfig, get_preset, validate_config
from sodiff.jpeg import compress
from sodiff.predictor import TimestepPredictor

from . import config, loop
from .common import Run
from .config import TrainConfig, opt
from .data import JPEGPairs, folder_sources, list_images, load_rgb, to_tensor

WEIGHTS_FILE, META_FILE = "predictor.safetensors", "predictor.json"
QF_CENTRE, QF_HALF_RANGE = 50.0, 45.0  # normalised target (QF - 50) / 45: QF 5..95 -> -1..1
EVAL_QFS = tuple(range(5, 96, 10))     # every held-out image is scored at each of these
MIN_CROP = 256                         # below this the QF estimate gets noisy (issue 13)
UNUSED_VAL_QF = 10                     # TrainConfig's default; evaluation uses EVAL_QFS


@dataclass(frozen=True, kw_only=True)
class PredictorTrainConfig(TrainConfig):
    preset: str = opt("tiny-full", help="model preset whose predictor config is trained",
                      choices=tuple(PRESETS))
    crop: int = opt(256, help="native-resolution training crop side in pixels (>= 256)")
    batch_size: int = opt(16, help="crops per process per micro-batch")
    lr: float = opt(1e-3, help="Adam learning rate")
    lr_schedule: str = opt("cosine", help="constant or cosine decay to 0 at --max-steps",
                           choices=config.LR_SCHEDULES)
    max_steps: int = opt(2000, help="optimizer steps to train for")
    save_every: int = opt(250, help="write a train state every N steps (and at the end)")
    val_every: int = opt(500, help="evaluate the held-out QF MAE every N steps")
    val_images: int = opt(20, help="held-out images during training (the first N, sorted); "
                          "the final evaluation uses every image of --val-data")


def validate_predictor_config(cfg: PredictorTrainConfig) -> PredictorConfig:
    """ValueError naming every bad option; returns the preset's predictor config."""
    p = config.validate_common(cfg)
    pcfg = None
    if cfg.preset not in PRESETS:
        p.append(f"preset={cfg.preset!r} must be one of {', '.join(PRESETS)}")
    else:
        pcfg = get_preset(cfg.preset).predictor
        if pcfg.front != "dct":
            p.append(f"preset={cfg.preset!r} has the predictor front {pcfg.front!r}; stage 1.5 "
                     f"is for the block-DCT front")
    if cfg.data is None:
        p.append("data is required (a folder of high-quality training images)")
    if cfg.crop < MIN_CROP:
        p.append(f"crop={cfg.crop} must be >= {MIN_CROP} (native-resolution crops)")
    if cfg.crop % 8:
        p.append(f"crop={cfg.crop} must be a multiple of 8 (the JPEG block)")
    if cfg.val_qf != UNUSED_VAL_QF:
        p.append(f"val_qf={cfg.val_qf} is not used: evaluation scores every image at QF "
                 f"{EVAL_QFS[0]}..{EVAL_QFS[-1]}")
    config.raise_problems(p)
    return pcfg


def normalised(qf: torch.Tensor) -> torch.Tensor:
    return (qf - QF_CENTRE) / QF_HALF_RANGE


def qf_loss(predictor: TimestepPredictor, lq: torch.Tensor, qf: torch.Tensor) -> torch.Tensor:
    """L1 between the QF head's output and the true QF, both normalised."""
    pred = predictor.qf(predictor.features(lq))
    return F.l1_loss(normalised(pred), normalised(qf.to(pred.dtype)))


@torch.no_grad()
def evaluate(predictor: TimestepPredictor, folder: str | Path, limit: int | None = None,
             qfs: tuple[int, ...] = EVAL_QFS, device: torch.device | str = "cpu",
             progress: bool = False) -> dict[str, object]:
    """QF MAE of the predictor on whole images of `folder` (the first `limit`, sorted), each
    compressed at every QF of `qfs`: overall and per QF."""
    modes = [(m, m.training) for m in predictor.modules()]
    predictor.eval()
    errors: dict[int, list[float]] = {q: [] for q in qfs}
    paths = list_images(folder)[:limit]
    if not paths:
        raise ValueError(f"no images in {folder}")
    for path in tqdm(paths, desc="QF eval", disable=not progress, leave=False):
        image = load_rgb(path)
        batch = torch.stack([to_tensor(compress(image, q)[0]) for q in qfs]).to(device)
        pred = predictor.qf(predictor.features(batch)).float().cpu().numpy()
        for q, p in zip(qfs, pred):
            errors[q].append(abs(float(p) - q))
    for m, training in modes:
        m.train(training)
    per_qf = {str(q): float(np.mean(e)) for q, e in errors.items()}
    return {"qf_mae": float(np.mean([v for e in errors.values() for v in e])),
            "per_qf": per_qf, "images": len(paths), "qfs": list(qfs)}


def save_predictor(predictor: TimestepPredictor, folder: Path, extra: dict) -> Path:
    """`predictor.safetensors` + `predictor.json`, written to a temporary folder and renamed."""
    from safetensors.torch import save_file

    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in predictor.state_dict().items()},
              str(tmp / WEIGHTS_FILE))
    meta = {"config": dataclasses.asdict(predictor.cfg), **extra}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def load_predictor(folder: str | Path) -> TimestepPredictor:
    """The predictor of a stage-1.5 output folder; ValueError when it is not one."""
    from safetensors.torch import load_file

    folder = Path(folder).expanduser()
    if not (folder / META_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise ValueError(f"{folder} is not a stage-1.5 predictor folder: {META_FILE} and "
                         f"{WEIGHTS_FILE} are expected (python -m training.predictor)")
    meta = json.loads((folder / META_FILE).read_text())
    raw = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()}
    cfg = PredictorConfig(**raw)
    validate_config(get_preset("tiny").replace(predictor=cfg))
    predictor = TimestepPredictor(cfg)
    predictor.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    return predictor


def final_evaluation(predictor: TimestepPredictor, cfg: PredictorTrainConfig, run: Run
                     ) -> dict[str, object]:
    """The QF MAE on every --val-data image, whole."""
    result = evaluate(predictor, cfg.val_data, device=run.device, progress=True)
    result["folder"] = str(cfg.val_data)
    run.info(f"final held-out QF MAE on {cfg.val_data}: {result['qf_mae']:.2f} "
             f"({result['images']} whole images x {len(EVAL_QFS)} QFs)")
    return result


def export(predictor: TimestepPredictor, cfg: PredictorTrainConfig, folder: Path,
           evaluation: dict[str, object] | None) -> Path:
    """The predictor folder, with what trained it and its final evaluation (when there is one)."""
    extra: dict = {"training": {"stage": 1.5, "steps": cfg.max_steps, "seed": cfg.seed,
                                "crop": cfg.crop, "qf": [cfg.qf_min, cfg.qf_max]}}
    if evaluation is not None:
        extra["eval"] = evaluation
    return save_predictor(predictor, folder, extra)


def train(cfg: PredictorTrainConfig) -> Path:
    """Pretrain the preset's predictor on QF as `cfg` says; returns the final folder."""
    pcfg = validate_predictor_config(cfg)
    run = Run(cfg, "predictor")
    dataset = JPEGPairs(folder_sources(cfg.data, cfg.crop), cfg.crop, (cfg.qf_min, cfg.qf_max),
                        cfg.seed)
    predictor = TimestepPredictor(pcfg).train()
    predictor.timestep_head.requires_grad_(False)  # stage 2 trains it, through the images
    optimizer = torch.optim.Adam([p for p in predictor.parameters() if p.requires_grad],
                                 lr=cfg.lr)
    model, optimizer = run.acc.prepare(predictor, optimizer)
    run.track({"predictor": predictor}, {"adam": optimizer})
    batches = run.batches(dataset)
    run.begin()
    run.info(f"{len(dataset)} training images, {cfg.crop} px crops, QF {cfg.qf_min}..{cfg.qf_max}")
    for step in range(run.start_step, cfg.max_steps):
        lr = loop.lr_at(step, cfg)
        loop.set_lr(optimizer, lr)
        total = 0.0
        for _ in range(cfg.grad_accum):
            batch = next(batches)
            with run.acc.accumulate(model), run.acc.autocast():
                loss = qf_loss(predictor, batch["lq"], batch["qf"])
                run.check_finite({"l1": loss}, step + 1)
                run.acc.backward(loss)
                if run.acc.sync_gradients and cfg.grad_clip:
                    run.acc.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            total += loss.item() / cfg.grad_accum
        done = step + 1
        run.log(done, {"l1": total, "qf_mae_train": total * QF_HALF_RANGE, "lr": lr})
        if cfg.val_data and (done % cfg.val_every == 0 or done == cfg.max_steps) \
                and run.acc.is_main_process:
            result = evaluate(predictor, cfg.val_data, cfg.val_images, device=run.device)
            run.writer.add_scalar("predictor/val_qf_mae", result["qf_mae"], done)
            run.info(f"step {done}: held-out QF MAE {result['qf_mae']:.2f} on "
                     f"{result['images']} images")
        run.maybe_save(done)
    final_eval = partial(final_evaluation, predictor, cfg, run) if cfg.val_data else None
    return loop.finish_run(run, lambda final, evaluation: export(
        run.acc.unwrap_model(model), cfg, final, evaluation), final_eval)


@version_option()
@click.command(context_settings=CONTEXT_SETTINGS,
               help="Stage 1.5: pretrain the timestep predictor on QF regression alone "
               "(native-resolution crops) and write OUT/final for training.stage2 --predictor.")
@config.config_options(PredictorTrainConfig)
def main(**kwargs) -> None:
    config.run_cli(train, PredictorTrainConfig, kwargs)


if __name__ == "__main__":
    main()
