"""What 8-bit components cost in quality, and on this CPU in time: the bundled model exported
at each precision set, restored through the runtime (sodiff-run's defaults) on the test sets.

    python benchmarks/quantized.py                    # LIVE1_color + BSDS500/test, QF 10 and 40
    python benchmarks/quantized.py --limit 4 --out runs/q   # a quick look

Per variant: `sodiff-export` of the bundled checkpoint (dynamic 8:256:512, the demo's shapes;
8-bit components calibrated on the default set), then benchmarks/quality.py's engine mode; the
table gives mean PSNR/SSIM and the PSNR change against the fp32 dir. The UNet's CPU latency
(onnxruntime, one 256x256 tile, median of 10) shows what Q/DQ graphs cost on a CPU: a GPU
lever, measured here only for quality. Writes `<out>/<name>.json` and `.md`.
"""
from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import _common as C  # noqa: E402
from runtime.cliopts import CONTEXT_SETTINGS, version_option  # noqa: E402

# (name, --precision values): fp32 is the reference every other row is compared with.
VARIANTS = (("fp32", ()), ("unet int8", ("unet=int8",)), ("unet fp8", ("unet=fp8",)),
            ("int8 (unet + vae)", ("int8",)))
DYNAMIC = ((8, 8), (256, 256), (512, 512))


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label).strip("_")


def export_variant(out: Path, precisions: tuple[str, ...], log) -> Path:
    from export.options import ExportOptions, parse_precisions
    from export.pipeline import run_export
    default, overrides = parse_precisions(precisions)
    run_export(ExportOptions(out=out, dynamic=DYNAMIC, precision=default,
                             precision_overrides=overrides), log=log)
    return out


def unet_latency(engine: Path, repeats: int = 10) -> float:
    """Median ms of the UNet graph alone on one 256x256 tile (onnxruntime CPU)."""
    import onnxruntime as ort
    sess = ort.InferenceSession(str(engine / "unet.onnx"), providers=["CPUExecutionProvider"])
    feeds = {}
    for i in sess.get_inputs():
        dtype = np.float16 if "float16" in i.type else np.float32
        shape = [{"B": 1, "h": 32, "w": 32}.get(d, d) if isinstance(d, str) else d
                 for d in i.shape]
        feeds[i.name] = (np.full(shape, 500.0) if i.name == "timestep"
                         else np.random.default_rng(0).standard_normal(shape)).astype(dtype)
    sess.run(None, feeds)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def render(doc: dict) -> str:
    lines = [f"## 8-bit components: quality and CPU cost ({doc['created']})", "",
             f"- command: `{doc['command']}`", f"- machine: {doc['machine']['cpu']}",
             "- PSNR dB / SSIM means over images through the runtime (file coefficients, gate); "
             "change: PSNR against the fp32 row", ""]
    for set_name in doc["sets"]:
        lines += [f"### {set_name}", "", "| variant | precisions | QF | PSNR / SSIM | change | "
                  "UNet ms (CPU) |", "|:---|:---|---:|---:|---:|---:|"]
        for v in doc["variants"]:
            for qf in doc["qfs"]:
                r = v["summary"][set_name][str(qf)]
                delta = r["psnr"] - doc["variants"][0]["summary"][set_name][str(qf)]["psnr"]
                lines.append(f"| {v['name']} | {v['precisions']} | {qf} | {r['psnr']:.3f} / "
                             f"{r['ssim']:.4f} | {delta:+.3f} | {v['unet_ms']:.0f} |")
        lines.append("")
    return "\n".join(lines)


@version_option()
@click.command(context_settings=CONTEXT_SETTINGS)
@click.option("--data", type=click.Path(path_type=Path), default=C.SHARED_DATA,
              show_default=True)
@click.option("--sets", default="LIVE1_color,BSDS500/test", show_default=True)
@click.option("--qf", default="10,40", show_default=True)
@click.option("--limit", type=int, help="Only the first N images of each set.")
@click.option("--work", type=click.Path(path_type=Path), default=Path("runs/quantized"),
              show_default=True, help="Where the engine dirs are exported.")
@click.option("--out", type=click.Path(path_type=Path), default=C.RESULTS_DIR,
              show_default=True)
@click.option("--name", default="quantized_tiny", show_default=True)
def main(data, sets, qf, limit, work, out, name):
    """Export the bundled model per precision set and score each on the test sets."""
    from benchmarks.quality import QualitySettings, run_quality
    sets_t, qfs = tuple(sets.split(",")), tuple(int(q) for q in qf.split(","))
    doc = {"kind": "sodiff-quantized", "created": C.now_utc(),
           "command": shlex.join(["python", "benchmarks/quantized.py", *sys.argv[1:]]),
           "machine": C.machine_info("cpu"), "versions": C.versions(), "sets": list(sets_t),
           "qfs": list(qfs), "variants": []}
    for label, precisions in VARIANTS:
        engine = export_variant(work / _slug(label), precisions, lambda m: None)
        s = QualitySettings(mode="engine", checkpoint=None, base=None, engine=engine,
                            device="cpu", data=data, sets=sets_t, qfs=qfs, limit=limit, iqa=(),
                            grid_images=0, grid_qf=qfs[0], out=work / "quality",
                            name=_slug(label))
        q = run_quality(s, doc["command"])
        man = json.loads((engine / "manifest.json").read_text())
        doc["variants"].append({
            "name": label, "engine": str(engine),
            "precisions": ", ".join(f"{n}={c['precision']}" for n, c in
                                    man["components"].items() if c["precision"] != "fp32")
            or "all fp32",
            "summary": {st: {k: {"psnr": v["restored"]["psnr"], "ssim": v["restored"]["ssim"]}
                             for k, v in q["summary"][st].items()} for st in sets_t},
            "export_quality": {n: c.get("quantization", {}).get("quality")
                               for n, c in man["components"].items() if "quantization" in c},
            "unet_ms": unet_latency(engine)})
        C.write_json(out / f"{name}.json", doc)
        click.echo(f"{label}: done", err=True)
    C.write_text(out / f"{name}.md", render(doc))
    click.echo(str(out / f"{name}.md"))


if __name__ == "__main__":
    main()
