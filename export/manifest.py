"""The engine directory's `manifest.json` (docs/engine-dir.md): built from the export's
results and written last, atomically (temp file + rename), so a crashed export leaves a folder
without a manifest, which the runtime refuses."""
from __future__ import annotations

import hashlib
import json
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import OutputDirError

FORMAT = "sodiff-engine"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
HASH_CHUNK = 1 << 24

# Everything an export writes; any other file in an existing output folder is foreign.
_OURS = re.compile(r"^(manifest\.json|timing\.cache|[a-z_]+\.onnx(\.data)?|[a-z_]+\.trt[\w.]+"
                   r"\.plan|\.raw-.*|\.manifest\.json\..*|\.[a-z_]+\.trt[\w.]+\.plan\.tmp)$")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_files(paths: list[Path]) -> str:
    """One hash over several files in order (the checkpoint: sodiff.json + model.safetensors)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def source_hash(parts: dict[str, Any]) -> str:
    """Hash of everything an exported file depends on (skip re-exports when unchanged)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def check_out_dir(out: Path) -> None:
    """An output folder is new, empty, or holds only what an export writes."""
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"output folder {out} is a file, not a folder")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if not _OURS.match(p.name))
        if foreign:
            raise OutputDirError(f"output folder {out} holds files that are not from sodiff-export "
                                 f"({', '.join(foreign[:5])}); choose a new or empty folder")


def read_manifest(out: Path) -> dict | None:
    """A previous export's manifest, or None when absent, unreadable or of another format."""
    try:
        m = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(m, dict) and m.get("format") == FORMAT and \
        m.get("format_version") == FORMAT_VERSION and isinstance(m.get("components"), dict)
    return m if ok else None


def reusable(old: dict | None, name: str, digest: str, out: Path) -> dict | None:
    """The old manifest's entry for `name` if its inputs hash matches and its files are intact."""
    entry = (old or {}).get("components", {}).get(name)
    if not isinstance(entry, dict) or entry.get("source_hash") != digest:
        return None
    files = [(entry.get("file"), entry.get("sha256")), *_extra_files(entry)]
    for file, sha in files:
        if not file or Path(file).name != file or not (out / file).is_file() \
                or sha256_file(out / file) != sha:
            return None
    return entry


def _extra_files(entry: dict) -> list[tuple[str, str]]:
    found = []
    for holder in (entry, (entry.get("trt") or {}).get("onnx") or {}):
        ext = holder.get("external_data")
        if ext:
            found.append((ext.get("file"), ext.get("sha256")))
    onnx = (entry.get("trt") or {}).get("onnx")
    if onnx:
        found.append((onnx.get("file"), onnx.get("sha256")))
    return found


def file_entry(out: Path, file: str, external: str | None) -> dict:
    """`file`, `sha256`, `bytes` and `external_data` of a model file in `out` (the runtime
    compares the sizes even when it skips the hashes)."""
    return {"file": file, "sha256": sha256_file(out / file), "bytes": (out / file).stat().st_size,
            "external_data": None if external is None else
            {"file": external, "sha256": sha256_file(out / external),
             "bytes": (out / external).stat().st_size}}


def build_manifest(*, version: str, cfg: Any, random_weights: bool, checkpoint: dict,
                   timestep: dict, shapes: dict, components: dict, lint: dict) -> dict:
    """The manifest dict (see docs/engine-dir.md for each field)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "exporter_version": version,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "preset": cfg.name,
        "random_weights": random_weights,
        "checkpoint": checkpoint,
        "model_config": cfg.to_dict(),
        "timestep": timestep,
        "image": {"layout": "NCHW", "range": [-1.0, 1.0], "saipe_size": cfg.saipe.image_size,
                  "pad_multiple": cfg.pad_multiple, "vae_factor": cfg.vae_factor,
                  "latent_channels": cfg.latent_channels,
                  "scaling_factor": cfg.scaling_factor},
        "shapes": shapes,
        "components": components,
        "lint": lint,
    }


def write_manifest(out: Path, manifest: dict) -> Path:
    """Write `manifest.json` atomically: a reader sees the old file, the new one, or none."""
    path = out / MANIFEST
    tmp = out / f".{MANIFEST}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
