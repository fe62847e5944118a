"""Split a wheel too large for one transfer to the lent GPU into parts, and join them there.

    python benchmarks/wheel_parts.py split WHEEL [--dir .ort-parts] [--part-mib N]
    python benchmarks/wheel_parts.py join [--dir .ort-parts] --out DIR

`split` writes WHEEL.partNN files of at most --part-mib MiB (default: what one 64 MiB transfer
leaves beside this checkout's working tree, which travels with every part) and a
WHEEL.parts.json record
(name, size, sha256, part names) into --dir, a git-ignored folder, and prints the carry path of
each part: send them one per transfer, each named by its own path (a folder sent whole
replaces the one already there). `join` checks that every part is present, concatenates them
into DIR/WHEEL and verifies the sha256, so a part that broke on the way is named, not installed.
docs/gpu.md has the whole procedure. Standard library only: it runs where nothing else does.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `runtime.version` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.version import version_line  # noqa: E402 (standard library only)

DEFAULT_DIR = Path(".ort-parts")
TRANSFER_MIB = 64          # what one transfer to the lent GPU takes, working tree included
MARGIN_MIB = 2             # headroom for files the tree gains before the transfer
RECORD_SUFFIX = ".parts.json"
CHUNK = 1 << 20


class PartsError(Exception):
    """A problem with the wheel or its parts; the message says which file and what to do."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def tree_mib() -> float:
    """MiB of the files that travel with every transfer (git's tracked and untracked, not
    ignored, files), or 0 outside a git checkout."""
    import subprocess
    try:
        names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                                "--exclude-standard"], capture_output=True, check=True
                               ).stdout.split(b"\0")
    except (OSError, subprocess.CalledProcessError):
        return 0.0
    return sum(Path(n.decode()).stat().st_size for n in names
               if n and Path(n.decode()).is_file()) / 2 ** 20


def default_part_mib() -> int:
    free = int(TRANSFER_MIB - tree_mib() - MARGIN_MIB)
    if free < 1:
        raise PartsError(f"the working tree alone is about {tree_mib():.0f} MiB: nothing is left "
                         f"of a {TRANSFER_MIB} MiB transfer for a part")
    return free


def split(wheel: Path, folder: Path, part_mib: int) -> list[Path]:
    """Parts of `wheel` in `folder` (earlier parts of the same wheel replaced); returns the
    paths to carry, the record first."""
    if not wheel.is_file():
        raise PartsError(f"{wheel}: no such file (download the wheel first; docs/gpu.md)")
    if part_mib < 1:
        raise PartsError(f"--part-mib {part_mib}: must be at least 1")
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob(f"{wheel.name}.part[0-9]*"):
        old.unlink()
    size, parts = part_mib * 2 ** 20, []
    with open(wheel, "rb") as f:
        while block := f.read(size):
            part = folder / f"{wheel.name}.part{len(parts):02d}"
            part.write_bytes(block)
            parts.append(part)
    record = {"wheel": wheel.name, "bytes": wheel.stat().st_size, "sha256": _sha256(wheel),
              "parts": [p.name for p in parts]}
    rec_path = folder / f"{wheel.name}{RECORD_SUFFIX}"
    rec_path.write_text(json.dumps(record, indent=2) + "\n")
    return [rec_path, *parts]


def join(folder: Path, out: Path) -> Path:
    """The wheel rebuilt from the one record in `folder`, checked against its sha256."""
    records = sorted(folder.glob(f"*{RECORD_SUFFIX}"))
    if len(records) != 1:
        raise PartsError(f"{folder}: expected one *{RECORD_SUFFIX} record, found "
                         f"{len(records)}; send the record with the parts (docs/gpu.md)")
    try:
        record = json.loads(records[0].read_text())
        name, parts, want = record["wheel"], record["parts"], record["sha256"]
    except (ValueError, KeyError, TypeError) as e:
        raise PartsError(f"{records[0]}: not a parts record ({e}); split the wheel again") \
            from None
    missing = [p for p in parts if not (folder / p).is_file()]
    if missing:
        raise PartsError(f"{folder}: {len(missing)} of {len(parts)} parts missing "
                         f"({', '.join(missing)}); send each with its own transfer")
    out.mkdir(parents=True, exist_ok=True)
    wheel = out / name
    with open(wheel, "wb") as f:
        for p in parts:
            f.write((folder / p).read_bytes())
    if (got := _sha256(wheel)) != want:
        wheel.unlink()
        raise PartsError(f"{name}: the joined parts hash to {got[:12]}..., the record says "
                         f"{want[:12]}...; a part changed on the way: send them again")
    return wheel


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=version_line("wheel_parts.py"))
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split", help="split WHEEL into parts")
    s.add_argument("wheel", type=Path)
    s.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    s.add_argument("--part-mib", type=int, default=None,
                   help="part size (default: 64 MiB minus the working tree and 2 MiB)")
    j = sub.add_parser("join", help="rebuild the wheel from its parts and check it")
    j.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    j.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    try:
        if args.cmd == "split":
            mib = args.part_mib if args.part_mib is not None else default_part_mib()
            for path in split(args.wheel, args.dir, mib):
                print(path)
        else:
            print(join(args.dir, args.out))
    except (PartsError, OSError) as e:
        print(f"wheel_parts: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
