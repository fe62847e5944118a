"""Latency of each SODiff component and of the whole pipeline on every available backend.

    python benchmarks/latency.py --preset sd21 --random-weights --size 512 --batch 1 \
        --backends eager,ort --warmup 1 --runs 3
    python benchmarks/latency.py --preset tiny --random-weights --size 64,128 --batch 1,4

Writes `<out>/<name>.json` (machine, versions, every sample) and `<out>/<name>.md`; the JSON is
rewritten after every measurement, so a run killed by a time limit keeps what it measured.
"""
from __future__ import annotations

import gc
import shlex
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `sodiff` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click  # noqa: E402

from runtime.cliopts import CONTEXT_SETTINGS, version_option  # noqa: E402
from benchmarks import _common as C  # noqa: E402
from benchmarks._backends import (BACKENDS, Backend, TimingPlan, measure,  # noqa: E402
                                  parse_backends)
from benchmarks._report import enrich, render  # noqa: E402

CPU_DEFAULTS = {"warmup": 1, "runs": 3, "backends": "eager,ort"}
GPU_DEFAULTS = {"warmup": 3, "runs": 10, "backends": "eager,eager-fp16,compiled-fp16"}


@dataclass(frozen=True)
class LatencySettings:
    preset: str | None            # architecture to time (with random_weights or base)
    random_weights: bool          # no weights needed: the cost is the architecture's
    checkpoint: Path | None       # time a checkpoint instead (LoRA merged)
    base: Path | None             # local SD2.1-base folder, for checkpoints/presets needing it
    engine: Path | None           # engine dir for the onnxruntime/TensorRT columns
    sizes: tuple[tuple[int, int], ...]  # image sizes (H, W) the components see
    batches: tuple[int, ...]      # batch sizes
    backends: tuple[str, ...]     # names from _backends.BACKENDS, in the order they run
    device: str                   # "cpu" | "cuda"
    warmup: int                   # untimed calls per measurement
    runs: int                     # timed calls per measurement
    budget_s: float               # per measurement: stop sampling after this long (>= 1 run)
    modules: tuple[str, ...]      # components (+ "pipeline") to time
    compile: tuple[str, ...]      # components torch.compile wraps in the compiled backends
    flops: bool                   # count FLOPs per component (meta tensors, no compute)
    threads: int | None           # CPU threads for PyTorch and onnxruntime (None: default)
    onnx_dir: Path | None         # where ONNX graphs are exported when no --engine is given
    out: Path                     # results folder
    name: str                     # file stem of the JSON and markdown
    channels_last: bool = False   # PyTorch columns: NHWC weights and inputs (faster convs on
    #                               tensor cores; the compiled GPU column uses it)


def validate_settings(s: LatencySettings) -> None:
    """Raise ValueError naming every bad or conflicting value."""
    problems = []
    sources = [x for x in (s.preset, s.checkpoint) if x is not None]
    if len(sources) > 1:
        problems.append("give either --preset or --checkpoint, not both")
    if not sources and s.engine is None:
        problems.append("nothing to time: give --preset NAME --random-weights, --checkpoint DIR "
                        "or --engine DIR")
    if s.random_weights and s.checkpoint is not None:
        problems.append("--random-weights applies to --preset, not to --checkpoint")
    if s.preset is not None and not s.random_weights and s.base is None:
        problems.append(f"--preset {s.preset} needs --random-weights (time the architecture) "
                        f"or --base DIR (a local SD2.1-base folder)")
    if s.warmup < 0 or s.runs < 1 or s.budget_s <= 0:
        problems.append(f"need --warmup >= 0, --runs >= 1, --budget > 0 (got {s.warmup}, "
                        f"{s.runs}, {s.budget_s})")
    bad = [m for m in s.modules if m not in C.MODULES]
    if bad:
        problems.append(f"unknown modules {bad}; choose from {', '.join(C.MODULES)}")
    bad = [m for m in s.compile if m not in C.COMPONENTS]
    if bad:
        problems.append(f"--compile {bad}: choose from {', '.join(C.COMPONENTS)}")
    if s.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            problems.append("--device cuda but no CUDA GPU is visible to PyTorch")
    try:
        parse_backends(",".join(s.backends), s.device)
    except ValueError as e:
        problems.append(str(e))
    if problems:
        raise ValueError("; ".join(problems))


def _model_source(s: LatencySettings):
    from benchmarks._torch_bench import ModelSource
    from sodiff.config import ModelConfig
    config = None
    if s.preset is None and s.checkpoint is None:  # only an engine dir: its manifest's config
        from benchmarks._engine_bench import read_manifest
        config = ModelConfig.from_dict(read_manifest(s.engine)["model_config"])
    return ModelSource(s.preset, s.random_weights, s.checkpoint, s.base, config)


def _new_doc(s: LatencySettings, command: str, description: str, cfg) -> dict[str, Any]:
    from benchmarks._torch_bench import param_counts
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(s).items()}
    return {"kind": "sodiff-latency", "created": C.now_utc(), "command": command,
            "machine": C.machine_info(s.device), "versions": C.versions(),
            "model": {"description": description, "preset": cfg.name,
                      "params": param_counts(cfg), "pad_multiple": cfg.pad_multiple},
            "settings": settings, "flops": {}, "measurements": [], "errors": []}


def _save(doc: dict[str, Any], s: LatencySettings) -> None:
    C.write_json(s.out / f"{s.name}.json", doc)
    C.write_text(s.out / f"{s.name}.md", render(doc))


def _runner(backend: Backend, s: LatencySettings, model, cfg):
    """The object that times `backend`: a TorchRunner, or an EngineRunner over an engine dir."""
    if backend.kind in ("eager", "compiled"):
        from benchmarks._torch_bench import TorchRunner
        return TorchRunner(model, backend.kind, backend.precision, s.device, s.compile,
                           s.channels_last)
    from benchmarks._engine_bench import EngineRunner
    from benchmarks._engines import engine_dir_for
    return EngineRunner(engine_dir_for(backend, s, cfg), backend.kind, s.device, s.threads)


def _time_backend(backend: Backend, runner, s: LatencySettings, cfg, doc, progress) -> None:
    import torch
    from benchmarks._backends import CudaMemory
    from benchmarks._engine_bench import numpy_inputs
    from benchmarks._torch_bench import DTYPES, make_inputs
    plan = TimingPlan(s.warmup, s.runs, s.budget_s, s.device == "cuda")
    torch_side = backend.kind in ("eager", "compiled")
    for (h, w) in s.sizes:
        for b in s.batches:
            dtype = DTYPES[backend.precision] if torch_side else torch.float32
            inputs = make_inputs(cfg, h, w, b, s.device if torch_side else "cpu", dtype)
            if not torch_side:
                inputs = numpy_inputs(inputs)
            for module in s.modules:
                progress.update(1)
                if not runner.measured(module):
                    continue
                progress.set_postfix_str(f"{backend.name} {h}x{w} b{b} {module}")
                mem = (CudaMemory(torch_side, getattr(runner, "weight_bytes", 0))
                       if s.device == "cuda" else None)
                try:
                    rec = measure(runner.callable(module, inputs), plan, mem)
                except Exception as e:  # noqa: BLE001 - OOM, a shape an engine refuses...
                    doc["errors"].append({"backend": backend.name, "size": [h, w], "batch": b,
                                          "module": module, "error": _one_line(e)})
                    _free(s.device)
                    continue
                rec.update(backend=backend.name, kind=backend.kind,
                           precision=backend.precision, device=s.device, size=[h, w],
                           batch=b, module=module)
                flops = doc["flops"].get(f"{h}x{w}", {}).get(module)
                doc["measurements"].append(enrich(rec, flops, doc["machine"]))
                _save(doc, s)
                if progress.disable:  # a log file instead of a bar: one line per measurement
                    print(f"{backend.name} {h}x{w} b{b} {module}: median "
                          f"{rec['median_ms']:.2f} ms, p90 {rec['p90_ms']:.2f} ms, first call "
                          f"{rec['first_call_ms'] or 0:.0f} ms", file=sys.stderr, flush=True)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        import torch
        torch.cuda.empty_cache()


def run_latency(s: LatencySettings, command: str = "") -> dict[str, Any]:
    """Run every measurement of `s`, writing the JSON/markdown as it goes; returns the doc."""
    import torch
    from tqdm import tqdm
    from benchmarks._torch_bench import build_model, check_size, count_flops, model_config
    validate_settings(s)
    if s.threads:
        torch.set_num_threads(s.threads)
    src = _model_source(s)
    cfg = model_config(src)
    for h, w in s.sizes:
        check_size(cfg, h, w)
    doc = _new_doc(s, command, src.describe() if s.preset or s.checkpoint else
                   f"engine {s.engine} (PyTorch columns: its architecture, random weights)", cfg)
    if s.flops:
        for h, w in s.sizes:
            doc["flops"][f"{h}x{w}"] = count_flops(cfg, h, w)
    _save(doc, s)
    backends = parse_backends(",".join(s.backends), s.device)
    # The PyTorch model is freed after the last PyTorch backend: exports and onnxruntime
    # sessions of sd21 need that memory on a small machine.
    last_torch = max((i for i, b in enumerate(backends) if b.kind in ("eager", "compiled")),
                     default=-1)
    model = build_model(src, s.device) if last_torch >= 0 else None
    total = len(s.backends) * len(s.sizes) * len(s.batches) * len(s.modules)
    with tqdm(total=total, desc="latency", unit="meas", file=sys.stderr,
              disable=None) as progress:  # None: no bar when stderr is a log file
        for i, backend in enumerate(backends):
            if i == last_torch + 1:
                model = None
                _free(s.device)
            try:
                runner = _runner(backend, s, model, cfg)
            except Exception as e:  # noqa: BLE001 - a backend this machine cannot run
                doc["errors"].append({"backend": backend.name, "error": _one_line(e)})
                progress.update(len(s.sizes) * len(s.batches) * len(s.modules))
                _save(doc, s)
                continue
            try:
                _time_backend(backend, runner, s, cfg, doc, progress)
            finally:
                if hasattr(runner, "close"):
                    runner.close()
            del runner
            if backend.kind == "compiled":
                torch._dynamo.reset()
            _free(s.device)
    doc["machine"]["load_average_end"] = C.load_average()
    _save(doc, s)
    return doc


def _settings_from_cli(kw: dict[str, Any]) -> LatencySettings:
    import torch
    device = kw["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    d = GPU_DEFAULTS if device == "cuda" else CPU_DEFAULTS
    backends = kw["backends"] or d["backends"]
    modules = C.MODULES if kw["modules"] == "all" else tuple(
        m.strip() for m in kw["modules"].split(",") if m.strip())
    source = kw["preset"] or next((p.name for p in (kw["checkpoint"], kw["engine"]) if p), "x")
    name = kw["name"] or f"latency_{source}_{device}"
    return LatencySettings(
        preset=kw["preset"], random_weights=kw["random_weights"], checkpoint=kw["checkpoint"],
        base=kw["base"], engine=kw["engine"], sizes=tuple(C.parse_sizes(kw["size"])),
        batches=tuple(C.parse_int_list(kw["batch"], "--batch")),
        backends=tuple(b.strip() for b in backends.split(",") if b.strip()), device=device,
        warmup=d["warmup"] if kw["warmup"] is None else kw["warmup"],
        runs=d["runs"] if kw["runs"] is None else kw["runs"], budget_s=kw["budget"],
        modules=modules, compile=tuple(c.strip() for c in kw["compile"].split(",") if c.strip()),
        flops=kw["flops"], threads=kw["threads"], onnx_dir=kw["onnx_dir"], out=kw["out"],
        name=name, channels_last=kw["channels_last"])


_path = click.Path(path_type=Path)


@version_option()
@click.command(context_settings=CONTEXT_SETTINGS)
@click.option("--preset", help="Architecture preset (sd21, tiny); with --random-weights.")
@click.option("--random-weights", is_flag=True, help="Time the architecture without weights.")
@click.option("--checkpoint", type=_path, help="A SODiff checkpoint folder to time.")
@click.option("--base", type=_path, help="Local SD2.1-base folder (external-base checkpoints).")
@click.option("--engine", type=_path, help="Engine dir for the onnxruntime/TensorRT columns.")
@click.option("--size", default="512", show_default=True, help="Sizes: 512,768x512 (HxW).")
@click.option("--batch", default="1", show_default=True, help="Batch sizes: 1,8.")
@click.option("--backends", help="Comma list of " + ", ".join(BACKENDS) + f" [CPU: "
              f"{CPU_DEFAULTS['backends']}; GPU: {GPU_DEFAULTS['backends']}]")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True)
@click.option("--warmup", type=int, help="Untimed calls [CPU 1, GPU 3].")
@click.option("--runs", type=int, help="Timed calls [CPU 3, GPU 10].")
@click.option("--budget", type=float, default=300.0, show_default=True,
              help="Seconds per measurement after which sampling stops (>= 1 run).")
@click.option("--modules", default="all", show_default=True,
              help="Components and/or 'pipeline' to time.")
@click.option("--compile", "compile_", default="unet", show_default=True,
              help="Components the compiled backends wrap in torch.compile.")
@click.option("--channels-last", is_flag=True,
              help="PyTorch columns: channels-last (NHWC) weights and inputs.")
@click.option("--flops/--no-flops", default=True, show_default=True)
@click.option("--threads", type=int, help="CPU threads for PyTorch and onnxruntime.")
@click.option("--onnx-dir", type=_path, help="Keep exported ONNX graphs here (else a temp dir).")
@click.option("--out", type=_path, default=C.RESULTS_DIR, show_default=True)
@click.option("--name", help="File stem [latency_<preset|checkpoint|engine name>_<device>].")
def main(**kw: Any) -> None:
    """Time SODiff's components and pipeline per backend; write JSON + markdown tables."""
    kw["compile"] = kw.pop("compile_")
    command = "python benchmarks/latency.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:
        s = _settings_from_cli(kw)
        doc = run_latency(s, command)
    except (ValueError, FileNotFoundError) as e:  # bad options, missing folders
        raise click.ClickException(str(e)) from None
    click.echo(render(doc))
    click.echo(f"wrote {s.out / s.name}.json and .md", err=True)


if __name__ == "__main__":
    main()
