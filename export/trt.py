"""TensorRT engines from the ONNX graphs, on TensorRT's own Python API (10.12+ and 11.x).

Networks are strongly typed: the ONNX graph's dtypes are the engine's precisions (an fp16
component is a half graph with float32 islands, see islands.py). No precision builder flag is
ever set -- TensorRT 11 removed them with weak typing -- except TF32, which lets float32
components use tensor cores. tensorrt is imported lazily: this module imports on machines
without it, and `targets` refuses `--target trt` there before anything is written.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

TIMING_CACHE = "timing.cache"
MIN_VERSION = (10, 12)     # the first release where strongly typed builds are the documented way
MAX_MAJOR = 11             # the newest major release whose API this module follows
MIN_FP16_CC = (5, 3)       # GPUs before sm_53 have no float16 arithmetic
MIN_INT8_CC = (7, 5)       # INT8 tensor cores: Turing and newer
MIN_FP8_CC = (8, 9)        # FP8 tensor cores: Ada (sm_89) and Hopper (sm_90) and newer


class TrtBuildError(RuntimeError):
    """The parser or builder refused a graph; the message names what TensorRT said."""


def trt_version() -> str:
    import tensorrt as trt
    return trt.__version__


def version_tuple(version: str) -> tuple[int, int]:
    parts = version.split(".")
    return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0


def version_problem(version: str) -> str | None:
    """Why this TensorRT cannot build our engines, or None."""
    try:
        v = version_tuple(version)
    except ValueError:
        return f"TensorRT reports an unreadable version {version!r}"
    if v < MIN_VERSION or v[0] > MAX_MAJOR:
        return (f"TensorRT {version} is installed; sodiff-export needs TensorRT "
                f"{MIN_VERSION[0]}.{MIN_VERSION[1]} or newer and older than {MAX_MAJOR + 1} "
                f"(strongly typed networks): pip install 'tensorrt>=10.12,<12'")
    return None


def check_build(precisions: dict[str, str]) -> tuple[str, tuple[int, int]]:
    """(TensorRT version, GPU compute capability), refusing before any export what they
    cannot build: a TensorRT outside 10.12..11.x, or a precision the GPU lacks."""
    from .errors import OptionError, PrerequisiteError
    version, cc = trt_version(), compute_capability()
    if (problem := version_problem(version)) is not None:
        raise PrerequisiteError(f"{problem}; nothing was written")
    for prec, need, what in (("fp16", MIN_FP16_CC, "float16 arithmetic"),
                             ("int8", MIN_INT8_CC, "INT8 tensor cores"),
                             ("fp8", MIN_FP8_CC, "FP8 tensor cores (Ada or Hopper)")):
        names = sorted(n for n, p in precisions.items() if p == prec)
        if names and tuple(cc) < need:
            raise OptionError(f"--precision {prec} ({', '.join(names)}): this GPU (compute "
                              f"capability {cc[0]}.{cc[1]}) has no {what}; use --precision "
                              f"fp16 or fp32")
    return version, tuple(cc)


def compute_capability() -> tuple[int, int]:
    """(major, minor) of the current CUDA device: an engine only runs on the same kind."""
    import torch
    return torch.cuda.get_device_capability()


def engine_file_name(component: str, version: str, cc: tuple[int, int]) -> str:
    """`unet.trt10.12.0.sm90.plan`: the TensorRT version and GPU in the name (engine-dir.md)."""
    return f"{component}.trt{version}.sm{cc[0]}{cc[1]}.plan"


def _network(trt, builder):
    """A strongly typed network: TensorRT 11 always is one (its creation flag is deprecated and
    ignored); 10.x needs the flag."""
    if version_tuple(trt.__version__)[0] >= 11:
        return builder.create_network(0)
    return builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def build_engine(onnx_path: Path, engine_path: Path, precision: str,
                 profile: dict[str, dict[str, list[int]]], timing_cache: Path) -> dict:
    """Parse `onnx_path` strongly typed, build with one optimization profile (TF32 on for fp32
    components), reuse and extend `timing_cache`, write the engine atomically. Returns the
    manifest's build record."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = _network(trt, builder)
    parser = trt.OnnxParser(network, logger)  # owns the weights until the build is done
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TrtBuildError(f"the ONNX parser refused {onnx_path.name}: {errors or 'no reason'}")
    config = builder.create_builder_config()
    tf32 = precision == "fp32"
    if tf32:
        config.set_flag(trt.BuilderFlag.TF32)
    prof = builder.create_optimization_profile()
    for name, shapes in profile.items():
        prof.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(prof)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file()
                                       else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    data = builder.build_serialized_network(network, config)
    if data is None:
        raise TrtBuildError(f"TensorRT could not build {onnx_path.name} (its messages are "
                            f"above)")
    _atomic_write(timing_cache, bytes(config.get_timing_cache().serialize()))
    _atomic_write(engine_path, bytes(data))
    return {"strongly_typed": True, "tf32": tf32}


def run_engine(engine_path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run an engine once on host arrays, through CUDA tensors of PyTorch (export's parity
    check on the engine itself; the runtime has its own path)."""
    import tensorrt as trt
    import torch

    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(
        engine_path.read_bytes())
    if engine is None:
        raise TrtBuildError(f"TensorRT cannot deserialize the engine it just built "
                            f"({engine_path.name})")
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    keep = {}
    for name in names:
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            keep[name] = torch.from_numpy(np.ascontiguousarray(feeds[name], dtype)).cuda()
            context.set_input_shape(name, tuple(keep[name].shape))
            context.set_tensor_address(name, keep[name].data_ptr())
    outputs = {}
    for name in names:
        if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            t = torch.empty(tuple(context.get_tensor_shape(name)),
                            dtype=torch.from_numpy(np.zeros(0, dtype)).dtype, device="cuda")
            outputs[name] = t
            context.set_tensor_address(name, t.data_ptr())
    stream = torch.cuda.current_stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise TrtBuildError(f"TensorRT failed running {engine_path.name}")
    stream.synchronize()
    return {k: v.cpu().numpy() for k, v in outputs.items()}
