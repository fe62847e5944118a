"""What an 8-bit component costs, judged on restored images: PSNR of the held-out images at
QF 10 and QF 40 through the runtime, with the component quantized against the same engine dir
with that component's float32 graph, everything else equal. onnxruntime runs both on the CPU
(TensorRT engines of the same graphs are checked by engine parity)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from . import manifest as mf
from .errors import ExportError

QUALITY_QFS = (10, 40)
# The most PSNR (dB) a quantized component may lose against float32, worse of the two QFs.
BOUNDS_DB = {"unet": {"int8": 0.10, "fp8": 0.05},
             "vae_encoder": {"int8": 0.15, "fp8": 0.15},
             "vae_decoder": {"int8": 0.15, "fp8": 0.15},
             "saipe": {"int8": 0.05, "fp8": 0.05},
             "predictor": {"int8": 0.05, "fp8": 0.05}}
REFERENCE = "fp32"
Log = Callable[[str], None]


class QualityError(ExportError):
    """A quantized component loses more than its bound (`--force` keeps it)."""


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed: a copy does
        shutil.copyfile(src, dst)


def _onnx_entry(entry: dict) -> dict:
    """The ONNX graph behind an entry (a TensorRT entry keeps it under `trt.onnx`)."""
    onnx = (entry.get("trt") or {}).get("onnx")
    return {**entry, **onnx} if onnx else entry


def variant_dir(out: Path, manifest: dict, swapped: dict[str, dict], dst: Path) -> Path:
    """An engine dir in `dst` running every component's ONNX graph, where `swapped` names
    replace a component's entry fields (their files, given by absolute path, are linked in)."""
    dst.mkdir(parents=True)
    comps = {}
    for name, entry in manifest["components"].items():
        e = {**_onnx_entry(entry), **swapped.get(name, {})}
        src = Path(e.pop("path", out / e["file"]))
        _link(src, dst / e["file"])
        ext = (e.get("external_data") or {}).get("file")
        if ext:
            _link(src.parent / ext, dst / ext)
        comps[name] = {**e, **mf.file_entry(dst, e["file"], ext), "backend": "onnx",
                       "trt": None}
    (dst / mf.MANIFEST).write_text(json.dumps({**manifest, "components": comps}))
    return dst


def psnr_at(engine_dir: Path, images: list[tuple[str, np.ndarray]], qfs=QUALITY_QFS
            ) -> dict[int, float]:
    """Mean PSNR (dB) of the restored held-out images per JPEG quality (the runtime's
    defaults: the file's coefficients, the gate)."""
    from sodiff.jpeg import compress
    from sodiff.metrics import psnr

    from runtime import Restorer
    from runtime.imageio import decode_image
    found = {}
    with Restorer(engine_dir, device="cpu") as r:
        for qf in qfs:
            scores = []
            for name, clean in images:
                img = decode_image(compress(clean, qf)[1], f"{name} at QF {qf}")
                scores.append(psnr(r.restore_info(img.array, img.qf, jpeg=img.jpeg)[0], clean))
            found[qf] = float(np.mean(scores))
    return found


def measure(out: Path, manifest: dict, fp32: dict[str, dict], precisions: dict[str, str],
            images: list[tuple[str, np.ndarray]], work: Path, log: Log) -> dict[str, dict]:
    """Per quantized component (`fp32`: its float32 graph's entry fields, with `path`), the
    manifest's `quality` entry: its PSNR loss against float32 with the others unchanged."""
    ref_dir = variant_dir(out, manifest, fp32, work / REFERENCE)
    ref = psnr_at(ref_dir, images)
    results = {}
    for name in fp32:
        others = {n: e for n, e in fp32.items() if n != name}
        quant = variant_dir(out, manifest, others, work / name)  # all ONNX, even for trt
        got = psnr_at(quant, images)
        loss = {qf: ref[qf] - got[qf] for qf in ref}
        bound = BOUNDS_DB[name][precisions[name]]
        worst = max(loss.values())
        results[name] = {"psnr_fp32": ref, "psnr": got, "loss_db": loss, "bound_db": bound,
                         "passed": worst <= bound, "images": [n for n, _ in images],
                         "checked_with": "onnxruntime-cpu"}
        log(f"[quality] {name} ({precisions[name]}): PSNR "
            + ", ".join(f"QF {qf}: {got[qf]:.3f} dB ({-loss[qf]:+.3f} against fp32)"
                        for qf in ref)
            + f" on {len(images)} held-out images; bound -{bound:.2f} dB "
            + ("ok" if worst <= bound else "EXCEEDED"))
    return results


def refusals(results: dict[str, dict], precisions: dict[str, str]) -> list[str]:
    """One line per component over its bound."""
    return [f"{n} in {precisions[n]} loses {max(r['loss_db'].values()):.3f} dB PSNR against "
            f"fp32 (bound {r['bound_db']:.2f} dB, QF {max(r['loss_db'], key=r['loss_db'].get)}"
            f", {len(r['images'])} held-out images)" for n, r in results.items()
            if not r["passed"]]


def check_whole(present: set[str], needed: tuple[str, ...], out: Path) -> None:
    """Refuse, before any work, 8-bit components whose dir will lack the rest of the pipeline
    (`needed`: the quality check restores images through all of it)."""
    missing = [c for c in needed if c not in present]
    if missing:
        raise ExportError(f"8-bit components are judged on restored images, which needs the "
                          f"whole pipeline in {out}: {', '.join(missing)} missing; export them "
                          f"too (without --components, or into a dir that holds them); "
                          f"nothing was written")


def judge_dir(manifest: dict, judge, precisions: dict[str, str], force: bool, out: Path,
              work: Path, log: Log) -> dict:
    """The 8-bit components' PSNR loss on the held-out images, in their entries; refuses the
    dir (its manifest removed) when one is over its bound, unless `force` (--force)."""
    results = measure(out, manifest, judge.fp32, precisions, judge.held_out,
                      work / "quality", log)
    comps = {n: {**e, "quantization": {**e["quantization"], "quality": results[n]}}
             if n in results else e for n, e in manifest["components"].items()}
    bad = refusals(results, precisions)
    if bad and not force:
        (out / mf.MANIFEST).unlink(missing_ok=True)
        raise QualityError("; ".join(bad) + "; nothing is usable in this dir: export those in "
                           "fp16 (e.g. --precision unet=fp16), calibrate on images like yours "
                           "(--calibration DIR), or keep them anyway with --force")
    for b in bad:
        log(f"[quality] kept with --force: {b}")
    return {**manifest, "components": comps}
