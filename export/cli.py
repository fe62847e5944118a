"""`sodiff-export`: a thin click front end of `export.pipeline.run_export`."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from runtime.cliopts import CONTEXT_SETTINGS, needs_extra, version_option
from sodiff.config import PRESETS

from .errors import ExportError
from .options import (ExportOptions, parse_batch, parse_dynamic, parse_precisions,
                      parse_size)
from .specs import COMPONENTS
from .targets import TARGETS, DEFAULT_OPSET

_TARGET_HELP = "; ".join(f"{t.name} ({', '.join(t.aliases)}): {t.summary}" for t in TARGETS)


@version_option()
@click.command(context_settings=CONTEXT_SETTINGS)
@click.option("--checkpoint", type=click.Path(path_type=Path),
              help="Checkpoint folder (default: the bundled weights/tiny).")
@click.option("--base", type=click.Path(path_type=Path),
              help="Local SD2.1-base folder, for checkpoints trained on one.")
@click.option("--preset", help=f"Architecture to build with --random-weights "
                                f"({', '.join(PRESETS)}).")
@click.option("--random-weights", is_flag=True,
              help="Seeded random weights (latency work without a checkpoint).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of random weights and random samples.")
@click.option("--target", default="onnx", show_default=True, help=_TARGET_HELP)
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Engine directory to write.")
@click.option("--timestep", default="predicted", show_default=True,
              help="predicted | fixed:N | calibrated.")
@click.option("--calibration", type=click.Path(path_type=Path),
              help="Folder of LQ images: calibrated tau, real parity samples, QF table.")
@click.option("--precision", multiple=True,
              help="fp32 | fp16 | int8 | fp8 (default: fp32 for onnx, fp16 for trt); int8 "
                   "and fp8 quantize the UNet (docs/export.md); repeat with "
                   "COMPONENT=PRECISION to override one, e.g. vae_decoder=fp32.")
@click.option("--calibration-count", type=int, default=64, show_default=True,
              help="int8/fp8: JPEG crops the 8-bit components are calibrated on (from "
                   "--calibration, else scikit-image's photos).")
@click.option("--shape", help="Static image size: 512 or HxW (default: SAIPE's input size).")
@click.option("--dynamic", help="Image size range MIN:OPT:MAX (TensorRT profiles), e.g. "
                                "256:512:1024.")
@click.option("--batch", default="1", show_default=True, help="Batch N or MIN:OPT:MAX.")
@click.option("--components", help=f"Comma-separated subset of {','.join(COMPONENTS)}.")
@click.option("--opset", type=int, default=DEFAULT_OPSET, show_default=True,
              help="ONNX opset.")
@click.option("--samples", type=int, default=2, show_default=True,
              help="Random parity samples (plus up to as many calibration images).")
@click.option("--timing-cache", type=click.Path(path_type=Path),
              help="TensorRT timing cache (default: ENGINE_DIR/timing.cache).")
@click.option("--force", is_flag=True, help="Rebuild components whose inputs did not change, "
                                           "and keep 8-bit components over their quality bound.")
@click.option("--gate-images", type=click.Path(path_type=Path),
              help="Folder of clean images to measure the high-QF gate on with the new "
                   "engines (default: the checkpoint's gate.json, if it has one).")
def main(checkpoint, base, preset, random_weights, seed, target, out, timestep, calibration,
         precision, calibration_count, shape, dynamic, batch, components, opset, samples, timing_cache, force,
         gate_images):
    """Export a SODiff model to an engine directory (ONNX graphs or TensorRT engines and a
    manifest.json for sodiff-run)."""
    # diffusers pulls in transformers, whose import-time notices are noise for this tool.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    with needs_extra("sodiff-export", "export"):  # a runtime-only install has no onnx/torch
        from .pipeline import run_export
        try:
            default_prec, overrides = parse_precisions(precision)
            opts = ExportOptions(
                out=out, target=target, checkpoint=checkpoint, base=base, preset=preset,
                random_weights=random_weights, seed=seed, timestep=timestep,
                calibration=calibration, calibration_count=calibration_count,
                precision=default_prec, precision_overrides=overrides,
                shape=parse_size(shape, "--shape") if shape else None,
                dynamic=parse_dynamic(dynamic) if dynamic else None, batch=parse_batch(batch),
                components=tuple(c.strip() for c in components.split(",") if c.strip())
                if components is not None else None,
                opset=opset, samples=samples, force=force, timing_cache=timing_cache,
                gate_images=gate_images)
            path = run_export(opts, log=lambda m: click.echo(m, err=True))
        except ExportError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
    click.echo(str(path))


if __name__ == "__main__":
    main()
