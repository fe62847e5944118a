"""One component to a clean ONNX file: trace (TorchScript exporter), clean up, check its I/O."""
from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from .cleanup import cleanup
from .errors import ComponentExportError
from .specs import ComponentSpec

_ONNX_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16"}


def sample_args(spec: ComponentSpec, precision: str, dims: dict[str, int],
                generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Tracing inputs: the spec's shapes at `dims`, in the graph's I/O dtypes. Values only
    need to be plausible (timesteps inside the schedule, images in [-1, 1])."""
    args = []
    for t in spec.inputs:
        shape = t.concrete(dims)
        if t.name == "timestep":
            x = torch.rand(shape, generator=generator) * 999
        elif t.name == "image":
            x = torch.rand(shape, generator=generator) * 2 - 1
        else:
            x = torch.randn(shape, generator=generator)
        args.append(x.to(getattr(torch, t.dtype(precision))))
    return tuple(args)


def trace(module: nn.Module, args: tuple[torch.Tensor, ...], spec: ComponentSpec, path: Path,
          opset: int) -> None:
    """torch.onnx.export with the TorchScript exporter (dynamo=False)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python-level shape checks
        torch.onnx.export(module, args, str(path), input_names=spec.input_names,
                          output_names=spec.output_names, dynamic_axes=spec.dynamic_axes(),
                          opset_version=opset, do_constant_folding=True, dynamo=False)


def check_io(path: Path, spec: ComponentSpec, precision: str) -> None:
    """The cleaned graph's inputs and outputs must be exactly the spec's (names, dtypes)."""
    g = onnx.load(str(path), load_external_data=False).graph
    found = [(v.name, _ONNX_DTYPES.get(v.type.tensor_type.elem_type, "other"))
             for v in (*g.input, *g.output)]
    want = [(t.name, t.dtype(precision)) for t in (*spec.inputs, *spec.outputs)]
    if found != want:
        raise ComponentExportError(spec.name, "I/O check", f"graph I/O {found} differs from "
                                   f"the design's {want}")


def trace_component(module: nn.Module, spec: ComponentSpec, precision: str,
                    dims: dict[str, int], opset: int, work: Path, seed: int = 0) -> Path:
    """Trace `module` into a fresh folder under `work` (torch writes one file per tensor beside
    a graph over 2 GB); returns the raw graph's path. Typed error on failure, nothing left."""
    gen = torch.Generator().manual_seed(seed)
    args = sample_args(spec, precision, dims, gen)
    raw_dir = Path(tempfile.mkdtemp(prefix=f".raw-{spec.name}-", dir=work))
    try:
        trace(module, args, spec, raw_dir / f"{spec.name}.onnx", opset)
    except Exception as e:  # noqa: BLE001 - any tracer/exporter failure, reported typed
        shutil.rmtree(raw_dir, ignore_errors=True)
        raise ComponentExportError(spec.name, "ONNX export", f"{type(e).__name__}: {e}") from e
    return raw_dir / f"{spec.name}.onnx"


def name_io_dims(path: Path, spec: ComponentSpec) -> None:
    """Give the graph's inputs and outputs the spec's dims: its symbols (B, H, W, h, w) where
    shape inference wrote expressions such as `floor(H/2 - 1/2) + 1`, so a plain
    InferenceSession user sees the manifest's shapes. Weights stay where they are."""
    model = onnx.load(str(path), load_external_data=False)
    by_name = {t.name: t for t in (*spec.inputs, *spec.outputs)}
    for v in (*model.graph.input, *model.graph.output):
        dims = v.type.tensor_type.shape.dim
        want = by_name[v.name].shape if v.name in by_name else None
        if want is None or len(dims) != len(want):
            continue  # check_io reports a mismatch
        for d, w in zip(dims, want):
            if isinstance(w, str):
                d.dim_param = w
            else:
                d.dim_value = w
    onnx.save_model(model, str(path))


def finish_component(raw: Path, spec: ComponentSpec, precision: str, dst: Path) -> dict:
    """Clean up the raw graph into `dst` (plus `dst.data` over 2 GB) and check its I/O; the raw
    folder is removed either way, and nothing is left at `dst` if a stage fails. Returns the
    clean-up counts."""
    try:
        try:
            stats = cleanup(raw, dst)
        except Exception as e:  # noqa: BLE001
            raise ComponentExportError(spec.name, "clean-up", f"{type(e).__name__}: {e}") from e
        name_io_dims(dst, spec)
        check_io(dst, spec, precision)
        return stats
    except BaseException:
        dst.unlink(missing_ok=True)
        Path(f"{dst}.data").unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(raw.parent, ignore_errors=True)
