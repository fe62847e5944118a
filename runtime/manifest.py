"""Read and check an engine dir's `manifest.json` (docs/engine-dir.md), without torch or sodiff.

Every refusal is an `EngineDirError` whose message names the dir, the reason and the fix.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from .config import (ALWAYS, BACKENDS, COMPONENT_IO, DTYPES, FORMAT, FORMAT_VERSIONS, HASH_CHUNK,
                     MANIFEST, MAX_ENGINE_BATCH, MAX_ENGINE_SIDE, MAX_MANIFEST_BYTES,
                     MAX_MANIFEST_DEPTH, TIMESTEP_MODES)
from .errors import EngineDirError
from .gate import Gate

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
    sizes: tuple[tuple[Path, int], ...] = ()  # recorded byte sizes of its files (newer exports)

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
    batch: tuple[int, int] = (1, 1)  # (min, max) batch the engines take
    gate: Gate | None = None      # the measured high-QF gate (runtime/gate.py); None: none

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
    if type(version) is not int or version not in FORMAT_VERSIONS:  # True == 1: not a version
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
    try:
        path = safe_path(root, MANIFEST, MANIFEST)
    except ValueError as e:
        raise _fail(root, str(e), "copy the dir with its own manifest.json") from None
    if not path.is_file():
        raise _fail(root, f"no {MANIFEST} (an unfinished or interrupted export)",
                    "run sodiff-export again to completion")
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise _fail(root, f"{MANIFEST} is {size / 2 ** 20:.1f} MiB, more than any export writes "
                          f"(at most {MAX_MANIFEST_BYTES // 2 ** 20} MiB)", REEXPORT)
    try:
        text = path.read_text(encoding="utf-8")
        depth = json_depth(text)
        if depth > MAX_MANIFEST_DEPTH:
            raise ValueError(f"nested {depth} levels deep (an export nests at most "
                             f"{MAX_MANIFEST_DEPTH})")
        data = json.loads(text)
    except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, 5000-digit numbers
        raise _fail(root, f"{MANIFEST} is not valid JSON ({str(e).splitlines()[0]})",
                    REEXPORT) from None
    if not isinstance(data, dict):
        raise _fail(root, f"{MANIFEST} is not a JSON object", REEXPORT)
    return data


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACKET = re.compile(r"[\[\]{}]")


def json_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in JSON `text`, counted without parsing it
    (strings removed first), so a hostile file cannot recurse the parser."""
    depth = deepest = 0
    for m in _BRACKET.finditer(_STRING.sub('""', text)):
        depth += 1 if m.group() in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def _pos_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what}={value!r} must be a positive integer")
    return value


def _hw(value: Any, what: str) -> tuple[int, int]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"{what}={value!r} must be [H, W]")
    h, w = _pos_int(value[0], what), _pos_int(value[1], what)
    if max(h, w) > MAX_ENGINE_SIDE:
        raise ValueError(f"{what}={[h, w]} is beyond any engine ({MAX_ENGINE_SIDE} px a side at "
                         f"most; re-export with a smaller --dynamic MAX)")
    return h, w


def _batch(shapes: dict[str, Any]) -> tuple[int, int]:
    b = shapes.get("batch", {"min": 1, "max": 1})
    if not isinstance(b, dict):
        raise ValueError(f"shapes.batch={b!r} must be an object with min and max")
    lo, hi = _pos_int(b["min"], "shapes.batch.min"), _pos_int(b["max"], "shapes.batch.max")
    if lo > hi or hi > MAX_ENGINE_BATCH:
        raise ValueError(f"shapes.batch.min={lo}, shapes.batch.max={hi}: need min <= max <= "
                         f"{MAX_ENGINE_BATCH}")
    return lo, hi


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
    man = Manifest(
        root=root, timestep_mode=mode, timestep_value=value, qf_table=_qf_table(ts.get("qf_table")),
        saipe_size=_pos_int(image["saipe_size"], "image.saipe_size"), pad_multiple=m,
        vae_factor=_pos_int(image["vae_factor"], "image.vae_factor"),
        latent_channels=_pos_int(image["latent_channels"], "image.latent_channels"),
        static=shapes["mode"] == "static" or lo == hi, min_shape=lo, max_shape=hi,
        components={c: _component(root, c, comps[c], mode) for c in wanted}, raw=d,
        batch=_batch(shapes), gate=None if d.get("gate") is None else Gate.from_dict(d["gate"]))
    _check_agreement(man)
    return man


def _fixed(spec: ComponentSpec, tensor: str, axis: int) -> int | None:
    """A tensor's dim when the manifest fixes it (an int), else None (a symbol)."""
    shape = next(t.shape for t in (*spec.inputs, *spec.outputs) if t.name == tensor)
    return shape[axis] if axis < len(shape) and isinstance(shape[axis], int) else None


def _check_agreement(man: Manifest) -> None:
    """The components' fixed dims must agree with the image fields and with each other: a
    wrong saipe_size, latent_channels or channel count would fail every image one by one."""
    c, want = man.components, []
    want += [(f"image.saipe_size={man.saipe_size}", _fixed(c["saipe"], "image", ax),
              man.saipe_size, f"saipe's image input dim {ax}") for ax in (2, 3)]
    for name, tensor in (("vae_encoder", "latent"), ("unet", "latent"), ("unet", "clean_latent"),
                         ("vae_decoder", "clean_latent")):
        want.append((f"image.latent_channels={man.latent_channels}", _fixed(c[name], tensor, 1),
                     man.latent_channels, f"{name}'s {tensor} channels"))
    for name in ("vae_encoder", "vae_decoder", "saipe") + (("predictor",) if man.predicted else ()):
        want.append(("3 colour channels", _fixed(c[name], "image", 1), 3,
                     f"{name}'s image channels"))
    for field, got, expected, what in want:
        if got is not None and got != expected:
            raise ValueError(f"{what} is {got}, but {field}")
    for t in c["unet"].inputs:
        if t.name == "timestep" and t.dtype != "float32":
            raise ValueError(f"unet's timestep input has dtype {t.dtype}; tau is float32")


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
        trt=c.get("trt"), sizes=_sizes(root, name, c))


def _sizes(root: Path, name: str, c: dict[str, Any]) -> tuple[tuple[Path, int], ...]:
    """(file, bytes) of the entry and its external data where the manifest records them."""
    found = []
    for entry, what in ((c, f"components.{name}"), (c.get("external_data"),
                                                     f"components.{name}.external_data")):
        if isinstance(entry, dict) and "bytes" in entry:
            size = entry["bytes"]
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise ValueError(f"{what}.bytes={size!r} must be a byte count")
            found.append((safe_path(root, entry["file"], f"{what}.file"), size))
    return tuple(found)


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
    except (OSError, RuntimeError) as e:  # a link loop (Python 3.11 raises RuntimeError)
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
            size = dict(comp.sizes).get(path)  # the hash covers it; without one, the size
            if not verify_hashes and size is not None and path.stat().st_size != size:
                raise _fail(root, f"{rel} has {path.stat().st_size} bytes, {MANIFEST} records "
                                  f"{size} (truncated or modified)",
                            "copy the file again, or " + REEXPORT)
            if verify_hashes and sha256_file(path) != digest:
                raise _fail(root, f"{rel} does not match its sha256 in {MANIFEST} (modified, "
                                  f"truncated or swapped)", "copy the file again, or " + REEXPORT)
