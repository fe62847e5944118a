"""Read and check an engine dir's `manifest.json` (docs/engine-dir.md), without torch or sodiff.

Every refusal is an `EngineDirError` whose message names the dir, the reason and the fix.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from .config import (ALWAYS, BACKENDS, COMPONENT_IO, DTYPES, FORMAT, FORMAT_VERSIONS, HASH_CHUNK,
                     MANIFEST, TIMESTEP_MODES)
from .errors import EngineDirError

REEXPORT = "re-export the dir with sodiff-export"


@dataclass(frozen=True)
class TensorSpec:
    name: str                     # the graph's tensor name
    dtype: str                    # float32 or float16
    shape: tuple                  # ints for fixed dims, strings for symbolic ones (B, H, W, h, w)


@dataclass(frozen=True)
class ComponentSpec:
    name: str                     # saipe, predictor, vae_encoder, unet or vae_decoder
    path: Path                    # the model file, inside the dir
    sha256: str                   # its recorded hash
    external: tuple[Path, str] | None  # ONNX external-data file and its hash
    backend: str                  # onnx or trt
    precision: str                # fp32 or fp16 (informational: dtypes drive the casts)
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    trt: dict[str, Any] | None    # engines: version, compute_capability, profiles

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)


@dataclass(frozen=True)
class Manifest:
    root: Path                    # the engine dir
    timestep_mode: str            # predicted, fixed or calibrated
    timestep_value: float | None  # the baked tau of fixed/calibrated dirs
    qf_table: tuple[tuple[float, ...], tuple[float, ...]] | None  # (qf, tau), qf ascending
    saipe_size: int               # SAIPE's square input side
    pad_multiple: int             # encoder input sides are multiples of this
    vae_factor: int               # pixels per latent cell
    latent_channels: int
    static: bool                  # True: every image-sized input is exactly `max_shape`
    min_shape: tuple[int, int]    # (H, W) the engines accept at least
    max_shape: tuple[int, int]    # (H, W) the engines accept at most
    components: dict[str, ComponentSpec]
    raw: dict[str, Any]           # the parsed JSON, for reports

    @property
    def predicted(self) -> bool:
        return self.timestep_mode == "predicted"


def _fail(root: Path, reason: str, fix: str) -> EngineDirError:
    return EngineDirError(f"engine dir {root}: {reason}; {fix}")


def read_manifest(root: str | Path, verify_hashes: bool = True) -> Manifest:
    """Parse and check `root/manifest.json`: format, version, fields, file paths and hashes."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise EngineDirError(f"engine dir {root} does not exist or is not a folder; pass the "
                             f"folder sodiff-export wrote")
    data = _load_json(root)
    fmt, version = data.get("format"), data.get("format_version")
    if fmt != FORMAT:
        raise _fail(root, f"{MANIFEST} has format {fmt!r}, not {FORMAT!r}",
                    "pass a dir written by sodiff-export")
    if version not in FORMAT_VERSIONS:
        raise _fail(root, f"format_version {version!r} is not supported (this runtime reads "
                          f"{', '.join(map(str, FORMAT_VERSIONS))})",
                    "upgrade sodiff-run or re-export the dir with a matching sodiff-export")
    try:
        manifest = _parse(root, data)
    except (KeyError, TypeError, ValueError) as e:
        raise _fail(root, f"{MANIFEST} is malformed ({e.__class__.__name__}: {e})",
                    REEXPORT) from None
    _check_files(manifest, verify_hashes)
    return manifest


def _load_json(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not path.is_file():
        raise _fail(root, f"no {MANIFEST} (an unfinished or interrupted export)",
                    "run sodiff-export again to completion")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _fail(root, f"{MANIFEST} is not valid JSON ({e})", REEXPORT) from None
    if not isinstance(data, dict):
        raise _fail(root, f"{MANIFEST} is not a JSON object", REEXPORT)
    return data


def _pos_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what}={value!r} must be a positive integer")
    return value


def _hw(value: Any, what: str) -> tuple[int, int]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"{what}={value!r} must be [H, W]")
    return _pos_int(value[0], what), _pos_int(value[1], what)


def _parse(root: Path, d: dict[str, Any]) -> Manifest:
    ts, image, shapes = d["timestep"], d["image"], d["shapes"]
    mode = ts["mode"]
    if mode not in TIMESTEP_MODES:
        raise ValueError(f"timestep.mode={mode!r} must be one of {', '.join(TIMESTEP_MODES)}")
    value = None if mode == "predicted" else float(ts["value"])
    lo, hi = _hw(shapes["min"], "shapes.min"), _hw(shapes["max"], "shapes.max")
    if lo[0] > hi[0] or lo[1] > hi[1]:
        raise ValueError(f"shapes.min={list(lo)} exceeds shapes.max={list(hi)}")
    if shapes["mode"] not in ("static", "dynamic"):
        raise ValueError(f"shapes.mode={shapes['mode']!r} must be static or dynamic")
    m = _pos_int(image["pad_multiple"], "image.pad_multiple")
    if hi[0] % m or hi[1] % m:
        raise ValueError(f"shapes.max={list(hi)} is not a multiple of pad_multiple={m}")
    wanted = ALWAYS + (("predictor",) if mode == "predicted" else ())
    comps = d["components"]
    missing = [c for c in wanted if c not in comps]
    if missing:
        raise ValueError(f"components {missing} are missing (timestep mode {mode})")
    return Manifest(
        root=root, timestep_mode=mode, timestep_value=value, qf_table=_qf_table(ts.get("qf_table")),
        saipe_size=_pos_int(image["saipe_size"], "image.saipe_size"), pad_multiple=m,
        vae_factor=_pos_int(image["vae_factor"], "image.vae_factor"),
        latent_channels=_pos_int(image["latent_channels"], "image.latent_channels"),
        static=shapes["mode"] == "static" or lo == hi, min_shape=lo, max_shape=hi,
        components={c: _component(root, c, comps[c], mode) for c in wanted}, raw=d)


def _qf_table(t: Any) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    if t is None:
        return None
    qf, tau = tuple(float(v) for v in t["qf"]), tuple(float(v) for v in t["tau"])
    if len(qf) < 1 or len(qf) != len(tau) or list(qf) != sorted(set(qf)):
        raise ValueError("timestep.qf_table needs equally long qf and tau lists, qf strictly "
                         "ascending")
    return qf, tau


def _tensors(items: Any, names: tuple[str, ...], what: str) -> tuple[TensorSpec, ...]:
    specs = tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in items)
    if tuple(sorted(s.name for s in specs)) != tuple(sorted(names)):
        raise ValueError(f"{what} are {[s.name for s in specs]}, expected {list(names)}")
    for s in specs:
        if s.dtype not in DTYPES:
            raise ValueError(f"{what} {s.name} has dtype {s.dtype!r}, expected one of {DTYPES}")
    return specs


def _component(root: Path, name: str, c: dict[str, Any], mode: str) -> ComponentSpec:
    ins, outs = COMPONENT_IO[name]
    if name == "unet" and mode != "predicted":
        ins = tuple(i for i in ins if i != "timestep")
    if c["backend"] not in BACKENDS:
        raise ValueError(f"components.{name}.backend={c['backend']!r} must be onnx or trt")
    ext = c.get("external_data")
    return ComponentSpec(
        name=name, path=safe_path(root, c["file"], f"components.{name}.file"),
        sha256=str(c["sha256"]),
        external=None if ext is None else (
            safe_path(root, ext["file"], f"components.{name}.external_data.file"),
            str(ext["sha256"])),
        backend=c["backend"], precision=str(c.get("precision", "fp32")),
        inputs=_tensors(c["inputs"], ins, f"components.{name}.inputs"),
        outputs=_tensors(c["outputs"], outs, f"components.{name}.outputs"),
        trt=c.get("trt"))


def safe_path(root: Path, rel: Any, what: str) -> Path:
    """`root/rel`, refused (ValueError) when `rel` is absolute, climbs out with `..`, or is a
    link whose target lies outside `root`."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        raise ValueError(f"{what}={rel!r} is not a plain relative file name")
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or rel.startswith("~"):
        raise ValueError(f"{what}={rel!r} leaves the engine dir (file names must stay inside it)")
    full = root / rel
    try:
        inside = full.resolve().is_relative_to(root.resolve())
    except OSError as e:  # a link loop
        raise ValueError(f"{what}={rel!r} cannot be resolved ({e})") from None
    if not inside:
        raise ValueError(f"{what}={rel!r} is a link to {full.resolve()}, outside the engine dir")
    return full


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _check_files(manifest: Manifest, verify_hashes: bool) -> None:
    root = manifest.root
    for comp in manifest.components.values():
        files = [(comp.path, comp.sha256)] + ([comp.external] if comp.external else [])
        for path, digest in files:
            rel = path.relative_to(root)
            if not path.is_file():
                raise _fail(root, f"{comp.name}'s file {rel} is missing",
                            "copy the complete dir, or " + REEXPORT)
            if verify_hashes and sha256_file(path) != digest:
                raise _fail(root, f"{rel} does not match its sha256 in {MANIFEST} (modified, "
                                  f"truncated or swapped)", "copy the file again, or " + REEXPORT)
