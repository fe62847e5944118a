"""Export options: one frozen dataclass of what the user asked for, the parsers of the CLI's
strings, and the limits they are held to. `export.plan.resolve_plan` validates them together
and resolves them once into the ExportPlan every stage takes."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sodiff.config import parse_timestep_mode

from .errors import OptionError
from .specs import QUANTIZED
from .targets import suggest

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
