"""What a trained checkpoint does with the compression, in PyTorch, per QF on whole images.

    python -m training.evaluate --checkpoint runs/s2/final --data $D/LIVE1_color --out e.json

($D: the test images' folder, docs/data.md.)

Issue 13's checks of a retrained model, beside `benchmarks/quality.py` (which scores PSNR/SSIM
through the runtime): the Spearman correlation of `tau` with QF, the QF head's MAE over a
range of QFs, the spread of one image's 77 prompt tokens, the PSNR of `SODiff.restore` against
the JPEG's, and the mean signed error of each RGB channel (a colour cast shows there). Writes
one JSON file with everything and prints a table.
"""
from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np
import torch
from tqdm import tqdm

from runtime.cliopts import CONTEXT_SETTINGS, version_option
from sodiff import checkpoint, metrics
from sodiff.jpeg import compress
from sodiff.model import resize_for_saipe

from .data import list_images, load_rgb, to_tensor, to_uint8
from .monitor import spearman

RESTORE_QFS = (5, 10, 20, 30, 40, 60, 80)
HEAD_QFS = tuple(range(5, 96, 5))


def parse_qfs(text: str) -> tuple[int, ...]:
    try:
        qfs = tuple(int(q) for q in text.split(","))
    except ValueError:
        qfs = ()
    if not qfs or not all(1 <= q <= 100 for q in qfs):
        raise click.BadParameter(f"{text!r}: expected comma-separated qualities in 1..100")
    return qfs


def token_spread(prompt: torch.Tensor) -> float:
    """`||p - mean token|| / ||p||` of one image's prompt [77, D]: 0 when all tokens agree."""
    return float((prompt - prompt.mean(0)).norm() / prompt.norm())


@torch.no_grad()
def evaluate(model, images: list[tuple[str, np.ndarray]], restore_qfs=RESTORE_QFS,
             head_qfs=HEAD_QFS, progress: bool = True) -> dict:
    """Per-QF means of PSNR (restored, JPEG), tau, QF error and signed channel error, and
    the overall Spearman of tau with QF, the QF head's MAE over `head_qfs` and token spread."""
    model.eval()
    rows, head = [], []
    for name, hq in tqdm(images, desc="evaluate", disable=not progress, leave=False):
        for q in sorted(set(restore_qfs) | set(head_qfs)):
            lq = to_tensor(compress(hq, q)[0])[None]
            tau, qf, _ = model.timestep(lq)
            if q in head_qfs:
                head.append(abs(float(qf) - q))
            if q not in restore_qfs:
                continue
            prompt = model.saipe(resize_for_saipe(lq, model.cfg.saipe.image_size))[0][0]
            out = to_uint8(model.restore(lq))
            err = out.astype(np.float64) - hq.astype(np.float64)
            rows.append({"image": name, "qf": q, "tau": float(tau), "qf_pred": float(qf),
                         "psnr": metrics.psnr(out, hq),
                         "psnr_jpeg": metrics.psnr(to_uint8(lq), hq),
                         "signed_error_rgb": err.reshape(-1, 3).mean(0).tolist(),
                         "token_spread": token_spread(prompt)})
    per_qf = {}
    for q in restore_qfs:
        sel = [r for r in rows if r["qf"] == q]
        per_qf[str(q)] = {k: float(np.mean([r[k] for r in sel]))
                          for k in ("psnr", "psnr_jpeg", "tau", "qf_pred", "token_spread")}
        per_qf[str(q)]["signed_error_rgb"] = np.mean([r["signed_error_rgb"] for r in sel],
                                                     0).tolist()
    return {"images": len(images), "per_qf": per_qf, "rows": rows,
            "tau_qf_spearman": spearman([r["tau"] for r in rows], [r["qf"] for r in rows]),
            "qf_head_mae": float(np.mean(head)), "head_qfs": list(head_qfs)}


@version_option()
@click.command(context_settings=CONTEXT_SETTINGS,
               help="Score a checkpoint's timestep, QF head, prompt and restoration per QF on "
               "whole images (issue 13's checks; PyTorch).")
@click.option("--checkpoint", "ckpt", required=True, help="SODiff checkpoint folder")
@click.option("--base", default=None, help="SD2.1-base folder for an external-base checkpoint")
@click.option("--data", required=True, help="folder of clean images (e.g. LIVE1_color)")
@click.option("--qf", "qf_text", default=",".join(map(str, RESTORE_QFS)), show_default=True,
              help="qualities restored")
@click.option("--head-qf", "head_text", default=",".join(map(str, HEAD_QFS)),
              show_default=True, help="qualities the QF head is scored at")
@click.option("--limit", type=int, default=None, help="only the first N images")
@click.option("--out", required=True, help="JSON file to write")
def main(ckpt: str, base: str | None, data: str, qf_text: str, head_text: str,
         limit: int | None, out: str) -> None:
    try:
        model = checkpoint.load(ckpt, base)
        images = [(p.name, load_rgb(p)) for p in list_images(data)[:limit]]
        if not images:
            raise ValueError(f"no images in {data}")
        result = evaluate(model, images, parse_qfs(qf_text), parse_qfs(head_text))
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    result.update(checkpoint=str(ckpt), data=str(data))
    Path(out).write_text(json.dumps(result, indent=2))
    click.echo(f"{len(images)} images of {data}; Spearman(tau, QF) "
               f"{result['tau_qf_spearman']:+.3f}; QF head MAE {result['qf_head_mae']:.2f} "
               f"over QF {head_text}")
    click.echo("| QF | JPEG PSNR | restored PSNR | gain | tau | QF pred | R/G/B signed error | "
               "token spread |")
    click.echo("|---|---|---|---|---|---|---|---|")
    for q, r in result["per_qf"].items():
        rgb = "/".join(f"{v:+.2f}" for v in r["signed_error_rgb"])
        click.echo(f"| {q} | {r['psnr_jpeg']:.2f} | {r['psnr']:.2f} | "
                   f"{r['psnr'] - r['psnr_jpeg']:+.2f} | {r['tau']:.1f} | {r['qf_pred']:.1f} | "
                   f"{rgb} | {r['token_spread']:.4f} |")


if __name__ == "__main__":
    main()
