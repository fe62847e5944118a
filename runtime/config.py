"""Constants of the engine-dir contract and the runtime's options (one frozen dataclass)."""
from __future__ import annotations

import re
from dataclasses import dataclass

MANIFEST = "manifest.json"
FORMAT = "sodiff-engine"
FORMAT_VERSIONS = (1,)           # engine-dir format versions this runtime reads

# Component I/O names fixed by docs/architecture.md; `timestep` is a UNet input only when the
# timestep is predicted (fixed/calibrated dirs bake it into the graph).
COMPONENT_IO = {
    "saipe": (("image",), ("prompt",)),
    "predictor": (("image",), ("timestep", "qf")),
    "vae_encoder": (("image",), ("latent",)),
    "unet": (("latent", "timestep", "prompt"), ("clean_latent",)),
    "vae_decoder": (("clean_latent",), ("image",)),
}
ALWAYS = ("saipe", "vae_encoder", "unet", "vae_decoder")
TIMESTEP_MODES = ("predicted", "fixed", "calibrated")
DTYPES = ("float32", "float16")
BACKENDS = ("onnx", "trt")       # a component's backend in the manifest

JPEG_BLOCK = 8                   # the JPEG block grid tiles and predictor crops stay aligned to
MIN_PREDICTOR_SIDE = 8           # the predictor's 8x8 stride-8 stem needs at least one block
HASH_CHUNK = 1 << 20             # bytes read at a time when hashing model files
RESIZE_FLOATS = 1 << 18          # floats of image rows SAIPE's resize converts at a time (a
#                                  band of rows: 21 of a 4096-wide image, 87,381 of a 1-wide one)
RESIZE_DENSE_TAPS = 1 << 20      # largest table of taps (outputs x taps each) SAIPE's resize
#                                  builds; sides with more (millions of pixels) go output by
#                                  output
NEUTRAL_CHECK_PIXELS = 1 << 20   # pixels compared at a time when testing R = G = B

# Bounds on what a manifest may claim (checked before anything is allocated). An export writes
# ~20 KB of manifest nested 6 deep; no model needs tiles wider than this or batches this large.
MAX_MANIFEST_BYTES = 1 << 20
MAX_MANIFEST_DEPTH = 32
MAX_ENGINE_SIDE = 16384          # pixels per side of the largest image an engine takes
MAX_ENGINE_BATCH = 256

# Image I/O
OUTPUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
# The most pixels a side each output format holds (JPEG's 16-bit header fields, libwebp's
# 14-bit ones; PNG's 31-bit fields are beyond any image the decompression guard lets in).
FORMAT_MAX_SIDE = {"PNG": 2 ** 31 - 1, "JPEG": 65535, "WEBP": 16383}
# write_image's temporary files: .NAME.PID.RANDOM.tmp beside the output (mkstemp's 8 letters)
TEMP_PATTERN = re.compile(r"\.(?:.+)\.(\d+)\.[A-Za-z0-9_]{8}\.tmp")
DEFAULT_QUALITY = 95             # JPEG/WebP output quality
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb limit (Image.MAX_IMAGE_PIXELS)
OUTPUT_SUFFIX = "_sodiff"        # outputs beside their inputs: photo.jpg -> photo_sodiff.png
# ITU-R BT.601 luma, PIL's RGB -> L weights: greyscale inputs are restored as RGB and mapped back.
LUMA = (0.299, 0.587, 0.114)

CHOICES_BACKEND = ("auto", "ort", "trt")
CHOICES_DEVICE = ("auto", "cpu", "cuda", "tensorrt")
CHOICES_TIMESTEP = ("model", "header")


@dataclass(frozen=True)
class RestoreOptions:
    """How a Restorer runs an engine dir (`Restorer(dir, RestoreOptions(...))`, or the same
    names as keywords: `Restorer(dir, tile=512)`). Fields:

    backend: "auto" (each component's backend from the manifest), "ort" or "trt".
    device: onnxruntime's provider: "auto" (CUDA when present), "cpu", "cuda" or "tensorrt".
    tile: tile side in pixels; None: the engines' largest shape.
    overlap: least overlap of neighbouring tiles in pixels; None: a quarter of the tile.
    timestep: "model" (the predictor, or the dir's fixed tau) or "header" (tau from the JPEG's
        quality factor, passed as `qf=`, through the manifest's QF-to-tau table).
    threads: onnxruntime intra-op threads; 0: onnxruntime decides.
    verify_hashes: sha256-check every model file when the dir is opened (sizes are always
        checked).
    tile_batch: tiles per encoder/UNet/decoder call; None: the engines' largest batch.
    io_binding: chain components through device-resident OrtValues (False: through the host).
    keep_colour: shift each restored tile's mean colour to the input tile's (a JPEG keeps
        block means; the UNet can add a cast). False: the UNet's output as it is.
    jpeg_constraint: when the input's JPEG tables are known (a JPEG file; `jpeg=` in the
        API), clip the output's block-DCT coefficients into the JPEG's quantization intervals,
        which hold the original's. False: never.
    gate: where the engine dir carries a measured high-QF gate, blend the output toward the
        JPEG's decode by its weight at the image's quality (runtime/gate.py). False: never.
    """

    backend: str = "auto"         # auto: each component's backend from the manifest; ort; trt
    device: str = "auto"          # onnxruntime provider: auto (CUDA when present), cpu, cuda,
    #                               tensorrt (onnxruntime's TensorRT provider)
    tile: int | None = None       # tile side in pixels; None: the engine's largest shape
    overlap: int | None = None    # tile overlap in pixels; None: a quarter of the tile
    timestep: str = "model"       # model: predictor or the manifest's fixed tau; header: tau
    #                               from the JPEG quantization tables' quality factor
    threads: int = 0              # onnxruntime intra-op threads; 0: onnxruntime decides
    verify_hashes: bool = True    # sha256-check every model file when the dir is opened
    tile_batch: int | None = None  # tiles per encoder/UNet/decoder call; None: the engines'
    #                               largest batch (manifest shapes.batch.max)
    io_binding: bool = True       # onnxruntime: chain components through IO-bound OrtValues
    #                               that stay on the device; False: every call copies through
    #                               the host (the plain session.run path, for comparisons)
    keep_colour: bool = True      # each tile's mean colour set to the input tile's (issue 13's
    #                               green cast); False: as the UNet restores it
    jpeg_constraint: bool = True  # where the input's JPEG tables are given, project the output
    #                               onto their quantization intervals (runtime/jpegqcs.py)
    gate: bool = True             # blend toward the JPEG's decode where the manifest's gate
    #                               says the model stops helping (runtime/gate.py)


def validate_options(opts: RestoreOptions) -> None:
    """Raise ValueError naming every option value that cannot work, whatever the engine."""
    problems = []
    if opts.backend not in CHOICES_BACKEND:
        problems.append(f"backend={opts.backend!r} (expected one of {', '.join(CHOICES_BACKEND)})")
    if opts.device not in CHOICES_DEVICE:
        problems.append(f"device={opts.device!r} (expected one of {', '.join(CHOICES_DEVICE)})")
    if opts.timestep not in CHOICES_TIMESTEP:
        problems.append(f"timestep={opts.timestep!r} (expected one of "
                        f"{', '.join(CHOICES_TIMESTEP)})")
    if opts.tile is not None and (not isinstance(opts.tile, int) or opts.tile < 1):
        problems.append(f"tile={opts.tile!r} (expected a positive number of pixels)")
    if opts.overlap is not None and (not isinstance(opts.overlap, int) or opts.overlap < 0):
        problems.append(f"overlap={opts.overlap!r} (expected pixels >= 0)")
    if opts.tile_batch is not None and (isinstance(opts.tile_batch, bool) or not isinstance(
            opts.tile_batch, int) or opts.tile_batch < 1):
        problems.append(f"tile_batch={opts.tile_batch!r} (expected a positive number of tiles)")
    if not isinstance(opts.io_binding, bool):
        problems.append(f"io_binding={opts.io_binding!r} (expected True or False)")
    for name in ("keep_colour", "jpeg_constraint", "gate"):
        if not isinstance(getattr(opts, name), bool):
            problems.append(f"{name}={getattr(opts, name)!r} (expected True or False)")
    if not isinstance(opts.threads, int) or opts.threads < 0:
        problems.append(f"threads={opts.threads!r} (expected an integer >= 0)")
    if problems:
        raise ValueError("invalid runtime options: " + "; ".join(problems))
