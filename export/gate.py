"""Measuring the high-QF gate (runtime/gate.py) on clean images, with the exported engines.

Per image and per quality of GRID_QF: JPEG-compress it as users' files are (Pillow, 4:2:0;
grey as a one-plane JPEG), read it back as sodiff-run does (the file's coefficients), restore
it once with the gate and the constraint off, then finish that output at every candidate
weight exactly as the runtime does (`runtime.gate.settle`) and score it against the clean
image. Per quality the weight kept is the one of highest mean PSNR gain among those whose
worst image loses at most `worst_db`; weight 0 (the JPEG itself, gain exactly 0) always
qualifies. The weights are then made non-increasing in QF, so that a better JPEG is never
restored harder than a worse one.

    python -m export.gate ENGINE_DIR IMAGES_DIR --out weights/tiny/gate.json
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import click
import numpy as np

from runtime.cliopts import CONTEXT_SETTINGS, version_option

GRID_QF = (5, 10, 20, 30, 40, 60, 80, 90, 95)
WEIGHTS = tuple(i / 20 for i in range(21))  # candidate weights, 0.05 apart
WORST_DB = 0.0                # the most a fitting image may lose at the weight chosen
GATE_FILE = "gate.json"       # beside a checkpoint: the gate its exports carry
Log = Callable[[str], None]


def gains(restorer, clean: np.ndarray, qf: int) -> np.ndarray:
    """PSNR gain over the JPEG at each of WEIGHTS for one clean uint8 image (HxW or HxWx3)."""
    from sodiff.jpeg import compress
    from sodiff.metrics import psnr

    from runtime.gate import settle
    from runtime.imageio import decode_image

    _, data = compress(clean, qf)
    img = decode_image(data, f"gate image at QF {qf}")
    raw = restorer.restore_info(img.array, img.qf, jpeg=img.jpeg)[0]
    base = psnr(img.array, clean)
    out = np.empty_like(raw)
    found = []
    for w in WEIGHTS:
        out[...] = raw
        settle(out, img.array, img.jpeg, w)
        found.append(min(psnr(out, clean), 99.0) - min(base, 99.0))
    return np.array(found)


def choose(table: dict[int, np.ndarray], worst_db: float = WORST_DB) -> list[float]:
    """Per quality of `table` ({qf: [images, len(WEIGHTS)] gains}, any order), the weight
    chosen; non-increasing in QF."""
    chosen = []
    for qf in sorted(table):
        g = np.asarray(table[qf])
        ok = [i for i in range(len(WEIGHTS)) if g[:, i].min() >= -worst_db or WEIGHTS[i] == 0]
        chosen.append(WEIGHTS[max(ok, key=lambda i: g[:, i].mean())])
    return list(np.minimum.accumulate(chosen))


def fit_gate(engine_dir: Path, images: list[Path], qfs=GRID_QF, worst_db: float = WORST_DB,
             log: Log = lambda m: None) -> dict:
    """The manifest's `gate` entry measured with the engines of `engine_dir` on `images`
    (each restored as colour and as its luma, grey)."""
    from runtime import Restorer

    from .samples import load_image

    refs = []
    for p in images:
        rgb = load_image(p)
        refs += [rgb, np.rint(rgb @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)]
    table: dict[int, np.ndarray] = {}
    with Restorer(engine_dir, gate=False, jpeg_constraint=False) as r:
        for qf in qfs:
            table[qf] = np.stack([gains(r, ref, qf) for ref in refs])
            i = WEIGHTS.index(1.0)
            log(f"[gate] QF {qf}: gain at weight 1 mean {table[qf][:, i].mean():+.2f} dB, "
                f"worst {table[qf][:, i].min():+.2f} dB")
    return from_table(table, {"images": len(images), "sha256": _digest(images),
                              "planes": "colour and grey"}, worst_db)


def from_table(table: dict[int, np.ndarray], source: dict, worst_db: float = WORST_DB) -> dict:
    """The manifest's `gate` entry chosen on `table` ({qf: [images, len(WEIGHTS)] gains}),
    its `source` completed with the grid and the gains at the weights chosen."""
    from runtime.gate import Gate

    weights = choose(table, worst_db)
    at = {q: np.asarray(table[q])[:, WEIGHTS.index(w)] for q, w in zip(sorted(table), weights)}
    source = {**source, "grid": list(WEIGHTS), "worst_db": worst_db,
              "gain_db": {str(q): {"mean": round(float(g.mean()), 3),
                                   "worst": round(float(g.min()), 3)} for q, g in at.items()}}
    return Gate(tuple(float(q) for q in sorted(table)), tuple(weights), source).to_dict()


def checkpoint_gate(folder: Path | None) -> dict | None:
    """The gate measured for a checkpoint (`<folder>/gate.json`), or None."""
    from runtime.gate import Gate

    path = None if folder is None else Path(folder) / GATE_FILE
    if path is None or not path.is_file():
        return None
    gate = Gate.from_dict(json.loads(path.read_text())).to_dict()  # ValueError if malformed
    gate["source"] = {**(gate["source"] or {}), "file": GATE_FILE}
    return gate


def _digest(files: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(files):
        h.update(p.name.encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


@version_option()
@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument("engine_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("images", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="gate.json to write (beside a checkpoint, its exports carry it).")
@click.option("--limit", type=click.IntRange(min=1), help="First N images only.")
def main(engine_dir, images, out, limit):
    """Measure the high-QF gate of ENGINE_DIR on the clean images in IMAGES."""
    from .samples import list_images

    say = lambda m: click.echo(m, err=True)  # noqa: E731
    gate = fit_gate(engine_dir, list_images(images)[:limit], log=say)
    out.write_text(json.dumps(gate, indent=1) + "\n")
    say(f"wrote {out}: " + ", ".join(f"QF {q:g}: {w:g}" for q, w in zip(gate["qf"],
                                                                     gate["weight"])))


if __name__ == "__main__":
    main()


def gate_for_export(plan, checkpoint: dict, out: Path, log: Log) -> dict | None:
    """The high-QF gate of an export: measured now on --gate-images with the engines just
    written, or the checkpoint's own gate.json (measured once for its weights), or none."""
    from .errors import ExportError
    if plan.gate_files is not None:
        log(f"[gate] measuring on {len(plan.gate_files)} images of {plan.gate_images}")
        return fit_gate(out, list(plan.gate_files), log=log)
    if plan.random_weights:
        return None
    try:
        found = checkpoint_gate(checkpoint["path"])
    except ValueError as e:
        raise ExportError(f"{checkpoint['path']}/{GATE_FILE}: {e}; fix or delete it, or "
                          f"measure a new one with --gate-images DIR") from None
    if found is None:
        log("[gate] none: the checkpoint has no gate.json (measure one with --gate-images DIR)")
    else:
        log("[gate] the checkpoint's: " + ", ".join(
            f"QF {q:g}: {w:g}" for q, w in zip(found["qf"], found["weight"])))
    return found
