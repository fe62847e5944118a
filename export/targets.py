"""The one table of export targets: it drives option validation, aliases and "did you mean"."""
from __future__ import annotations

import difflib
import importlib.util
from dataclasses import dataclass
from typing import Callable

from .errors import OptionError


def _onnxruntime_missing() -> str | None:
    if importlib.util.find_spec("onnxruntime") is None:
        return "onnxruntime is not installed (pip install 'sodiff[export]')"
    return None


def _tensorrt_missing() -> str | None:
    # Imported lazily: machines without TensorRT must still import this module.
    if importlib.util.find_spec("tensorrt") is None:
        return ("TensorRT is not installed: `--target trt` needs the tensorrt Python package "
                "and an NVIDIA GPU (pip install 'sodiff[trt]' on such a machine); "
                "use `--target onnx` here")
    try:
        import tensorrt
    except Exception as e:  # noqa: BLE001 - a broken install: say what it raised, in one line
        return f"tensorrt does not import ({type(e).__name__}: {str(e).splitlines()[0]})"
    from .trt import version_problem
    if (problem := version_problem(getattr(tensorrt, "__version__", "unknown"))) is not None:
        return problem
    try:
        import torch
        if not torch.cuda.is_available():
            return ("no CUDA GPU is visible: TensorRT builds engines for the GPU it runs on; "
                    "use `--target onnx` here")
    except ImportError:
        return "PyTorch is not installed (pip install 'sodiff[export]')"
    return None


@dataclass(frozen=True)
class Target:
    name: str                        # canonical name, written to the manifest as the backend
    aliases: tuple[str, ...]         # other spellings accepted on the command line
    suffix: str                      # file suffix of a component's model file
    needs_gpu: bool                  # building needs a CUDA GPU
    precisions: tuple[str, ...]      # accepted --precision values
    opsets: tuple[int, int]          # accepted --opset range (inclusive)
    options: frozenset[str]          # target-specific options (refused on other targets)
    lint_blocks: bool                # lint problems abort the export (else only reported)
    prerequisite: Callable[[], str | None]  # None when usable, else why not (one line)
    summary: str                     # one line for --help and the docs


# TorchScript's exporter stops at opset 20; opset 17 is the first with LayerNormalization.
# TensorRT: the project's op facts (docs/architecture.md, "TensorRT's ONNX operator support")
# cover opsets up to 17 plus GroupNormalization from 18 (TensorRT 10), so `trt` accepts 17..18.
# 8-bit components are written at opset 19 whatever --opset says: Q/DQ of float16 and float8
# start there.
TARGETS: tuple[Target, ...] = (
    Target(name="onnx", aliases=("onnxruntime", "ort"), suffix=".onnx", needs_gpu=False,
           precisions=("fp32", "fp16", "int8", "fp8"), opsets=(17, 20), options=frozenset(),
           lint_blocks=False, prerequisite=_onnxruntime_missing,
           summary="ONNX graphs for onnxruntime (any machine)"),
    Target(name="trt", aliases=("tensorrt", "engine", "plan"), suffix=".plan", needs_gpu=True,
           precisions=("fp16", "fp32", "int8", "fp8"), opsets=(17, 18), options=frozenset({"timing_cache"}),
           lint_blocks=True, prerequisite=_tensorrt_missing,
           summary="TensorRT engines built from the ONNX graphs (NVIDIA GPU + TensorRT)"),
)

DEFAULT_OPSET = 17


def all_target_names() -> list[str]:
    return [n for t in TARGETS for n in (t.name, *t.aliases)]


def get_target(name: str) -> Target:
    """The target called `name` (or an alias of it); an OptionError suggests the closest."""
    key = name.strip().lower()
    for t in TARGETS:
        if key == t.name or key in t.aliases:
            return t
    close = difflib.get_close_matches(key, all_target_names(), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise OptionError(f"unknown target {name!r}{hint} (targets: "
                      + ", ".join(f"{t.name} [{', '.join(t.aliases)}]" for t in TARGETS) + ")")


def suggest(name: str, known: list[str] | tuple[str, ...]) -> str:
    """`'; did you mean X?'` for the closest of `known`, or ''."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""
