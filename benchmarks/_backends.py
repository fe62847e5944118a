"""The benchmark backends by name, and the timing loop they all share."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from ._common import PeakRSS, summarize


@dataclass(frozen=True)
class Backend:
    name: str        # what --backends and the tables call it
    kind: str        # "eager" | "compiled" (PyTorch), "ort" (onnxruntime), "trt" (TensorRT)
    precision: str   # "fp32" | "fp16" | "bf16" | "int8" | "fp8": weights and activations
    gpu_only: bool   # refused with --device cpu
    label: str       # table column header


BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("eager", "eager", "fp32", False, "PyTorch fp32"),
    Backend("eager-fp16", "eager", "fp16", True, "PyTorch fp16"),
    Backend("eager-bf16", "eager", "bf16", True, "PyTorch bf16"),
    Backend("compiled", "compiled", "fp32", False, "compiled fp32"),
    Backend("compiled-fp16", "compiled", "fp16", True, "compiled fp16"),
    Backend("compiled-bf16", "compiled", "bf16", True, "compiled bf16"),
    Backend("ort", "ort", "fp32", False, "onnxruntime fp32"),
    # fp16 graphs also run on onnxruntime's CPU provider (slowly): gpu_check's dry run uses it.
    Backend("ort-fp16", "ort", "fp16", False, "onnxruntime fp16"),
    Backend("trt", "trt", "fp16", True, "TensorRT fp16"),
    # 8-bit Q/DQ graphs (the default quantized set, export/options.py). onnxruntime runs them
    # on the CPU as simulations, slower than fp32; they are a GPU lever (TensorRT).
    Backend("ort-int8", "ort", "int8", False, "onnxruntime int8 Q/DQ"),
    Backend("ort-fp8", "ort", "fp8", False, "onnxruntime fp8 Q/DQ"),
    Backend("trt-int8", "trt", "int8", True, "TensorRT int8"),
    Backend("trt-fp8", "trt", "fp8", True, "TensorRT fp8"),
)}
BASELINE = "eager"  # every ratio is against PyTorch eager fp32 measured in the same run


def parse_backends(text: str, device: str) -> list[Backend]:
    """'eager,ort' -> Backends; ValueError naming unknown names or GPU-only ones on a CPU."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or not names:
        raise ValueError(f"unknown backends {unknown or [text]}; known: {', '.join(BACKENDS)}")
    gpu_only = [n for n in names if BACKENDS[n].gpu_only and device != "cuda"]
    if gpu_only:
        raise ValueError(f"backends {gpu_only} need --device cuda (half precision and TensorRT "
                         f"are GPU backends)")
    if len(set(names)) != len(names):
        raise ValueError(f"backend listed twice in {text!r}")
    return [BACKENDS[n] for n in names]


@dataclass(frozen=True)
class TimingPlan:
    warmup: int       # untimed calls first (compilation, allocator and autotuning warm-up)
    runs: int         # timed calls asked for
    budget_s: float   # stop taking samples once a measurement has run this long (>= 1 sample)
    cuda: bool        # time with CUDA events (GPU work) instead of the host clock


class CudaMemory:
    """Peak GPU memory of one backend during a measurement.

    PyTorch backends: the allocator's peak above what was allocated when the measurement
    started (activations and workspaces), plus the backend's own weights (`own_bytes`); other
    backends' models resident in the process (the fp32 model beside an fp16 copy) are left out.
    Other backends: device-wide used memory (cudaMemGetInfo) after the runs minus before, which
    leaves out the weights their sessions loaded earlier."""

    def __init__(self, torch_allocator: bool, own_bytes: int = 0):
        import torch
        self.torch, self.torch_allocator, self.own_bytes = torch, torch_allocator, own_bytes
        self.before = 0

    def start(self) -> None:
        torch = self.torch
        torch.cuda.synchronize()
        if self.torch_allocator:
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        else:
            free, total = torch.cuda.mem_get_info()
            self.before = total - free

    def peak(self) -> int:
        torch = self.torch
        torch.cuda.synchronize()
        if self.torch_allocator:
            return int(torch.cuda.max_memory_allocated() - self.before + self.own_bytes)
        free, total = torch.cuda.mem_get_info()
        return int(total - free - self.before)


def _cuda_timer() -> Callable[[Callable[[], Any]], float]:
    import torch
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def timed(fn: Callable[[], Any]) -> float:
        torch.cuda.synchronize()  # the GPU is idle, so launch overhead counts too
        start.record()
        fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))
    return timed


def _host_timer(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def measure(fn: Callable[[], Any], plan: TimingPlan,
            gpu_memory: CudaMemory | None = None) -> dict[str, Any]:
    """Warm up, then time `plan.runs` calls of `fn`: every sample, its statistics, the first
    call's time (compilation shows up there) and peak host/GPU memory."""
    timer = _cuda_timer() if plan.cuda else _host_timer
    with PeakRSS() as rss:
        if gpu_memory is not None:
            gpu_memory.start()
        first_ms = None
        for i in range(plan.warmup):
            ms = timer(fn)
            first_ms = ms if i == 0 else first_ms
        samples: list[float] = []
        t0 = time.perf_counter()
        while len(samples) < plan.runs:
            samples.append(timer(fn))
            if time.perf_counter() - t0 > plan.budget_s:
                break
        gpu_peak = gpu_memory.peak() if gpu_memory is not None else None
    return {"samples_ms": samples, **summarize(samples), "first_call_ms": first_ms,
            "runs_asked": plan.runs, "truncated": len(samples) < plan.runs,
            "peak_host_rss_bytes": rss.peak, "peak_gpu_bytes": gpu_peak}
