"""TensorRT engines from the ONNX graphs, through polygraphy's TensorRT loaders (TensorRT's
Python API underneath; no shelling out). tensorrt is imported lazily: this module imports on
machines without it, and `targets` refuses `--target trt` there before anything is written."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

TIMING_CACHE = "timing.cache"


def trt_version() -> str:
    import tensorrt as trt
    return trt.__version__


def version_tuple(version: str) -> tuple[int, int]:
    parts = version.split(".")
    return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0


def compute_capability() -> tuple[int, int]:
    """(major, minor) of the current CUDA device: an engine only runs on the same kind."""
    import torch
    return torch.cuda.get_device_capability()


def engine_file_name(component: str, version: str, cc: tuple[int, int]) -> str:
    """`unet.trt10.3.0.sm90.plan`: the TensorRT version and GPU in the name (engine-dir.md)."""
    return f"{component}.trt{version}.sm{cc[0]}{cc[1]}.plan"


def build_engine(onnx_path: Path, engine_path: Path, fp16: bool,
                 profile: dict[str, dict[str, list[int]]], timing_cache: Path) -> None:
    """Parse `onnx_path`, build with one optimization profile (and FP16 when asked), reuse and
    extend `timing_cache`, and write the engine atomically to `engine_path`."""
    from polygraphy.backend.trt import (CreateConfig, Profile, engine_bytes_from_network,
                                        network_from_onnx_path)

    prof = Profile()
    for name, shapes in profile.items():
        prof.add(name, min=shapes["min"], opt=shapes["opt"], max=shapes["max"])
    config = CreateConfig(fp16=fp16, profiles=[prof],
                          load_timing_cache=str(timing_cache) if timing_cache.is_file() else None)
    # The parser owns the weights while the network is built: keep the tuple alive.
    network = network_from_onnx_path(str(onnx_path))
    data = engine_bytes_from_network(network, config=config, save_timing_cache=str(timing_cache))
    tmp = engine_path.with_name(f".{engine_path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(bytes(data))
    os.replace(tmp, engine_path)


def run_engine(engine_path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run an engine once on host arrays (tests and checks; the runtime has its own path)."""
    from polygraphy.backend.common import bytes_from_path
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    with TrtRunner(EngineFromBytes(bytes_from_path(str(engine_path)))) as runner:
        out = runner.infer(feed_dict=feeds)
    return {k: np.asarray(v) for k, v in out.items()}
