"""Latency results -> markdown (TensorRT demo style `| Module | Latency |` tables), and the
merging of several result files from one machine into one report."""
from __future__ import annotations

from typing import Any, Iterable

from ._backends import BACKENDS, BASELINE
from ._common import MODULES, PIPELINE, md_table, peak_tflops

GIB = 2 ** 30


def peak_precision(precision: str, machine: dict[str, Any]) -> str:
    """The peak an fp32 run is held against: TF32 tensor cores when PyTorch lets convolutions
    or matmuls use them (its default for convolutions), else plain fp32."""
    tf32 = machine.get("tf32_cudnn") or machine.get("tf32_matmul")
    return "tf32" if precision == "fp32" and tf32 else precision


def enrich(rec: dict[str, Any], flops_b1: int | None, machine: dict[str, Any]) -> dict[str, Any]:
    """Add throughput, FLOPs at this batch, achieved TFLOP/s and the fraction of the device's
    peak (None where the peak is unknown: CPUs, unlisted GPUs)."""
    sec = rec["median_ms"] / 1e3
    rec["images_per_s"] = rec["batch"] / sec if sec > 0 else None
    flops = None if flops_b1 is None else flops_b1 * rec["batch"]
    rec["flops"] = flops
    rec["tflops_per_s"] = None if flops is None or sec <= 0 else flops / sec / 1e12
    # onnxruntime and TensorRT set their own TF32 policy: only PyTorch's flags are known here.
    precision = (peak_precision(rec["precision"], machine) if rec.get("kind") in
                 ("eager", "compiled") else rec["precision"])
    rec["peak_precision"] = precision
    peak = (peak_tflops(machine.get("gpu"), precision) if rec.get("device") == "cuda"
            else None)
    rec["peak_tflops"] = peak
    rec["peak_fraction"] = (None if peak is None or rec["tflops_per_s"] is None
                            else rec["tflops_per_s"] / peak)
    return rec


def _key(rec: dict[str, Any]) -> tuple:
    return tuple(rec["size"]), rec["batch"]


def _index(records: Iterable[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    return {(tuple(r["size"]), r["batch"], r["backend"], r["module"]): r for r in records}


def ratio(rec: dict[str, Any], index: dict[tuple, dict[str, Any]]) -> float | None:
    """Speed-up over PyTorch eager fp32 at the same size, batch and module (None if absent)."""
    base = index.get((tuple(rec["size"]), rec["batch"], BASELINE, rec["module"]))
    if base is None or rec["median_ms"] <= 0:
        return None
    return base["median_ms"] / rec["median_ms"]


def _gflop(flops: float) -> str:
    g = flops / 1e9
    return f"{g:.1f}" if g >= 100 else f"{g:.3g}"


def _fmt_ms(ms: float) -> str:
    return f"{ms:.1f} ms" if ms >= 100 else f"{ms:.2f} ms" if ms >= 1 else f"{ms:.3f} ms"


def _cell(rec: dict[str, Any] | None, index: dict, note: str = "") -> str:
    if rec is None:
        return note or "—"
    r = ratio(rec, index)
    star = "*" if rec.get("truncated") else ""
    return _fmt_ms(rec["median_ms"]) + star + ("" if r is None or rec["backend"] == BASELINE
                                              else f" (x{r:.2f})")


def _mem(rec: dict[str, Any] | None) -> str:
    if rec is None:
        return "—"
    if rec.get("peak_gpu_bytes") is not None:
        return f"{rec['peak_gpu_bytes'] / GIB:.2f} GiB GPU"
    if rec.get("peak_host_rss_bytes") is not None:
        return f"{rec['peak_host_rss_bytes'] / GIB:.2f} GiB RSS"
    return "—"


def size_table(records: list[dict[str, Any]], backends: list[str], index: dict) -> str:
    """One (size, batch): a row per module, a column per backend, then pipeline throughput and
    peak memory; cells are median latency and the speed-up over eager fp32."""
    by = {(r["backend"], r["module"]): r for r in records}
    labels = [BACKENDS[b].label if b in BACKENDS else b for b in backends]
    rows = []
    for module in MODULES:
        if not any((b, module) in by for b in backends):
            continue
        rows.append(["**Pipeline**" if module == PIPELINE else module]
                    + [_cell(by.get((b, module)), index) for b in backends])
    pipe = [by.get((b, PIPELINE)) for b in backends]
    rows.append(["Throughput"] + [f"{p['images_per_s']:.2f} img/s" if p else "—" for p in pipe])
    rows.append(["Peak memory (pipeline)"] + [_mem(p) for p in pipe])
    return md_table(["Module"] + labels, rows)


def detail_table(records: list[dict[str, Any]]) -> str:
    rows = []
    for r in records:
        frac = "" if r.get("peak_fraction") is None else f"{100 * r['peak_fraction']:.1f}%"
        rows.append([r["backend"], r["module"], f"{r['median_ms']:.3f}", f"{r['p90_ms']:.3f}",
                     f"{r['images_per_s']:.2f}",
                     "" if r["flops"] is None else _gflop(r["flops"]),
                     "" if r["tflops_per_s"] is None else f"{r['tflops_per_s']:.3g}", frac,
                     f"{r['n']}/{r['runs_asked']}"])
    return md_table(["Backend", "Module", "median ms", "p90 ms", "img/s", "GFLOP",
                     "TFLOP/s", "% of peak", "runs"], rows)


def flop_table(flops: dict[str, int]) -> str:
    parts = [m for m in MODULES if m in flops and m != PIPELINE]
    total = flops.get(PIPELINE) or sum(flops[m] for m in parts)
    rows = [[m, _gflop(flops[m]), f"{100 * flops[m] / total:.1f}%"] for m in parts]
    rows.append(["**Pipeline**", _gflop(total), "100%"])
    return md_table(["Module", "GFLOP (batch 1)", "share"], rows)


def backends_in(doc: dict[str, Any]) -> list[str]:
    """The measured backends, in the registry's order (the fp32 baseline first)."""
    order = list(BACKENDS)
    seen = {r["backend"] for r in doc["measurements"]}
    return sorted(seen, key=lambda b: order.index(b) if b in order else len(order))


def render(doc: dict[str, Any]) -> str:
    """The whole markdown report of a latency result document."""
    m, v, s = doc["machine"], doc["versions"], doc["settings"]
    lines = [f"## Latency: {doc['model']['description']} on {m['name']}", "",
             f"- date: {doc['created']}; command: `{doc['command']}`",
             *[f"  - merged from: `{c}`" for c in doc.get("merged_from", [])],
             f"- torch {v.get('torch')}, diffusers {v.get('diffusers')}, onnxruntime "
             f"{v.get('onnxruntime')}, tensorrt {v.get('tensorrt') or 'absent'}, "
             f"CUDA {v.get('cuda') or '-'}, python {v.get('python')}",
             f"- warm-up {s['warmup']}, timed runs {s['runs']} "
             f"({'CUDA events' if m['device'] == 'cuda' else 'host clock'}); median latency; "
             f"(xN) = speed-up over PyTorch eager fp32 in the same run; * = fewer runs than "
             f"asked (time budget)"]
    if m["device"] == "cuda":
        lines.append("- % of peak: achieved FLOP/s over the GPU's dense peak; PyTorch fp32 rows "
                     "use the TF32 tensor-core peak when TF32 is on (PyTorch's default for "
                     f"convolutions; here cuDNN TF32 {m.get('tf32_cudnn')}, matmul TF32 "
                     f"{m.get('tf32_matmul')})")
    if m["device"] != "cuda" and m.get("load_average"):
        lines.append(f"- CPU load average (1/5/15 min) at start {m['load_average']}, at end "
                     f"{m.get('load_average_end')}: other processes share these cores")
    lines.append("")
    if any(b.startswith("compiled") for b in backends_in(doc)):
        lines += [f"- compiled: torch.compile on {', '.join(s.get('compile') or [])} "
                  f"({'CUDA graphs, mode reduce-overhead' if m['device'] == 'cuda' else 'inductor'})"
                  f"; the other components run eager inside its pipeline", ""]
    index = _index(doc["measurements"])
    backends = backends_in(doc)
    groups: dict[tuple, list] = {}
    for r in doc["measurements"]:
        groups.setdefault(_key(r), []).append(r)
    for (size, batch), recs in groups.items():
        lines += [f"### {size[0]}x{size[1]}, batch {batch}", "",
                  size_table(recs, backends, index), ""]
    for size_key, flops in doc.get("flops", {}).items():
        lines += [f"### FLOPs per component at {size_key} (PyTorch flop counter)", "",
                  flop_table(flops), ""]
    if doc.get("errors"):
        lines += ["### Not measured", ""]
        lines += [f"- {e['backend']}"
                  + (f" {e['size'][0]}x{e['size'][1]} b{e['batch']}" if e.get("size") else "")
                  + f": {e['error']}" for e in doc["errors"]]
        lines.append("")
    lines += ["### Every measurement", "", detail_table(doc["measurements"]), ""]
    return "\n".join(lines)


def merge(docs: list[dict[str, Any]], command: str) -> dict[str, Any]:
    """One document from several runs on the same machine (e.g. gpu_check.sh's per-backend
    runs): measurements in order, later duplicates replacing earlier ones."""
    if not docs:
        raise ValueError("nothing to merge")
    names = {d["machine"]["name"] for d in docs}
    if len(names) > 1:
        raise ValueError(f"refusing to merge results of different machines: {sorted(names)}")
    out = dict(docs[0])
    out["command"] = command
    out["merged_from"] = [d["command"] for d in docs]
    index: dict[tuple, dict] = {}
    for d in docs:
        index.update(_index(d["measurements"]))
    out["measurements"] = list(index.values())
    out["errors"] = [e for d in docs for e in d.get("errors", [])]
    out["flops"] = {k: v for d in docs for k, v in d.get("flops", {}).items()}
    out["settings"] = {**docs[0]["settings"],
                       "compile": sorted({c for d in docs for c in d["settings"].get("compile")
                                          or []})}
    return out
