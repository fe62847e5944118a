"""Export options: one frozen dataclass, parsers for the CLI's strings, and the validation of
every combination (option layer: `validate_options`; model layer: `validate_for_model`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sodiff.config import PRESETS, parse_timestep_mode

from .errors import OptionError
from .specs import COMPONENTS, QUANTIZED
from .targets import get_target, suggest

TIMESTEP_MODES = ("predicted", "fixed", "calibrated")
PRECISIONS = ("fp32", "fp16", *QUANTIZED)
# What a global `--precision int8|fp8` quantizes; the rest stays in the target's default
# precision. The anchors' set is the UNet, and the VAE where its bound holds: int8 VAE does on
# the bundled model, fp8 VAE loses over 1 dB (benchmarks/results/quantized_tiny.md).
DEFAULT_QUANTIZED = {"int8": ("unet", "vae_encoder", "vae_decoder"), "fp8": ("unet",)}
MAX_CALIBRATION = 4096
MIN_PREDICTOR_SIDE = 8  # the predictor's stem is one 8x8 JPEG block
# The largest engines worth building: the runtime refuses dirs beyond these (runtime/config.py
# MAX_ENGINE_SIDE, MAX_ENGINE_BATCH) and tiles larger images through smaller engines anyway;
# an SD2.1 UNet at 16384 px already needs ~100 GB of activations per image.
MAX_SIDE = 16384
MAX_BATCH = 256

Size = tuple[int, int]  # (H, W)


@dataclass(frozen=True)
class ExportOptions:
    out: Path                                  # engine directory to write
    target: str = "onnx"                       # a target name or alias (targets.TARGETS)
    checkpoint: Path | None = None             # checkpoint folder (None: bundled default)
    base: Path | None = None                   # SD2.1-base folder for external-base checkpoints
    preset: str | None = None                  # architecture for --random-weights
    random_weights: bool = False               # seeded random init: latency work, no weights
    seed: int = 0                              # seed of random weights and random samples
    timestep: str = "predicted"                # "predicted" | "fixed:N" | "calibrated"
    calibration: Path | None = None            # LQ images: calibrated tau, parity, QF table,
    #                                            int8/fp8 calibration
    calibration_count: int = 64                # int8/fp8: JPEG crops to calibrate on
    precision: str | None = None               # every component's precision (None: target's)
    precision_overrides: tuple[tuple[str, str], ...] = ()  # (component, precision) pairs
    shape: Size | None = None                  # static image size (None: SAIPE's input size)
    dynamic: tuple[Size, Size, Size] | None = None  # image size MIN, OPT, MAX (profiles)
    batch: tuple[int, int, int] = (1, 1, 1)    # batch MIN, OPT, MAX
    components: tuple[str, ...] | None = None  # subset (None: all the timestep mode needs)
    opset: int = 17                            # ONNX opset
    samples: int = 2                           # random parity samples (real ones come extra)
    force: bool = False                        # rebuild even components whose inputs match
    timing_cache: Path | None = None           # trt: cache file (None: ENGINE_DIR/timing.cache)
    gate_images: Path | None = None            # clean images to measure the high-QF gate on
    #                                            (None: the checkpoint's gate.json, if any)


def parse_size(text: str, what: str) -> Size:
    """`512` -> (512, 512); `512x768` -> (512, 768) (H x W)."""
    parts = text.lower().split("x")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        nums = []
    if len(nums) not in (1, 2) or min(nums, default=0) <= 0:
        raise OptionError(f"{what} {text!r}: expected a positive side like 512 or HxW like "
                          f"512x768")
    return (nums[0], nums[-1])


def parse_dynamic(text: str) -> tuple[Size, Size, Size]:
    """`MIN:OPT:MAX`, each a side or HxW."""
    parts = text.split(":")
    if len(parts) != 3:
        raise OptionError(f"--dynamic {text!r}: expected MIN:OPT:MAX, e.g. 256:512:1024")
    return tuple(parse_size(p, "--dynamic") for p in parts)  # type: ignore[return-value]


def parse_batch(text: str) -> tuple[int, int, int]:
    """`N` or `MIN:OPT:MAX`."""
    try:
        nums = [int(p) for p in text.split(":")]
    except ValueError:
        nums = []
    if len(nums) == 1:
        nums = nums * 3
    if len(nums) != 3 or min(nums) < 1 or not nums[0] <= nums[1] <= nums[2]:
        raise OptionError(f"--batch {text!r}: expected N or MIN:OPT:MAX with 1 <= MIN <= OPT "
                          f"<= MAX")
    return tuple(nums)  # type: ignore[return-value]


def parse_precisions(values: tuple[str, ...] | list[str]) -> tuple[str | None,
                                                                    tuple[tuple[str, str], ...]]:
    """`--precision fp16 --precision vae_decoder=fp32` -> ('fp16', (('vae_decoder', 'fp32'),))."""
    default, overrides = None, []
    for v in values:
        name, sep, prec = v.partition("=")
        if not sep:
            if default is not None and default != v:
                raise OptionError(f"--precision given twice ({default!r} and {v!r}); use "
                                  f"COMPONENT=PRECISION for per-component overrides")
            default = v
        else:
            overrides.append((name.strip(), prec.strip()))
    return default, tuple(overrides)


def parse_timestep(text: str) -> tuple[str, float | None]:
    """('predicted', None) | ('fixed', N) | ('calibrated', None)."""
    if text == "calibrated":
        return "calibrated", None
    if text == "predicted" or text.startswith("fixed:"):
        try:
            value = parse_timestep_mode(text)
        except ValueError as e:
            raise OptionError(f"--timestep: {e}") from None
        return ("predicted", None) if value is None else ("fixed", value)
    raise OptionError(f"--timestep {text!r}: expected predicted, fixed:N or calibrated"
                      + suggest(text, TIMESTEP_MODES))


def components_for(opts: ExportOptions) -> tuple[str, ...]:
    """The components this export writes, in pipeline order."""
    mode, _ = parse_timestep(opts.timestep)
    default = tuple(c for c in COMPONENTS if mode == "predicted" or c != "predictor")
    if opts.components is None:
        return default
    return tuple(c for c in COMPONENTS if c in opts.components)


def precision_of(opts: ExportOptions) -> dict[str, str]:
    """Each exported component's precision, overrides applied."""
    target_default = get_target(opts.target).precisions[0]
    default = opts.precision or target_default
    result = {c: default if default not in QUANTIZED or c in DEFAULT_QUANTIZED[default]
              else target_default for c in components_for(opts)}
    result.update(dict(opts.precision_overrides))
    return result


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


def _check_timestep(opts: ExportOptions, problems: list[str]) -> str:
    try:
        mode, _ = parse_timestep(opts.timestep)
    except OptionError as e:
        problems.append(str(e))
        return "predicted"
    if mode == "calibrated" and opts.calibration is None:
        problems.append("--timestep calibrated needs --calibration DIR (images whose median "
                        "predicted tau is baked)")
    if mode == "calibrated" and opts.random_weights:
        problems.append("--timestep calibrated with --random-weights: an untrained predictor "
                        "predicts the same tau for every image; use --timestep fixed:N")
    return mode


def _check_components(opts: ExportOptions, mode: str, problems: list[str]) -> None:
    for c in opts.components or ():
        if c not in COMPONENTS:
            problems.append(f"unknown component {c!r}{suggest(c, COMPONENTS)} (components: "
                            f"{', '.join(COMPONENTS)})")
        elif c == "predictor" and mode != "predicted":
            problems.append(f"component 'predictor' with --timestep {opts.timestep}: the "
                            f"predictor is dropped when tau is baked into the UNet")
    if opts.components is not None and not opts.components:
        problems.append("--components is empty")


def _check_precision(opts: ExportOptions, target, problems: list[str]) -> None:
    if opts.precision is not None and opts.precision not in target.precisions:
        problems.append(f"--precision {opts.precision!r} is not available for target "
                        f"{target.name} (choose from {', '.join(target.precisions)})"
                        + suggest(opts.precision, target.precisions))
    exported = components_for(opts) if not problems else ()
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


def _check_shapes(opts: ExportOptions, target, problems: list[str]) -> None:
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


def validate_options(opts: ExportOptions) -> None:
    """Raise OptionError naming every option, or combination, that makes no sense."""
    target = get_target(opts.target)  # raises with a suggestion
    problems: list[str] = []
    _check_source(opts, problems)
    mode = _check_timestep(opts, problems)
    _check_components(opts, mode, problems)
    _check_precision(opts, target, problems)
    _check_shapes(opts, target, problems)
    if opts.timing_cache is not None and "timing_cache" not in target.options:
        problems.append(f"--timing-cache is a TensorRT option; target {target.name} builds no "
                        f"engines")
    for flag, folder in (("--calibration", opts.calibration), ("--gate-images", opts.gate_images)):
        if folder is not None and not Path(folder).is_dir():
            problems.append(f"{flag} {folder}: no such folder")
    if problems:
        raise OptionError("; ".join(problems))


def image_sizes(opts: ExportOptions, saipe_size: int) -> tuple[Size, Size, Size]:
    """(min, opt, max) image sizes the engines accept."""
    if opts.dynamic is not None:
        return opts.dynamic
    size = opts.shape or (saipe_size, saipe_size)
    return size, size, size


def validate_for_model(opts: ExportOptions, pad_multiple: int, saipe_size: int) -> None:
    """Model layer: image sizes must be multiples of the model's `pad_multiple`."""
    problems = []
    what = "--dynamic" if opts.dynamic is not None else "--shape"
    smallest = max(pad_multiple, MIN_PREDICTOR_SIDE)
    for size in sorted(set(image_sizes(opts, saipe_size))):
        bad = [s for s in size if s % pad_multiple or s < smallest]
        if bad:
            problems.append(f"{what} {size[0]}x{size[1]}: sides must be multiples of the "
                            f"model's pad_multiple {pad_multiple} and at least {smallest}")
    if problems:
        raise OptionError("; ".join(problems))
