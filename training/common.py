"""What both training stages share: config fields and their CLI options, the learning rate,
the accelerator, the data stream, atomic train-state checkpoints with bit-exact resume, the
NaN/inf stop, validation and logging.

A train state is `OUT/train_state/step-N/`: `weights.safetensors` (trainable tensors only; the
frozen parts are rebuilt from the run's inputs), `optimizers.pt`, `rng-<rank>.pt` (torch, CUDA,
numpy and Python generators of each process), `scaler.pt` (fp16 only) and `state.json` (step,
data position, config). It is written into a temporary folder and renamed, so a crash leaves
the previous state intact; the newest `keep_last` are kept.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import click
import numpy as np
import torch
from torch import nn

from sodiff.config import PRESETS

from .data import StreamSampler, ValImage, evaluate

STATE_DIR, FINAL_DIR, LOG_DIR = "train_state", "final", "logs"
WEIGHTS, OPTIMIZERS, META = "weights.safetensors", "optimizers.pt", "state.json"
PAPER_CROP = 512  # default crop side for a config that is no preset (presets: their SAIPE side)
EXIT_DIVERGED = 3  # exit status of a run stopped by a NaN/inf loss
MIXED_PRECISION = ("no", "fp16", "bf16")
LR_SCHEDULES = ("constant", "cosine")
# Options that may change on --resume: they do not change what is computed.
RESUME_MUTABLE = {"max_steps", "save_every", "keep_last", "log_every", "val_every", "val_data",
                  "val_images", "val_qf", "val_crop", "num_workers", "resume", "cpu"}


def opt(default: Any = dataclasses.MISSING, help: str = "", **click_kw: Any) -> Any:
    """A config field whose `help` documents it here and in `--help`."""
    return field(default=default, metadata={"help": help, **click_kw})


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    out: str = opt(help="output folder: train_state/, logs/ (TensorBoard) and final/")
    data: str | None = opt(None, help="folder of high-quality training images (recursive)")
    crop: int | None = opt(None, help="training crop side in pixels [default: 512 (paper), 64 "
                           "for the tiny preset]")
    qf_min: int = opt(5, help="lowest JPEG quality drawn, inclusive (paper: 5)")
    qf_max: int = opt(95, help="highest JPEG quality drawn, inclusive (paper: 95)")
    batch_size: int = opt(16, help="images per process per micro-batch")
    grad_accum: int = opt(1, help="micro-batches per optimizer step")
    lr: float = opt(2e-4, help="peak learning rate")
    lr_schedule: str = opt("constant", help="constant (paper) or cosine decay to 0 at "
                           "--max-steps", choices=LR_SCHEDULES)
    warmup_steps: int = opt(0, help="linear warm-up steps from 0 to --lr (paper: none)")
    grad_clip: float = opt(0.0, help="clip the gradient norm to this; 0 disables (paper: none)")
    max_steps: int = opt(50_000, help="optimizer steps to train for")
    mixed_precision: str | None = opt(None, help="no, fp16 or bf16 autocast [default: "
                                      "accelerate's: its launch flag or config, else no]",
                                      choices=MIXED_PRECISION)
    cpu: bool = opt(False, help="train on the CPU even when a GPU is present")
    seed: int = opt(0, help="seed of the initialisation, the data order and all noise")
    num_workers: int = opt(4, help="DataLoader worker processes (does not change the data)")
    save_every: int = opt(1000, help="write a train state every N steps (and at the end)")
    keep_last: int = opt(2, help="train states to keep")
    log_every: int = opt(10, help="TensorBoard scalars every N steps")
    val_data: str | None = opt(None, help="held-out image folder for PSNR/SSIM validation")
    val_every: int = opt(1000, help="validate every N steps")
    val_images: int = opt(8, help="validation images (the first N, sorted)")
    val_qf: int = opt(10, help="JPEG quality of the validation inputs")
    val_crop: int | None = opt(None, help="validation images are centre-cropped to at most "
                               "this square [default: as --crop]")
    resume: bool = opt(False, help="continue the run in --out from its newest train state")


def validate_common(cfg: TrainConfig) -> list[str]:
    """Problems with the fields every stage shares (empty when all is well)."""
    p = []
    for name in ("crop", "batch_size", "grad_accum", "max_steps", "save_every", "keep_last",
                 "log_every", "val_every", "val_images", "val_crop"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            p.append(f"{name}={getattr(cfg, name)} must be >= 1")
    if not 1 <= cfg.qf_min <= cfg.qf_max <= 100:
        p.append(f"qf range [{cfg.qf_min}, {cfg.qf_max}] must satisfy 1 <= min <= max <= 100")
    if not 1 <= cfg.val_qf <= 100:
        p.append(f"val_qf={cfg.val_qf} must be in 1..100")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        p.append(f"lr={cfg.lr} must be a positive number")
    for name in ("warmup_steps", "num_workers", "grad_clip"):
        if getattr(cfg, name) < 0:
            p.append(f"{name}={getattr(cfg, name)} must be >= 0")
    if cfg.lr_schedule not in LR_SCHEDULES:
        p.append(f"lr_schedule={cfg.lr_schedule!r} must be one of {LR_SCHEDULES}")
    if cfg.mixed_precision is not None and cfg.mixed_precision not in MIXED_PRECISION:
        p.append(f"mixed_precision={cfg.mixed_precision!r} must be one of {MIXED_PRECISION}")
    return p


def with_crops(cfg: TrainConfig, preset: str) -> TrainConfig:
    """`cfg` with unset crop sides filled in: the preset's SAIPE input side (512 for sd21, the
    paper's crop; 64 for the tiny presets), or the paper's crop for any other config."""
    side = PRESETS[preset].saipe.image_size if preset in PRESETS else PAPER_CROP
    crop = cfg.crop or side
    return dataclasses.replace(cfg, crop=crop, val_crop=cfg.val_crop or crop)


def raise_problems(problems: list[str]) -> None:
    if problems:
        raise ValueError("invalid training config: " + "; ".join(problems))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then constant or
    cosine. Pure, so the schedule's whole state is the step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(cfg.max_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group at `lr` times its own `lr_scale` (1 when it has none)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def all_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters of every group (for gradient clipping)."""
    return [p for group in optimizer.param_groups for p in group["params"]]


# Optional numbers default to None, which says nothing of their type: without one click would
# hand the train function a string.
_OPTIONAL_NUMBERS = {"int | None": int, "float | None": float}


def config_options(cls: type) -> Callable:
    """Click options for every field of the config dataclass `cls` (`--field-name`)."""
    def decorate(fn: Callable) -> Callable:
        for f in reversed(dataclasses.fields(cls)):
            meta, flag = dict(f.metadata), "--" + f.name.replace("_", "-")
            help_text, choices = meta.pop("help", ""), meta.pop("choices", None)
            required = f.default is dataclasses.MISSING
            kw: dict[str, Any] = {"help": help_text, "show_default": True, "required": required}
            if not required:
                kw["default"] = f.default
            if isinstance(f.default, bool):
                flag = f"{flag}/--no-{flag[2:]}"
            elif choices:
                kw["type"] = click.Choice(choices)
            elif "type" in meta:
                kw["type"] = meta["type"]
            elif not required and f.default is not None:
                kw["type"] = type(f.default)
            elif f.type in _OPTIONAL_NUMBERS:
                kw["type"] = _OPTIONAL_NUMBERS[f.type]
            fn = click.option(flag, f.name, **kw)(fn)
        return fn
    return decorate


class Diverged(RuntimeError):
    """A loss term or a trained tensor became NaN/inf; nothing of that step was saved."""


def run_cli(train: Callable[[Any], Any], cls: type, kwargs: dict[str, Any]) -> None:
    """Build the config, train, and turn bad input into one error line (no traceback)."""
    try:
        train(cls(**kwargs))
    except Diverged as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(EXIT_DIVERGED)
    except (ValueError, FileNotFoundError) as e:  # CheckpointError, BaseModelError included
        raise click.ClickException(str(e)) from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def step_generator(seed: int, step: int, micro: int, rank: int,
                   device: torch.device) -> torch.Generator:
    """The generator of one micro-batch's noise (Gumbel, discriminator timesteps): a pure
    function of its coordinates, so resuming needs no generator state."""
    sub = int(np.random.default_rng([seed, step, micro, rank]).integers(2 ** 62))
    return torch.Generator(device=device).manual_seed(sub)


def trainable_tensors(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Every parameter that trains, keyed `<module>.<parameter>`."""
    return {f"{name}.{k}": p for name, m in modules.items()
            for k, p in m.named_parameters() if p.requires_grad}


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def state_dirs(out: str | Path) -> list[Path]:
    """Complete train states in `out`, oldest first."""
    root = Path(out) / STATE_DIR
    if not root.is_dir():
        return []
    found = [d for d in root.glob("step-*") if (d / META).is_file() and d.name[5:].isdigit()]
    return sorted(found, key=lambda d: int(d.name[5:]))


def check_output(cfg: TrainConfig) -> None:
    """A fresh run never overwrites another; --resume needs something to resume."""
    out, states = Path(cfg.out), state_dirs(cfg.out)
    if cfg.resume and not states:
        raise ValueError(f"--resume: no train state in {out / STATE_DIR}")
    if not cfg.resume and (states or (out / FINAL_DIR).exists()):
        raise ValueError(f"{out} already holds a training run; pass --resume to continue it "
                         f"or choose another --out")


def check_resume_config(saved: dict[str, Any], cfg: TrainConfig, where: Path) -> None:
    new = dataclasses.asdict(cfg)
    diff = sorted(k for k in set(saved) | set(new)
                  if k not in RESUME_MUTABLE and saved.get(k) != new.get(k))
    if diff:
        changes = ", ".join(f"{k}: {saved.get(k)!r} -> {new.get(k)!r}" for k in diff)
        raise ValueError(f"--resume: options differ from the run in {where} ({changes}); only "
                         f"{', '.join(sorted(RESUME_MUTABLE))} may change")


class Run:
    """One training run's bookkeeping: accelerator, resume, data, logs, checks and saves."""

    def __init__(self, cfg: TrainConfig, stage: str):
        from accelerate import Accelerator

        check_output(cfg)
        self.cfg, self.stage, self.out = cfg, stage, Path(cfg.out)
        # None: nothing passed, so `accelerate launch --mixed_precision` or its config decides.
        self.acc = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cfg.cpu,
                               gradient_accumulation_steps=cfg.grad_accum)
        self.per_step = cfg.batch_size * cfg.grad_accum * self.acc.num_processes
        self.start_step = self.start_position = 0
        self.modules: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.writer = self.bar = None
        self.dataset_len = self.saved_dataset_len = 0
        seed_everything(cfg.seed)

    @property
    def device(self) -> torch.device:
        return self.acc.device

    def info(self, msg: str) -> None:
        if self.acc.is_main_process:
            (self.bar.write if self.bar is not None else print)(f"[{self.stage}] {msg}")

    def track(self, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer]
              ) -> None:
        """Register what train states hold (unwrapped modules), then resume if asked."""
        self.modules, self.optimizers = modules, optimizers
        if self.cfg.resume:
            self._load(state_dirs(self.out)[-1])

    def _load(self, folder: Path) -> None:
        from safetensors.torch import load_file

        meta = json.loads((folder / META).read_text())
        check_resume_config(meta["config"], self.cfg, folder)
        tensors, expected = load_file(str(folder / WEIGHTS)), trainable_tensors(self.modules)
        if set(tensors) != set(expected):
            raise ValueError(f"{folder / WEIGHTS} does not match this model's trainable tensors")
        with torch.no_grad():
            for k, p in expected.items():
                p.copy_(tensors[k])
        opts = torch.load(folder / OPTIMIZERS, map_location="cpu", weights_only=True)
        for name, o in self.optimizers.items():
            o.load_state_dict(opts[name])
        if self.acc.scaler is not None and (folder / "scaler.pt").is_file():
            self.acc.scaler.load_state_dict(torch.load(folder / "scaler.pt", weights_only=True))
        rng = folder / f"rng-{self.acc.process_index}.pt"
        set_rng_state(torch.load(rng if rng.is_file() else folder / "rng-0.pt",
                                 weights_only=True))
        self.start_step, self.start_position = meta["step"], meta["position"]
        self.saved_dataset_len = meta["dataset_len"]
        self.info(f"resumed from {folder} (step {self.start_step})")

    def batches(self, dataset) -> Iterator[dict[str, torch.Tensor]]:
        """The endless batch stream from this run's data position, on the device."""
        from torch.utils.data import DataLoader

        self.dataset_len = len(dataset)
        if self.saved_dataset_len and self.saved_dataset_len != len(dataset):
            raise ValueError(f"--resume: the training data changed ({self.saved_dataset_len} "
                             f"usable items when the train state was written, {len(dataset)} "
                             f"now), so the run cannot continue exactly")
        sampler = StreamSampler(len(dataset), self.cfg.seed, self.cfg.batch_size,
                                self.start_position, self.acc.process_index,
                                self.acc.num_processes)
        # Its own generator: a DataLoader iterator otherwise draws its worker base seed from
        # the global RNG, which would shift the global RNG state of a resumed run.
        loader = DataLoader(dataset, batch_size=self.cfg.batch_size, sampler=sampler,
                            num_workers=self.cfg.num_workers, drop_last=True,
                            pin_memory=self.device.type == "cuda",
                            generator=torch.Generator().manual_seed(self.cfg.seed))
        for batch in loader:
            yield {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def position(self, step: int) -> int:
        """Global data position after `step` optimizer steps."""
        return self.start_position + (step - self.start_step) * self.per_step

    def begin(self) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        self.info(f"{self.acc.num_processes} process(es) on {self.device}, mixed precision "
                  f"{self.acc.mixed_precision}, {self.per_step} images per optimizer step")
        if self.acc.is_main_process:
            self.writer = SummaryWriter(str(self.out / LOG_DIR), purge_step=self.start_step)
            self.bar = tqdm(total=self.cfg.max_steps, initial=self.start_step, desc=self.stage,
                            dynamic_ncols=True)

    def check_finite(self, terms: dict[str, torch.Tensor], step: int) -> None:
        """Stop (on every process) when a loss term of optimizer step `step` is NaN/inf."""
        bad = [k for k, v in terms.items() if not torch.isfinite(v.detach()).all()]
        flag = torch.tensor([float(len(bad))], device=self.device)
        if self.acc.num_processes > 1:
            flag = self.acc.reduce(flag, "sum")
        if flag.item():
            what = (", ".join(f"'{k}' = {terms[k].item()}" for k in bad) if bad
                    else "a term on another process")
            self.diverged(f"step {step}: loss {what} is not finite")

    def diverged(self, why: str) -> None:
        states = state_dirs(self.out)
        last = f"the last good train state is {states[-1]}" if states else "no train state was " \
            "written yet"
        self.close()
        raise Diverged(f"{why}; training stopped and this step was not saved ({last}; continue "
                       f"with --resume, e.g. after lowering --lr)")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if self.writer is not None and (step % self.cfg.log_every == 0
                                        or step == self.cfg.max_steps):
            for k, v in scalars.items():
                self.writer.add_scalar(f"{self.stage}/{k}", v, step)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in scalars.items()}, refresh=False)

    def maybe_validate(self, step: int, fn: Callable[[torch.Tensor], torch.Tensor],
                       images: list[ValImage] | None, module: nn.Module
                       ) -> dict[str, float] | None:
        """Every `val_every` steps: PSNR/SSIM of `fn` with `module` in eval mode."""
        if not images or (step % self.cfg.val_every and step != self.cfg.max_steps):
            return None
        result = None
        if self.acc.is_main_process:
            modes = [(m, m.training) for m in module.modules()]
            module.eval()
            with self.acc.autocast():
                result = evaluate(fn, images, self.device)
            for m, training in modes:
                m.train(training)
            for k, v in result.items():
                self.writer.add_scalar(f"{self.stage}/val_{k}", v, step)
            self.info(f"step {step}: validation PSNR {result['psnr']:.3f} dB, "
                      f"SSIM {result['ssim']:.4f} (JPEG input: {result['psnr_jpeg']:.3f} dB)")
        self.acc.wait_for_everyone()
        return result

    def maybe_save(self, step: int) -> Path | None:
        if step % self.cfg.save_every and step != self.cfg.max_steps:
            return None
        return self.save(step)

    def save(self, step: int) -> Path:
        """Write the train state after `step` optimizer steps (atomically; keep the newest)."""
        from safetensors.torch import save_file

        tensors = trainable_tensors(self.modules)
        bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
        if bad:
            self.diverged(f"step {step}: trained tensor {bad[0]} is not finite")
        self._check_in_sync(tensors, step)
        root = self.out / STATE_DIR
        final, tmp = root / f"step-{step}", root / f".tmp-step-{step}"
        if self.acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.acc.wait_for_everyone()
        torch.save(rng_state(), tmp / f"rng-{self.acc.process_index}.pt")
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                      str(tmp / WEIGHTS))
            torch.save({k: o.state_dict() for k, o in self.optimizers.items()}, tmp / OPTIMIZERS)
            if self.acc.scaler is not None:
                torch.save(self.acc.scaler.state_dict(), tmp / "scaler.pt")
            position = self.position(step)
            epoch, index = divmod(position, self.dataset_len)
            meta = {"stage": self.stage, "step": step, "position": position, "epoch": epoch,
                    "index": index, "dataset_len": self.dataset_len,
                    "processes": self.acc.num_processes, "config": dataclasses.asdict(self.cfg)}
            (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in state_dirs(self.out)[:-self.cfg.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()
        return final

    def _check_in_sync(self, tensors: dict[str, torch.Tensor], step: int) -> None:
        """Every process must hold the same weights (DDP syncs every trained gradient)."""
        if self.acc.num_processes == 1:
            return
        total = sum(v.detach().double().sum() for v in tensors.values())
        sums = self.acc.gather(torch.as_tensor(total, device=self.device).reshape(1))
        if not torch.all(sums == sums[0]):
            raise RuntimeError(f"step {step}: trained weights differ between processes "
                               f"(checksums {sums.tolist()}); a gradient was not synchronised")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        self.bar = self.writer = None

