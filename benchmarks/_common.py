"""Shared benchmark helpers: constants, statistics, machine/version facts, file output."""
from __future__ import annotations

import datetime as _dt
import importlib
import json
import os
import platform
import subprocess
import threading
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
# The evaluation images (docs/data.md): $SODIFF_DATA, else a `shared/data` folder beside the
# repository. The one place the benchmarks name it (tests/conftest.py is the tests' one).
DATA_ENV = "SODIFF_DATA"
SHARED_DATA = Path(os.environ.get(DATA_ENV) or REPO.parent / "shared" / "data")

# The exported components in pipeline order (docs/engine-dir.md), then the whole pipeline.
COMPONENTS = ("saipe", "predictor", "vae_encoder", "unet", "vae_decoder")
PIPELINE = "pipeline"
MODULES = (*COMPONENTS, PIPELINE)

# Dense (no sparsity) peak TFLOP/s per precision, matched by a fragment of the device name.
# fp32 is the non-tensor-core rate, tf32 the tensor-core one (PyTorch runs fp32 convolutions in
# TF32 by default). Variants with other clocks (H100 PCIe/NVL) are left unknown rather than
# guessed; CPUs are always unknown.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200", {"fp16": 989.0, "bf16": 989.0, "tf32": 494.0, "fp32": 67.0}),
    ("H100", {"fp16": 989.0, "bf16": 989.0, "tf32": 494.0, "fp32": 67.0}),
    ("A100", {"fp16": 312.0, "bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
)
PEAK_EXCLUDE = ("PCIe", "NVL")

RSS_SAMPLE_S = 0.005  # host-memory sampling period while a measurement runs


def peak_tflops(device_name: str | None, precision: str) -> float | None:
    """The device's dense peak for `precision` ('fp32', 'tf32', 'fp16', 'bf16'), or None if
    unknown."""
    if not device_name or any(x in device_name for x in PEAK_EXCLUDE):
        return None
    for fragment, table in PEAK_TFLOPS:
        if fragment in device_name:
            return table.get(precision)
    return None


def summarize(samples_ms: Sequence[float]) -> dict[str, float]:
    """Median, p90 (linear interpolation), mean, min and max of timing samples in ms."""
    if len(samples_ms) == 0:
        raise ValueError("no timing samples to summarize")
    a = np.asarray(samples_ms, dtype=np.float64)
    return {"median_ms": float(np.median(a)), "p90_ms": float(np.percentile(a, 90)),
            "mean_ms": float(a.mean()), "min_ms": float(a.min()), "max_ms": float(a.max()),
            "n": int(a.size)}


def parse_int_list(text: str, what: str) -> list[int]:
    """'1,8' -> [1, 8]; ValueError naming `what` and the bad value otherwise."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"{what} must be positive integers, got {text!r}")
    return values


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'512,768x512' -> [(512, 512), (768, 512)] as (height, width)."""
    sizes = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        hw = part.lower().split("x")
        try:
            h, w = (int(hw[0]), int(hw[0])) if len(hw) == 1 else (int(hw[0]), int(hw[1]))
        except ValueError:
            raise ValueError(f"size {part!r} is not N or HxW") from None
        if len(hw) > 2 or h < 1 or w < 1:
            raise ValueError(f"size {part!r} is not N or HxW with positive sides")
        sizes.append((h, w))
    if not sizes:
        raise ValueError(f"no sizes in {text!r}")
    return sizes


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _module_version(name: str) -> str | None:
    try:
        return getattr(importlib.import_module(name), "__version__", "unknown")
    except Exception:  # noqa: BLE001 - a broken optional package is reported as absent
        return None


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def versions() -> dict[str, Any]:
    """Versions of everything a benchmark number depends on (None: not installed)."""
    v: dict[str, Any] = {"python": platform.python_version(), "sodiff_commit": git_commit()}
    for name in ("torch", "diffusers", "numpy", "PIL", "onnx", "onnxruntime", "tensorrt",
                 "pyiqa"):
        v[name] = _module_version(name)
    try:
        import onnxruntime as ort
        v["onnxruntime_providers"] = ort.get_available_providers()
    except Exception:  # noqa: BLE001
        v["onnxruntime_providers"] = None
    try:
        import torch
        v["cuda"] = torch.version.cuda
        v["cudnn"] = torch.backends.cudnn.version() if torch.cuda.is_available() else None
    except ImportError:
        pass
    return v


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict[str, Any]:
    """CPU, memory and (on CUDA) GPU facts; `name` is what tables print."""
    info: dict[str, Any] = {"platform": platform.platform(), "cpu": cpu_name(),
                            "cpu_count": os.cpu_count(), "device": device}
    try:
        import torch
        info["torch_threads"] = torch.get_num_threads()
        if device == "cuda" and torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2 ** 30, 1),
                        compute_capability=f"{p.major}.{p.minor}",
                        multiprocessors=p.multi_processor_count, driver=_nvidia_driver(),
                        # PyTorch's defaults, recorded because they set what "fp32" means:
                        # convolutions in TF32 (cuDNN), matmuls in full fp32.
                        tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                        tf32_cudnn=torch.backends.cudnn.allow_tf32)
    except ImportError:
        pass
    info["name"] = info.get("gpu") or f"{info['cpu']} ({info['cpu_count']} cores)"
    info["load_average"] = load_average()
    return info


def load_average() -> list[float] | None:
    """1/5/15-minute load: CPU timings on a shared machine only mean something next to it."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None


def write_json(path: Path, obj: Any) -> Path:
    """Write atomically (temp file + rename): a killed run never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False, default=_json_default) + "\n")
    os.replace(tmp, path)
    return path


def write_text(path: Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table, first column left-aligned, the rest right-aligned."""
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join([":---"] + ["---:"] * (len(headers) - 1)) + "|"]
    lines += ["| " + " | ".join("" if c is None else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _rss_bytes() -> int | None:
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples this process's resident memory in a thread while the block runs (Linux);
    `peak` stays None where /proc is unavailable."""

    def __init__(self, period_s: float = RSS_SAMPLE_S):
        self.period_s = period_s
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        rss = _rss_bytes()
        if rss is not None:
            self.peak = rss if self.peak is None else max(self.peak, rss)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self._sample()

    def __enter__(self) -> "PeakRSS":
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
