"""Do no harm, measured: PSNR gain over the JPEG per test set and QF, at every gate weight.

    python benchmarks/gate.py --engine engines/tiny --name gate_tiny

Per image and QF the JPEG goes through the runtime as `sodiff-run` reads it (Pillow 4:2:0,
the file's coefficients), restored once with the gate and the constraint off; every weight of
export.gate.WEIGHTS is then finished exactly as the runtime does (`runtime.gate.settle`), so
the row at the engine dir's own gate is what `sodiff-run` with its defaults gives. Writes
`<out>/<name>.json` (every image's gain at every weight; resumable: images already in it are
kept) and `<name>.md` (mean and worst gain per set and QF: no gate, the dir's gate).
`--fit FILE` then chooses a gate on every image of the sets asked for, pooled (export/gate.py's
rule), and writes it as a checkpoint's gate.json:

    python benchmarks/gate.py --engine engines/tiny --fit weights/tiny/gate.json
"""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `sodiff` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import _common as C  # noqa: E402
from runtime.cliopts import CONTEXT_SETTINGS, version_option  # noqa: E402

from benchmarks._quality import SETS  # noqa: E402
from benchmarks.quality import DEFAULT_QFS as QFS  # noqa: E402


def images_of(data: Path, name: str, limit: int | None) -> list[Path]:
    from benchmarks._quality import list_images
    try:
        return list_images(data, name)[:limit]
    except ValueError as e:
        raise click.UsageError(str(e)) from None


def table_md(results: dict, gate) -> str:
    """Mean / worst gain per set and QF without the gate (weight 1) and with the dir's."""
    from export.gate import WEIGHTS
    lines = ["| set | QF | images | no gate: mean / worst dB | gate weight | with the gate: "
             "mean / worst dB |", "|:--|--:|--:|--:|--:|--:|"]
    for name, per_qf in results.items():
        for qf, rows in sorted(per_qf.items(), key=lambda kv: int(kv[0])):
            g = np.array(list(rows.values()))
            w = 1.0 if gate is None else gate.weight_at(int(qf))
            i = int(np.argmin(np.abs(np.array(WEIGHTS) - w)))
            lines.append(f"| {name} | {qf} | {len(g)} | {g[:, -1].mean():+.2f} / "
                         f"{g[:, -1].min():+.2f} | {WEIGHTS[i]:g} | {g[:, i].mean():+.2f} / "
                         f"{g[:, i].min():+.2f} |")
    return "\n".join(lines) + "\n"


def compact_md(results: dict, gate) -> str:
    """Rows QF, a column per set: mean / worst gain with the dir's gate (the README's table)."""
    from export.gate import WEIGHTS
    sets = list(results)
    qfs = sorted({int(q) for s in sets for q in results[s]})
    lines = ["| QF | weight | " + " | ".join(f"{s} ({len(next(iter(results[s].values())))})"
                                          for s in sets) + " |",
             "|--:|--:|" + "--:|" * len(sets)]
    for qf in qfs:
        w = 1.0 if gate is None else gate.weight_at(qf)
        i = int(np.argmin(np.abs(np.array(WEIGHTS) - w)))
        cells = []
        for s in sets:
            rows = results[s].get(str(qf))
            g = None if not rows else np.array(list(rows.values()))[:, i]
            cells.append("-" if g is None else f"{g.mean():+.2f} / {g.min():+.2f}")
        lines.append(f"| {qf} | {WEIGHTS[i]:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@version_option()
@click.command(context_settings=CONTEXT_SETTINGS)
@click.option("--engine", type=click.Path(exists=True, file_okay=False, path_type=Path),
              required=True, help="Engine dir (its manifest's gate gives the second column).")
@click.option("--sets", default=",".join(SETS), show_default=True, help="Comma-separated.")
@click.option("--qf", "qfs", default=",".join(map(str, QFS)), show_default=True)
@click.option("--limit", type=click.IntRange(min=1), help="First N images per set.")
@click.option("--data", type=click.Path(path_type=Path), default=C.SHARED_DATA,
              show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=C.RESULTS_DIR,
              show_default=True)
@click.option("--name", default="gate", show_default=True, help="File stem of the results.")
@click.option("--fit", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the gate chosen on these sets' images, pooled, to this gate.json.")
def main(engine, sets, qfs, limit, data, out, name, fit):
    """PSNR gain over the JPEG, per set and QF, at every gate weight."""
    from export.gate import WEIGHTS, gains
    from runtime import Restorer
    from runtime.manifest import read_manifest

    from benchmarks._quality import load_reference

    sets = [s for s in sets.split(",") if s]
    unknown = [s for s in sets if s not in SETS]
    if unknown:
        raise click.UsageError(f"unknown sets {unknown}; known: {', '.join(SETS)}")
    qfs = [int(q) for q in qfs.split(",")]
    path = Path(out) / f"{name}.json"
    doc = json.loads(path.read_text()) if path.is_file() else {}
    doc.update({"command": "python benchmarks/gate.py " + shlex.join(sys.argv[1:]),
                "engine": str(engine), "weights": list(WEIGHTS), "date": C.now_utc(),
                "commit": C.git_commit(), "machine": C.machine_info("cpu")})
    results = doc.setdefault("gain_db", {})
    with Restorer(engine, gate=False, jpeg_constraint=False) as r:
        for s in sets:
            files = images_of(Path(data), s, limit)
            refs = [load_reference(p, SETS[s]) for p in files]  # small sets: all in memory
            for qf in qfs:
                rows = results.setdefault(s, {}).setdefault(str(qf), {})
                for f, ref in zip(files, refs):
                    if f.name not in rows:
                        rows[f.name] = gains(r, ref, qf).round(4).tolist()
                        path.parent.mkdir(parents=True, exist_ok=True)
                        path.write_text(json.dumps(doc) + "\n")
                g = np.array([rows[f.name] for f in files])
                click.echo(f"{s} QF {qf}: weight 1 {g[:, -1].mean():+.2f} / "
                           f"{g[:, -1].min():+.2f} dB", err=True)
    gate = read_manifest(engine).gate
    (Path(out) / f"{name}.md").write_text(
        f"## Gain over the JPEG: {engine}\n\n- command: `{doc['command']}`\n- gate: "
        f"{'none' if gate is None else dict(zip(gate.qf, gate.weight))}\n\n"
        + table_md(results, gate) + "\nWith the gate, mean / worst gain in dB (images):\n\n"
        + compact_md(results, gate))
    click.echo(f"wrote {path}", err=True)
    if fit is not None:
        fitted = fit_pooled(results, sets, qfs, doc["command"])
        fit.write_text(json.dumps(fitted, indent=1) + "\n")
        click.echo(f"wrote {fit}: " + ", ".join(f"QF {q:g}: {w:g}" for q, w in
                                              zip(fitted["qf"], fitted["weight"])), err=True)


def fit_pooled(results: dict, sets: list[str], qfs: list[int], command: str) -> dict:
    """export/gate.py's choice on every image of `sets` at each of `qfs`, pooled."""
    from export.gate import from_table
    table = {q: np.array([g for s in sets for g in results[s][str(q)].values()]) for q in qfs}
    return from_table(table, {"sets": {s: len(results[s][str(qfs[0])]) for s in sets},
                              "planes": "as each set's protocol", "command": command})


if __name__ == "__main__":
    main()
