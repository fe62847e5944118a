"""Restoration quality on the classic JPEG test sets (LIVE1 colour, Classic5 grey).

    python benchmarks/quality.py --jpeg-only                  # the JPEG baseline rows only
    python benchmarks/quality.py --checkpoint weights/tiny    # PyTorch, SODiff.restore
    python benchmarks/quality.py --engine engines/tiny        # the torch-free runtime (ORT)

For each set and QF: PSNR, SSIM and PSNR-B (FBCNN conventions, sodiff.metrics) of the JPEG
input and of the restored output, the predictor's QF mean absolute error, the header-QF
estimate's accuracy, and LPIPS/DISTS/MUSIQ/MANIQA/CLIP-IQA through pyiqa when it is installed
and its weights are already on disk (nothing is downloaded). Grey protocol: the grey JPEG is
replicated to RGB, restored, and brought back to grey with luma weights summing to one.
Writes `<out>/<name>.json` (every image), `<name>.md` and `<name>_grid.png`.
"""
from __future__ import annotations

import shlex
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `sodiff` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click  # noqa: E402
import numpy as np  # noqa: E402

from runtime.cliopts import CONTEXT_SETTINGS, version_option  # noqa: E402
from benchmarks import _common as C  # noqa: E402
from benchmarks import _quality as Q  # noqa: E402

DEFAULT_SETS = ("LIVE1_color", "Classic5", "LIVE1_gray", "BSDS500/test")
DEFAULT_QFS = (5, 10, 20, 30, 40, 60, 80, 90, 95)  # what users hold reaches QF 95
CLASSIC = ("psnr", "ssim", "psnr_b")


@dataclass(frozen=True)
class QualitySettings:
    mode: str                     # "jpeg-only" | "checkpoint" | "engine"
    checkpoint: Path | None       # SODiff checkpoint folder (mode "checkpoint")
    base: Path | None             # SD2.1-base folder for external-base checkpoints
    engine: Path | None           # engine dir, run by the torch-free runtime (mode "engine")
    device: str                   # PyTorch device for the checkpoint and pyiqa
    data: Path                    # folder holding the test-set folders
    sets: tuple[str, ...]         # names from _quality.SETS
    qfs: tuple[int, ...]          # JPEG quality factors
    limit: int | None             # first N images per set (None: all)
    iqa: tuple[str, ...]          # pyiqa metrics to try (skipped unless installed + on disk)
    grid_images: int              # images in the side-by-side grid (0: no grid)
    grid_qf: int                  # the QF the grid shows
    out: Path                     # results folder
    name: str                     # file stem
    jpeg_constraint: bool = True  # the runtime's quantization constraint (engine mode)


def validate_settings(s: QualitySettings) -> None:
    problems = []
    if s.mode not in ("jpeg-only", "checkpoint", "engine"):
        problems.append(f"mode {s.mode!r}: give exactly one of --jpeg-only, --checkpoint, "
                        f"--engine")
    bad = [n for n in s.sets if n not in Q.SETS]
    if bad or not s.sets:
        problems.append(f"unknown sets {bad or list(s.sets)}; known: {', '.join(Q.SETS)}")
    bad = [q for q in s.qfs if not 1 <= q <= 100]
    if bad or not s.qfs:
        problems.append(f"quality factors must be in 1..100, got {list(s.qfs)}")
    bad = [m for m in s.iqa if m not in Q.IQA_METRICS]
    if bad:
        problems.append(f"unknown IQA metrics {bad}; known: {', '.join(Q.IQA_METRICS)}")
    if s.limit is not None and s.limit < 1:
        problems.append(f"--limit must be >= 1, got {s.limit}")
    if s.grid_images < 0:
        problems.append(f"--grid must be >= 0, got {s.grid_images}")
    elif s.grid_images and s.grid_qf not in s.qfs:
        problems.append(f"--grid-qf {s.grid_qf} must be one of the QFs {list(s.qfs)}")
    if problems:
        raise ValueError("; ".join(problems))


def _restorer(s: QualitySettings):
    if s.mode == "checkpoint":
        return Q.torch_restorer(s.checkpoint, s.base, s.device)
    if s.mode == "engine":
        return Q.engine_restorer(s.engine, s.jpeg_constraint)
    return None


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over the images of one (set, QF): per-image metric means (the benchmark
    convention), predictor QF MAE and the header-QF estimate's exact-match rate."""
    out: dict[str, Any] = {"images": len(records)}
    for side in ("jpeg", "restored"):
        if all(side in r for r in records):
            keys = records[0][side].keys()
            out[side] = {k: _mean([r[side][k] for r in records]) for k in keys}
    if all("restored_bias" in r for r in records):
        out["restored_bias"] = [float(v) for v in
                                np.mean([r["restored_bias"] for r in records], axis=0)]
    pred = [abs(r["predicted_qf"] - r["qf"]) for r in records
            if r.get("predicted_qf") is not None]
    out["predictor_qf_mae"] = _mean(pred)
    out["header_qf_exact"] = _mean([float(r["header_qf"] == r["qf"]) for r in records])
    out["header_qf_mae"] = _mean([abs(r["header_qf"] - r["qf"]) for r in records
                                  if r["header_qf"] is not None])
    return out


def _fmt(d: dict[str, Any] | None) -> str:
    if not d:
        return "—"
    return f"{d['psnr']:.2f} / {d['ssim']:.4f} / {d['psnr_b']:.2f}"


def render(doc: dict[str, Any]) -> str:
    lines = [f"## Quality: {doc['model']} ({doc['created']})", "",
             f"- command: `{doc['command']}`",
             "- PSNR dB / SSIM / PSNR-B dB, means over images (FBCNN conventions: RGB PSNR, "
             "SSIM averaged over channels, PSNR-B with the BEF of the output's Y channel); grey "
             "sets use the grey protocol", ""]
    for set_name, by_qf in doc["summary"].items():
        restored = doc["model"] != "JPEG only"
        rows = []
        for qf, sm in by_qf.items():
            mae, bias = sm["predictor_qf_mae"], sm.get("restored_bias")
            rows.append([qf, sm["images"], _fmt(sm.get("jpeg"))]
                        + ([_fmt(sm.get("restored")), "—" if mae is None else f"{mae:.2f}",
                            "—" if bias is None else "/".join(f"{v:+.2f}" for v in bias)]
                           if restored else [])
                        + [f"{100 * sm['header_qf_exact']:.0f}%"])
        headers = ["QF", "images", "JPEG"] + (["restored", "predictor QF MAE",
                                               "signed error (grey levels)"] if restored
                                              else []) + ["header QF exact"]
        lines += [f"### {set_name}", "", C.md_table(headers, rows), ""]
        iqa_rows = [[qf] + [f"{sm[side][m]:.4f}" for m in doc["iqa"]["used"]
                            for side in ("jpeg", "restored") if side in sm]
                    for qf, sm in by_qf.items() if doc["iqa"]["used"]]
        if iqa_rows:
            sides = [s for s in ("jpeg", "restored") if s in next(iter(by_qf.values()))]
            lines += [C.md_table(["QF"] + [f"{m} ({side})" for m in doc["iqa"]["used"]
                                           for side in sides], iqa_rows), ""]
    skipped = doc["iqa"]["skipped"]
    if skipped:
        lines += ["Perceptual metrics skipped: " + "; ".join(f"{k}: {v}"
                                                             for k, v in skipped.items()), ""]
    if doc.get("grid"):
        lines += [f"Crops at QF {doc['settings']['grid_qf']}: `{Path(doc['grid']).name}`", ""]
    return "\n".join(lines)


def run_quality(s: QualitySettings, command: str = "") -> dict[str, Any]:
    """Evaluate every (set, QF, image); writes JSON, markdown and the grid; returns the doc."""
    from tqdm import tqdm
    validate_settings(s)
    files = {n: Q.list_images(s.data, n)[:s.limit] for n in s.sets}
    restorer = _restorer(s)
    iqa, skipped = Q.load_iqa(s.iqa, s.device)
    model = {"jpeg-only": "JPEG only", "checkpoint": f"checkpoint {s.checkpoint}",
             "engine": f"engine {s.engine}"}[s.mode]
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(s).items()}
    doc: dict[str, Any] = {"kind": "sodiff-quality", "created": C.now_utc(), "command": command,
                           "model": model, "machine": C.machine_info(s.device),
                           "versions": C.versions(), "settings": settings,
                           "iqa": {"used": list(iqa), "skipped": skipped},
                           "images": [], "summary": {}, "grid": None}
    grid_rows: list[dict[str, np.ndarray]] = []
    total = sum(len(f) for f in files.values()) * len(s.qfs)
    with tqdm(total=total, desc="quality", unit="img", file=sys.stderr, disable=None) as bar:
        for set_name, paths in files.items():
            grey = Q.SETS[set_name]
            for qf in s.qfs:
                recs = []
                for path in paths:
                    ref = Q.load_reference(path, grey)
                    rec, images = Q.evaluate_image(ref, qf, grey, restorer)
                    for side in ("jpeg", "restored") if iqa else ():
                        if side in images:
                            rec[side].update(Q.iqa_scores(iqa, images[side], ref, s.device))
                    rec.update(set=set_name, image=path.name)
                    recs.append(rec)
                    if qf == s.grid_qf and len(grid_rows) < s.grid_images:
                        grid_rows.append(images)
                    bar.update(1)
                doc["images"] += recs
                doc["summary"].setdefault(set_name, {})[str(qf)] = summarize(recs)
                C.write_json(s.out / f"{s.name}.json", doc)
    if grid_rows:
        columns = ("jpeg", "restored", "reference") if restorer else ("jpeg", "reference")
        labels = (f"JPEG QF{s.grid_qf}", *columns[1:])
        grid_path = s.out / f"{s.name}_grid.png"
        s.out.mkdir(parents=True, exist_ok=True)
        Q.image_grid(grid_rows, columns, labels).save(grid_path)
        doc["grid"] = str(grid_path)
    C.write_json(s.out / f"{s.name}.json", doc)
    C.write_text(s.out / f"{s.name}.md", render(doc))
    return doc


_path = click.Path(path_type=Path)


@version_option()
@click.command(context_settings=CONTEXT_SETTINGS)
@click.option("--jpeg-only", is_flag=True, help="Only the JPEG baseline (no model; fast).")
@click.option("--checkpoint", type=_path, help="SODiff checkpoint folder (PyTorch).")
@click.option("--base", type=_path, help="Local SD2.1-base folder for external-base checkpoints.")
@click.option("--engine", type=_path, help="Engine dir, run through the torch-free runtime.")
@click.option("--device", default="cpu", show_default=True, help="PyTorch device (cpu, cuda).")
@click.option("--data", type=_path, default=C.SHARED_DATA, show_default=True)
@click.option("--sets", default=",".join(DEFAULT_SETS), show_default=True)
@click.option("--qf", default=",".join(map(str, DEFAULT_QFS)), show_default=True)
@click.option("--limit", type=int, help="Only the first N images of each set.")
@click.option("--iqa", default=",".join(Q.IQA_METRICS), show_default=True,
              help="pyiqa metrics to try ('' for none); weights are never downloaded.")
@click.option("--grid", "grid_images", type=int, default=4, show_default=True,
              help="Images in the crop grid (0: none).")
@click.option("--grid-qf", type=int, default=10, show_default=True)
@click.option("--out", type=_path, default=C.RESULTS_DIR, show_default=True)
@click.option("--name", help="File stem [quality_<jpeg|checkpoint|engine name>].")
@click.option("--no-jpeg-constraint", is_flag=True, help="--engine: without the runtime's "
              "quantization constraint (runtime/jpegqcs.py), as sodiff-run --no-jpeg-constraint.")
def main(jpeg_only: bool, checkpoint: Path | None, engine: Path | None, qf: str, sets: str,
         iqa: str, name: str | None, no_jpeg_constraint: bool, **kw: Any) -> None:
    """PSNR / SSIM / PSNR-B (+ QF error, + pyiqa metrics) on LIVE1 and Classic5."""
    chosen = [m for m, on in (("jpeg-only", jpeg_only), ("checkpoint", checkpoint),
                              ("engine", engine)) if on]
    command = "python benchmarks/quality.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:
        if len(chosen) != 1:
            raise ValueError("give exactly one of --jpeg-only, --checkpoint DIR, --engine DIR")
        mode = chosen[0]
        stem = {"jpeg-only": "jpeg", "checkpoint": checkpoint and checkpoint.name,
                "engine": engine and engine.name}[mode]
        s = QualitySettings(
            mode=mode, checkpoint=checkpoint, engine=engine,
            qfs=tuple(C.parse_int_list(qf, "--qf")),
            sets=tuple(x.strip() for x in sets.split(",") if x.strip()),
            iqa=tuple(x.strip() for x in iqa.split(",") if x.strip()),
            name=name or f"quality_{stem}", jpeg_constraint=not no_jpeg_constraint, **kw)
        doc = run_quality(s, command)
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(render(doc))


if __name__ == "__main__":
    main()
