"""The export, stage by stage: options -> model -> timestep -> reference samples -> ONNX ->
parity -> lint -> TensorRT -> manifest (last). Library entry point: `run_export`."""
from __future__ import annotations

import gc
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import onnx
import torch
from tqdm import tqdm

from sodiff import __version__
from sodiff.model import SODiff

from . import manifest as mf
from . import quantize as qt
from . import trt_ops
from .errors import (ComponentExportError, LintError, ParityError, PrerequisiteError,
                     RuntimeFailure)
from .islands import flagged_islands, outermost
from .lint import lint_file
from .onnx_export import finish_component, trace_component
from .options import ExportOptions
from .parity import check_parity, compare, fp16_safety
from .plan import ExportPlan, resolve_plan
from .samples import (calibrate_tau, folder_digest, load_image, qf_table, reference_run,
                      sample_batches, synthetic_images)
from .source import Loaded, load_model
from .specs import COMPONENTS, QUANTIZED, base_precision, component_specs, dims
from .wrappers import build_wrappers, for_export, fp32_islands

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _timestep(plan: ExportPlan, model: SODiff, real: list, log: Log) -> dict:
    tau = plan.fixed_tau
    if plan.timestep_mode == "calibrated":
        tau = calibrate_tau(model.predictor, real)
        log(f"[timestep] calibrated tau = {tau:.2f} (median over {len(real)} images)")
    table = None
    if not plan.random_weights:  # an untrained predictor's table would be meaningless
        source, images = ("calibration", real) if real else synthetic_images(plan.seed)
        table = qf_table(model.predictor, images, source)
        log(f"[timestep] QF table from {table['images']} {source} images: "
            + ", ".join(f"{q}:{t:.0f}" for q, t in zip(table["qf"], table["tau"])))
    return {"mode": plan.timestep_mode, "value": tau, "t_max": model.cfg.predictor.t_max,
            "qf_table": table}


class _Build:
    """The plan against the loaded model: each component's spec, profile dims and the hash of
    its inputs (what decides whether a previous export's file is reused)."""

    def __init__(self, plan: ExportPlan, loaded: Loaded, timestep: dict,
                 trt_info: tuple[str, tuple[int, int]] | None):
        cfg = loaded.model.cfg
        self.plan, self.names, self.precision = plan, plan.components, plan.precision
        self.specs = component_specs(
            saipe_size=cfg.saipe.image_size, num_queries=cfg.saipe.num_queries,
            prompt_dim=cfg.saipe.prompt_dim, latent_channels=cfg.latent_channels,
            baked_timestep=timestep["mode"] != "predicted")
        lo, opt, hi = plan.sizes
        b, f = plan.batch, cfg.vae_factor
        self.opt_size = opt
        self.dims = (dims(b[0], lo, f), dims(b[1], opt, f), dims(b[2], hi, f))
        self.trace_dims = dims(1, opt, f)
        self.shapes = {"mode": "dynamic" if plan.dynamic else "static", "min": list(lo),
                       "opt": list(opt), "max": list(hi),
                       "batch": {"min": b[0], "opt": b[1], "max": b[2]}}
        self.trt_info = trt_info
        calib = folder_digest(list(plan.calibration_files)) if plan.calibration_files else None
        common = {"exporter": __version__, "torch": torch.__version__,
                  "onnx": onnx.__version__, "weights": loaded.identity, "opset": plan.opset,
                  "target": plan.target.name, "shapes": self.shapes, "samples": plan.samples,
                  "seed": plan.seed, "calibration": calib, "trt": trt_info}
        self._common, self._tau = common, timestep["value"]
        self.quantized = plan.quantized
        self.digests = {n: self.digest(n, self.precision[n]) for n in self.names}
        # Components of this timestep mode that were not asked for: a previous export's
        # entries for them stay in the manifest while still valid.
        self.others = tuple(c for c in plan.mode_components if c not in self.names)

    def digest(self, name: str, precision: str) -> str:
        parts = {**self._common, "component": name, "precision": precision,
                 "tau": self._tau if name == "unet" else None}
        if precision in QUANTIZED:  # only then: fp32/fp16 digests stay those of older exports
            parts["quant"] = {"recipe": qt.RECIPES[precision],
                              "count": self.plan.calibration_count}
        return mf.source_hash(parts)

    def opset(self, name: str) -> int:
        return max(self.plan.opset, qt.QUANT_OPSET) if name in self.quantized else self.plan.opset


def run_export(opts: ExportOptions, log: Log = _stderr) -> Path:
    """Export per `opts`; returns the manifest's path. Raises ExportError subclasses."""
    started = time.perf_counter()
    plan = resolve_plan(opts)
    missing = plan.target.prerequisite()
    if missing:
        raise PrerequisiteError(f"{missing}; nothing was written")
    mf.check_out_dir(plan.out)
    log(f"[model] loading {'random ' + plan.preset if plan.random_weights else 'checkpoint'}")
    loaded = load_model(plan)
    cfg = loaded.model.cfg
    plan = plan.for_model(cfg.pad_multiple, cfg.saipe.image_size)
    trt_info = None
    if plan.target.name == "trt":  # refuses a TensorRT or GPU that cannot build these precisions
        from .trt import check_build
        trt_info = check_build(dict(plan.precision))
    real = [load_image(p) for p in plan.calibration_files]
    timestep = _timestep(plan, loaded.model, real, log)
    build = _Build(plan, loaded, timestep, trt_info)
    out = plan.out
    entries = _reusable_entries(build, None if plan.force else mf.read_manifest(out), out, log)
    todo = [n for n in build.names if n not in entries]
    if any(n in build.quantized for n in todo):
        from .quality import check_whole
        check_whole(set(build.names) | set(entries), plan.mode_components, out)
    out.mkdir(parents=True, exist_ok=True)
    (out / mf.MANIFEST).unlink(missing_ok=True)  # from here on, the folder is unfinished
    work = out / f".raw-quant-{os.getpid()}"  # 8-bit components' float32/float16 twins
    try:
        return _finish_export(build, loaded, timestep, real, todo, entries, work, started, log)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _finish_export(build: _Build, loaded: Loaded, timestep: dict, real: list, todo: list[str],
                   entries: dict, work: Path, started: float, log: Log) -> Path:
    plan, cfg, refs, judge = build.plan, loaded.model.cfg, {}, None
    out = plan.out
    if todo:
        new, refs, judge = _export_onnx(build, loaded, timestep, real, todo, work, log)
        entries.update(new)
    lint = _lint(build, [n for n in COMPONENTS if n in entries], out, log)
    if plan.target.name == "trt":
        _build_engines(build, todo, entries, refs, log)
    for e in entries.values():
        if e["fp16"]["at_risk"]:
            log(f"[fp16] at risk: {e['fp16']['advice']}")
    components = {n: entries[n] for n in COMPONENTS if n in entries}
    manifest = mf.build_manifest(version=__version__, cfg=cfg, random_weights=plan.random_weights,
                                 checkpoint=loaded.checkpoint, timestep=timestep,
                                 shapes=build.shapes, components=components, lint=lint)
    path = mf.write_manifest(out, manifest)
    if judge is not None:
        from .quality import judge_dir
        manifest = judge_dir(manifest, judge, build.quantized, plan.force, out, work, log)
        path = mf.write_manifest(out, manifest)
    from .gate import gate_for_export
    gate = gate_for_export(plan, loaded.checkpoint, out, log)
    if gate is not None:
        path = mf.write_manifest(out, {**manifest, "gate": gate})
    log(f"[done] {out} ({len(components)} components, {time.perf_counter() - started:.1f} s)")
    return path


def _reusable_entries(build: _Build, old: dict | None, out: Path, log: Log) -> dict[str, dict]:
    """A previous export's entries whose inputs are unchanged and files intact: the asked-for
    components (skipped) and the others of this timestep mode (kept in the manifest)."""
    entries = {}
    for n in build.names:
        if (e := mf.reusable(old, n, build.digests[n], out)) is not None:
            entries[n] = e
            log(f"[skip] {n}: inputs unchanged (use --force to rebuild)")
    for n in build.others:
        prec = ((old or {}).get("components", {}).get(n) or {}).get("precision", "")
        if (e := mf.reusable(old, n, build.digest(n, prec), out)) is not None:
            entries[n] = e
            log(f"[keep] {n}: not asked for; the previous export's entry is still valid")
    return entries


def _export_onnx(build: _Build, loaded: Loaded, timestep: dict, real: list, todo: list[str],
                 work: Path, log: Log) -> tuple[dict[str, dict], dict, "qt.Judge | None"]:
    model, cfg, plan, out = loaded.model, loaded.model.cfg, build.plan, build.plan.out
    if cfg.lora is not None and not model.lora_merged:
        model.merge_lora()  # in place: this model instance is the export's own copy
    wrappers = build_wrappers(model, plan.mode_components, timestep["value"])
    t0 = time.perf_counter()
    batches = sample_batches(build.opt_size, plan.samples, real, plan.seed)
    refs = reference_run(wrappers, build.specs, tuple(todo), batches, cfg.saipe.image_size,
                         cfg.predictor.t_max, plan.seed)
    log(f"[samples] {', '.join(f'{s}: {x.shape[0]}' for s, x in batches)} at "
        f"{build.opt_size[0]}x{build.opt_size[1]} ({time.perf_counter() - t0:.1f} s)")
    islands, whole = _fp16_islands(build, wrappers, refs, todo, log)
    quant = [n for n in todo if n in build.quantized]
    cal = feeds = None
    if quant:
        from .calibration import calibration_feeds
        cal, feeds = calibration_feeds(build, wrappers, quant, cfg, log)
    raw, raw32 = {}, {}
    try:
        for n in _bar(todo, "trace"):
            t0, spec, prec = time.perf_counter(), build.specs[n], build.precision[n]
            base, opset = base_precision(prec), build.opset(n)
            flagged = tuple(i for i in islands.get(n, ()) if i not in fp32_islands(wrappers[n]))
            module = for_export(wrappers[n], spec, base, flagged)
            raw[n] = trace_component(module, spec, base, build.trace_dims, opset, out, plan.seed)
            del module
            if n in quant:  # the float32 twin: calibration and the quality reference
                raw32[n] = trace_component(wrappers[n], spec, "fp32", build.trace_dims, opset,
                                           out, plan.seed)
            _log_above_bar(log, f"[trace] {n} ({prec}, opset {opset}) "
                                f"({time.perf_counter() - t0:.1f} s)")
        # Free PyTorch's model before clean-up and onnxruntime load the (many-GB) graphs.
        del wrappers, model, loaded.model
        gc.collect()
        stats, judge = {}, qt.Judge({}, cal.held_out if cal else [], {})
        for n in _bar(todo, "clean-up"):
            t0 = time.perf_counter()
            spec, prec = build.specs[n], build.precision[n]
            stats[n] = finish_component(raw[n], spec, base_precision(prec),
                                        out / f"{n}.onnx" if n not in quant else
                                        qt.twin(work, n, "fp16"))
            del raw[n]
            if n in quant:
                finish_component(raw32[n], spec, "fp32", qt.twin(work, n, "fp32"))
                del raw32[n]
                stats[n]["external_data"] = None
                judge.recipes[n] = qt.quantize_twins(work, n, prec, out / f"{n}.onnx",
                                                     feeds[n], cal, log)
                judge.fp32[n] = qt.fp32_entry(work, n, spec)
            _log_above_bar(log, f"[onnx] {n}: {stats[n]['nodes_before']} -> "
                                f"{stats[n]['nodes_after']} nodes"
                                f"{' + external data' if stats[n]['external_data'] else ''} "
                                f"({time.perf_counter() - t0:.1f} s)")
    finally:
        for path in (*raw.values(), *raw32.values()):  # traced, never cleaned up (an error)
            shutil.rmtree(path.parent, ignore_errors=True)
    entries = _parity(build, refs, stats, todo, out, log, islands, whole)
    for n, recipe in judge.recipes.items():
        entries[n]["quantization"] = recipe
    return entries, refs, judge if quant else None


def _fp16_islands(build: _Build, wrappers: dict, refs: dict, todo: list[str], log: Log
                  ) -> tuple[dict[str, tuple], dict[str, bool]]:
    """Per fp16 component: its float32 islands (declared, then the tracking's) and whether a
    risky value was found that only the whole component in fp32 could hold."""
    islands, whole = {}, {}
    for n in todo:
        if base_precision(build.precision[n]) != "fp16":
            continue
        flagged, whole[n] = flagged_islands(refs[n].op_max, refs[n].out_max)
        islands[n] = tuple(outermost(list(fp32_islands(wrappers[n], tuple(flagged)))))
        log(f"[fp16] {n}: float32 islands: "
            + ("; ".join(f"{i.module or '(wrapper)'}: {i.why}" for i in islands[n]) or "none"))
    return islands, whole


def _bar(items: list[str], what: str):
    return tqdm(items, desc=what, unit="component", file=sys.stderr, disable=None)


def _log_above_bar(log: Log, msg: str) -> None:
    with tqdm.external_write_mode(file=sys.stderr):  # keeps an active bar below the lines
        log(msg)


def _parity(build: _Build, refs: dict, stats: dict, todo: list[str], out: Path, log: Log,
            islands: dict[str, tuple], whole: dict[str, bool]) -> dict[str, dict]:
    entries, failures = {}, []
    for n in todo:
        t0, spec, prec = time.perf_counter(), build.specs[n], build.precision[n]
        parity, fails = check_parity(out / f"{n}.onnx", spec, prec, refs[n])
        if prec in QUANTIZED:  # judged on restored images (_judge); a graph that fails to
            # run still refuses. Random images are outside any calibration's ranges.
            fails = [f for f in fails if isinstance(f, RuntimeFailure)]
            parity["gating"] = False
        failures += fails
        fp16 = fp16_safety(n, refs[n].max_abs, refs[n].nonfinite,
                           [i.to_dict() for i in islands[n]] if n in islands else None,
                           whole.get(n))
        log(f"[parity] {n}: max abs {parity.get('max_abs', float('nan')):.3g} "
            f"(tolerance {parity.get('tolerance', float('nan')):.3g}, "
            f"{parity.get('samples', 0)} samples, {parity.get('checked_with')}) "
            f"{'FAILED' if fails else 'recorded' if prec in QUANTIZED else 'ok'}; "
            f"largest activation {fp16['max_abs_activation']:.4g} "
            f"({'at risk in fp16' if fp16['at_risk'] else 'fp16-safe'}) "
            f"({time.perf_counter() - t0:.1f} s)")
        entries[n] = {**mf.file_entry(out, f"{n}.onnx", stats[n]["external_data"]),
                      "backend": "onnx", "precision": prec, **spec.io_manifest(prec),
                      "trt": None, "source_hash": build.digests[n], "parity": parity,
                      "fp16": fp16}
    if failures:
        raise ParityError(failures)
    return entries


def _lint(build: _Build, names: list[str], out: Path, log: Log) -> dict:
    version = (build.trt_info and tuple(int(x) for x in build.trt_info[0].split(".")[:2])) \
        or trt_ops.DEFAULT_TRT_VERSION
    problems, warnings = [], []
    for n in names:
        p, w = lint_file(out / f"{n}.onnx", n, version)
        problems += p
        warnings += w
    for p in problems:
        log(f"[lint] {p}")
    for w in warnings:
        log(f"[lint] warning: {w}")
    log(f"[lint] TensorRT {'.'.join(map(str, version))} op lint: "
        f"{'passed' if not problems else f'{len(problems)} problem(s)'}")
    if problems and build.target.lint_blocks:
        raise LintError(problems)
    return {"passed": not problems, "problems": [p.to_dict() for p in problems],
            "warnings": warnings, "trt_version": ".".join(map(str, version))}


def _build_engines(build: _Build, todo: list[str], entries: dict, refs: dict, log: Log
                   ) -> None:
    """Build each new component's engine, then run the engine itself against the float32
    PyTorch reference: a failure refuses the dir like an ONNX parity failure."""
    from . import trt
    version, cc = build.trt_info
    out, timing_cache = build.plan.out, build.plan.timing_cache
    cache = Path(timing_cache) if timing_cache else out / trt.TIMING_CACHE
    failures = []
    for n in todo:
        t0, spec, prec = time.perf_counter(), build.specs[n], build.precision[n]
        onnx_entry = {k: entries[n][k] for k in ("file", "sha256", "external_data")}
        engine = trt.engine_file_name(n, version, cc)
        profile = spec.profile(*build.dims)
        try:
            built = trt.build_engine(out / f"{n}.onnx", out / engine, prec, profile, cache)
        except Exception as e:  # noqa: BLE001 - parser/builder errors, reported typed
            raise ComponentExportError(n, "TensorRT build", f"{type(e).__name__}: {e}") from e
        # An 8-bit engine is held to its own Q/DQ graph run by onnxruntime (the quantization
        # is the graph's; what it costs is measured on images), the others to PyTorch.
        ref = qt.graph_samples(out / f"{n}.onnx", spec, prec, refs[n]) \
            if prec in QUANTIZED else refs[n]
        parity, fails = compare(lambda feeds: trt.run_engine(out / engine, feeds), spec, prec,
                                ref, "tensorrt")
        failures += fails
        entries[n].update({**mf.file_entry(out, engine, None), "backend": "trt",
                           "engine_parity": parity,
                           "trt": {"version": version, "compute_capability": f"{cc[0]}.{cc[1]}",
                                   **built, "profiles": profile, "onnx": onnx_entry,
                                   "timing_cache": cache.name if cache.parent == out else None}})
        log(f"[trt] {n} ({prec}, strongly typed{', TF32' if built['tf32'] else ''}) -> {engine}; "
            f"engine parity max abs {parity['max_abs']:.3g} (tolerance "
            f"{parity['tolerance']:.3g}) {'ok' if not fails else 'FAILED'} "
            f"({time.perf_counter() - t0:.1f} s)")
    if failures:
        raise ParityError(failures)
