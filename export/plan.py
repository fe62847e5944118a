"""The export plan: the user's ExportOptions resolved once into one frozen ExportPlan (target,
components with their precision, timestep mode, shapes, calibration and gate files), every
problem reported at once. The pipeline's stages take the plan, never the raw options.

Two layers: `resolve_plan` (the options alone, before any model loads) and
`ExportPlan.for_model` (image sizes against the loaded model's pad multiple)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from sodiff.config import PRESETS

from .errors import OptionError
from .options import (DEFAULT_QUANTIZED, MAX_BATCH, MAX_CALIBRATION, MAX_SIDE,
                      MIN_PREDICTOR_SIDE, ExportOptions, Size, parse_timestep)
from .samples import list_images
from .specs import COMPONENTS, QUANTIZED
from .targets import Target, get_target, suggest


@dataclass(frozen=True)
class ExportPlan:
    out: Path                                  # engine directory to write
    target: Target                             # the target table's entry (alias resolved)
    checkpoint: Path | None                    # checkpoint folder (None: bundled default)
    base: Path | None                          # SD2.1-base folder for external-base checkpoints
    preset: str | None                         # architecture of --random-weights
    random_weights: bool                       # seeded random init, no trained weights
    seed: int                                  # seed of random weights and random samples
    timestep_mode: str                         # "predicted" | "fixed" | "calibrated"
    fixed_tau: float | None                    # the fixed:N value (else None)
    components: tuple[str, ...]                # what this export writes, in pipeline order
    precision: Mapping[str, str]               # each written component's precision
    shape: Size | None                         # static image size asked for (None: SAIPE's)
    dynamic: tuple[Size, Size, Size] | None    # image size MIN, OPT, MAX asked for
    batch: tuple[int, int, int]                # batch MIN, OPT, MAX
    opset: int                                 # ONNX opset (8-bit components: at least 19)
    samples: int                               # random parity samples
    force: bool                                # rebuild unchanged components, keep over-bound
    timing_cache: Path | None                  # trt: cache file (None: ENGINE_DIR/timing.cache)
    calibration: Path | None                   # LQ images folder
    calibration_files: tuple[Path, ...]        # its images, sorted (empty without a folder)
    calibration_count: int                     # int8/fp8: JPEG crops to calibrate on
    gate_images: Path | None                   # clean images folder for the high-QF gate
    gate_files: tuple[Path, ...] | None        # its images (None: no folder given)
    sizes: tuple[Size, Size, Size] | None = None  # (min, opt, max) once `for_model` ran

    @property
    def mode_components(self) -> tuple[str, ...]:
        """Every component this timestep mode uses (the predictor only when tau is predicted)."""
        return _mode_components(self.timestep_mode)

    @property
    def quantized(self) -> dict[str, str]:
        """The 8-bit components and their precision."""
        return {n: p for n, p in self.precision.items() if p in QUANTIZED}

    def for_model(self, pad_multiple: int, saipe_size: int) -> "ExportPlan":
        """Model layer: the plan with its image sizes, each side a multiple of the model's
        `pad_multiple` (OptionError naming every size that is not)."""
        sizes = self.dynamic or (self.shape or (saipe_size, saipe_size),) * 3
        what = "--dynamic" if self.dynamic is not None else "--shape"
        smallest = max(pad_multiple, MIN_PREDICTOR_SIDE)
        problems = [f"{what} {h}x{w}: sides must be multiples of the model's pad_multiple "
                    f"{pad_multiple} and at least {smallest}"
                    for h, w in sorted(set(sizes))
                    if any(s % pad_multiple or s < smallest for s in (h, w))]
        if problems:
            raise OptionError("; ".join(problems))
        return dataclasses.replace(self, sizes=tuple(sizes))


def resolve_plan(opts: ExportOptions) -> ExportPlan:
    """The plan of `opts`; OptionError naming every option, or combination, that makes no
    sense. The calibration and gate folders are listed here (CalibrationError if empty)."""
    target = get_target(opts.target)  # raises with a suggestion
    problems: list[str] = []
    _check_source(opts, problems)
    mode, tau = _check_timestep(opts, problems)
    components = _check_components(opts, mode, problems)
    precision = _check_precision(opts, target, components, problems)
    _check_shapes(opts, target, problems)
    if opts.timing_cache is not None and "timing_cache" not in target.options:
        problems.append(f"--timing-cache is a TensorRT option; target {target.name} builds no "
                        f"engines")
    for flag, folder in (("--calibration", opts.calibration), ("--gate-images", opts.gate_images)):
        if folder is not None and not Path(folder).is_dir():
            problems.append(f"{flag} {folder}: no such folder")
    if problems:
        raise OptionError("; ".join(problems))
    return ExportPlan(
        out=Path(opts.out), target=target, checkpoint=opts.checkpoint, base=opts.base,
        preset=opts.preset, random_weights=opts.random_weights, seed=opts.seed,
        timestep_mode=mode, fixed_tau=tau, components=components,
        precision=MappingProxyType(precision), shape=opts.shape, dynamic=opts.dynamic,
        batch=opts.batch, opset=opts.opset, samples=opts.samples, force=opts.force,
        timing_cache=opts.timing_cache, calibration=opts.calibration,
        calibration_files=tuple(list_images(opts.calibration)) if opts.calibration else (),
        calibration_count=opts.calibration_count, gate_images=opts.gate_images,
        gate_files=tuple(list_images(opts.gate_images)) if opts.gate_images else None)


def _check_source(opts: ExportOptions, problems: list[str]) -> None:
    if opts.checkpoint is not None and (opts.preset or opts.random_weights):
        problems.append("--checkpoint loads trained weights; --preset/--random-weights build "
                        "an untrained model: give one or the other")
    if opts.random_weights and not opts.preset:
        problems.append("--random-weights needs --preset NAME (which architecture to build)")
    if opts.preset and opts.preset not in PRESETS:
        problems.append(f"unknown preset {opts.preset!r}{suggest(opts.preset, tuple(PRESETS))} "
                        f"(presets: {', '.join(PRESETS)})")
    if opts.preset and not opts.random_weights:
        problems.append(f"--preset {opts.preset} without --random-weights: a preset has no "
                        f"trained weights; add --random-weights, or pass --checkpoint DIR")
    if opts.base is not None and opts.checkpoint is None:
        problems.append("--base is only used with --checkpoint (checkpoints trained on a local "
                        "SD2.1-base folder)")


def _check_timestep(opts: ExportOptions, problems: list[str]) -> tuple[str, float | None]:
    try:
        mode, tau = parse_timestep(opts.timestep)
    except OptionError as e:
        problems.append(str(e))
        return "predicted", None
    if mode == "calibrated" and opts.calibration is None:
        problems.append("--timestep calibrated needs --calibration DIR (images whose median "
                        "predicted tau is baked)")
    if mode == "calibrated" and opts.random_weights:
        problems.append("--timestep calibrated with --random-weights: an untrained predictor "
                        "predicts the same tau for every image; use --timestep fixed:N")
    return mode, tau


def _check_components(opts: ExportOptions, mode: str, problems: list[str]) -> tuple[str, ...]:
    """The components to write, in pipeline order: those asked for, else the mode's."""
    for c in opts.components or ():
        if c not in COMPONENTS:
            problems.append(f"unknown component {c!r}{suggest(c, COMPONENTS)} (components: "
                            f"{', '.join(COMPONENTS)})")
        elif c == "predictor" and mode != "predicted":
            problems.append(f"component 'predictor' with --timestep {opts.timestep}: the "
                            f"predictor is dropped when tau is baked into the UNet")
    if opts.components is not None and not opts.components:
        problems.append("--components is empty")
    if opts.components is not None:
        return tuple(c for c in COMPONENTS if c in opts.components)
    return _mode_components(mode)


def _mode_components(mode: str) -> tuple[str, ...]:
    return tuple(c for c in COMPONENTS if mode == "predicted" or c != "predictor")


def _check_precision(opts: ExportOptions, target: Target, components: tuple[str, ...],
                     problems: list[str]) -> dict[str, str]:
    """Each component's precision: --precision (a global int8/fp8 only for its default set,
    the rest in the target's default), then the COMPONENT=PRECISION overrides."""
    if opts.precision is not None and opts.precision not in target.precisions:
        problems.append(f"--precision {opts.precision!r} is not available for target "
                        f"{target.name} (choose from {', '.join(target.precisions)})"
                        + suggest(opts.precision, target.precisions))
    exported = components if not problems else ()
    for comp, prec in opts.precision_overrides:
        if comp not in COMPONENTS:
            problems.append(f"--precision {comp}={prec}: unknown component"
                            + suggest(comp, COMPONENTS))
        elif exported and comp not in exported:
            problems.append(f"--precision {comp}={prec}: {comp} is not exported "
                            f"(exported: {', '.join(exported)})")
        if prec not in target.precisions:
            problems.append(f"--precision {comp}={prec}: not available for target "
                            f"{target.name} (choose from {', '.join(target.precisions)})")
    target_default = target.precisions[0]
    default = opts.precision or target_default
    result = {c: default if default not in QUANTIZED or c in DEFAULT_QUANTIZED.get(default, ())
              else target_default for c in components}
    result.update(dict(opts.precision_overrides))
    return result


def _check_bounds(opts: ExportOptions, problems: list[str]) -> None:
    sizes = [opts.shape] if opts.shape is not None else list(opts.dynamic or ())
    big = [f"{h}x{w}" for h, w in sizes if max(h, w) > MAX_SIDE]
    if big:
        problems.append(f"image size {', '.join(big)} is over {MAX_SIDE} px a side: such engines "
                        f"cannot be held in GPU memory and the runtime refuses them; export a "
                        f"smaller MAX (the runtime tiles larger images)")
    if len(opts.batch) == 3 and opts.batch[2] > MAX_BATCH:
        problems.append(f"--batch max {opts.batch[2]} is over {MAX_BATCH}: the runtime refuses "
                        f"such dirs; images are tiled, so a few tiles per call saturate a GPU")


def _check_shapes(opts: ExportOptions, target: Target, problems: list[str]) -> None:
    _check_bounds(opts, problems)
    if opts.shape is not None and opts.dynamic is not None:
        problems.append("--shape (static) and --dynamic (a range) exclude each other")
    if opts.dynamic is not None:
        lo, mid, hi = opts.dynamic
        if not all(lo[i] <= mid[i] <= hi[i] for i in (0, 1)):
            problems.append(f"--dynamic {lo}:{mid}:{hi}: expected MIN <= OPT <= MAX per side")
    lo, hi = target.opsets
    if not lo <= opts.opset <= hi:
        problems.append(f"--opset {opts.opset} is outside {lo}..{hi} for target {target.name}")
    if not 1 <= opts.calibration_count <= MAX_CALIBRATION:
        problems.append(f"--calibration-count {opts.calibration_count}: expected 1.."
                        f"{MAX_CALIBRATION} crops")
    if opts.samples < 1:
        problems.append(f"--samples {opts.samples}: parity needs at least 1 sample")
    if len(opts.batch) != 3 or not 1 <= opts.batch[0] <= opts.batch[1] <= opts.batch[2]:
        problems.append(f"--batch {opts.batch}: expected 1 <= MIN <= OPT <= MAX")
