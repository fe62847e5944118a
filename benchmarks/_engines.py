"""Engine dirs for the onnxruntime and TensorRT columns: the one given with --engine (checked
against the backend asked for), or one exported for this run with the export library
(`export.pipeline.run_export`, the code behind `sodiff-export`)."""
from __future__ import annotations

import atexit
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from ._backends import Backend
from ._engine_bench import read_manifest

_TEMP_DIRS: list[Path] = []


def _cleanup_temp() -> None:
    for d in _TEMP_DIRS:
        shutil.rmtree(d, ignore_errors=True)


atexit.register(_cleanup_temp)


def check_engine(engine_dir: Path, backend: Backend) -> None:
    """ValueError unless `engine_dir` holds components of `backend`'s kind and precision."""
    comps = read_manifest(engine_dir)["components"]
    want = "trt" if backend.kind == "trt" else "onnx"
    found = {(c.get("backend"), c.get("precision")) for c in comps.values()}
    if (want, backend.precision) not in found:
        raise ValueError(f"engine dir {engine_dir} holds {sorted(found)} (backend, precision) "
                         f"components, not {want} {backend.precision} for backend "
                         f"{backend.name}")


def export_options(backend: Backend, s: Any, out: Path) -> Any:
    """The ExportOptions that cover every size and batch of the latency settings `s`:
    static for one size, else a dynamic range with the first size as the optimum."""
    from export.options import ExportOptions
    hs, ws = [h for h, _ in s.sizes], [w for _, w in s.sizes]
    lo, hi = (min(hs), min(ws)), (max(hs), max(ws))
    one_size = len(set(s.sizes)) == 1
    return ExportOptions(
        out=out, target="trt" if backend.kind == "trt" else "onnx",
        checkpoint=s.checkpoint, base=s.base if s.checkpoint else None,
        preset=s.preset if s.checkpoint is None else None,
        random_weights=s.checkpoint is None, precision=backend.precision,
        shape=s.sizes[0] if one_size else None,
        dynamic=None if one_size else (lo, s.sizes[0], hi),
        batch=(min(s.batches), s.batches[0], max(s.batches)), samples=1,
        # 8-bit latency runs: few calibration crops (the export's PyTorch pipeline runs on the
        # CPU), and random weights have no quality to hold, so their loss is kept (--force).
        calibration_count=8, force=backend.precision in ("int8", "fp8") and s.checkpoint is None)


def engine_dir_for(backend: Backend, s: Any, cfg: Any) -> Path:
    """An engine dir for `backend`: --engine, else a fresh export (kept in --onnx-dir, where
    unchanged components are reused, or in a temporary folder removed at exit)."""
    if s.engine is not None:
        check_engine(s.engine, backend)
        return Path(s.engine)
    if s.checkpoint is None and not s.random_weights:
        raise ValueError(f"{backend.name}: exporting needs --checkpoint DIR or --preset NAME "
                         f"--random-weights (or pass an exported --engine DIR)")
    from export.pipeline import run_export
    if s.onnx_dir is not None:
        root = Path(s.onnx_dir)
    else:
        root = Path(tempfile.mkdtemp(prefix="sodiff-bench-"))
        _TEMP_DIRS.append(root)
    out = root / f"{cfg.name}-{backend.kind}-{backend.precision}"
    run_export(export_options(backend, s, out),
               log=lambda m: print(f"  [export] {m}", file=sys.stderr, flush=True))
    return out
