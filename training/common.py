"""One training run's state: the accelerator, the data stream and its position, atomic
train-state checkpoints with bit-exact resume, the NaN/inf stop, validation and logging.

A train state is `OUT/train_state/step-N/`: `weights.safetensors` (trainable tensors only; the
frozen parts are rebuilt from the run's inputs), `optimizers.pt`, `rng-<rank>.pt` (torch, CUDA,
numpy and Python generators of each process), `scaler.pt` (fp16 only) and `state.json` (step,
data position, config). It is written into a temporary folder and renamed, so a crash leaves
the previous state intact; the newest `keep_last` are kept.
"""
from __future__ import annotations

import dataclasses
import json
import random
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from .config import Diverged, TrainConfig
from .data import StreamSampler, ValImage, evaluate

STATE_DIR, FINAL_DIR, LOG_DIR = "train_state", "final", "logs"
WEIGHTS, OPTIMIZERS, META = "weights.safetensors", "optimizers.pt", "state.json"
# Options that may change on --resume: they do not change what is computed.
RESUME_MUTABLE = {"max_steps", "save_every", "keep_last", "log_every", "val_every", "val_data",
                  "val_images", "val_qf", "val_crop", "num_workers", "resume", "cpu"}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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

