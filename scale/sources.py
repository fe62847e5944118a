"""SRC of a batch job -> the inputs `runtime.batch.plan_jobs` names outputs for (URIs of other
file systems: `storage.find_remote`, by the same rules).

A folder (searched recursively) or a glob are `sodiff-run`'s own inputs (`collect_inputs`).
A .txt/.lst/.csv file lists paths, one per line or row: files under the list's folder keep
their path relative to it under DST (an archive's thousands of IMG_0001.jpg never collide);
others are named by their file name, as `sodiff-run` names files.
"""
from __future__ import annotations

import os
from pathlib import Path

from runtime.batch import Job, collect_inputs

from .config import LIST_SUFFIXES
from .listfile import parse_list
from .storage import find_remote, is_uri


def find_inputs(src: str) -> tuple[list[tuple[Path, Path | None]], list[Job]]:
    """(file, folder its output name is relative to, or None) for SRC, plus refused jobs for
    entries that match nothing -- `collect_inputs`' result."""
    if is_uri(src):
        return find_remote(src)
    path = Path(src).expanduser()
    if not (path.is_file() and path.suffix.lower() in LIST_SUFFIXES):
        return collect_inputs([src])
    base = path.parent
    entries = [e if Path(e).expanduser().is_absolute() else str(base / e)
               for e in read_list(path)]
    if not entries:
        raise ValueError(f"{path}: the list names no file; write one path per line")
    found, refused = collect_inputs(entries)
    root = _absolute(base)  # absolute, symlinks kept: a link's output is named by the link
    return [(f, root if r is None and f.is_relative_to(root) else r)
            for f, r in ((_absolute(f), r) for f, r in found)], refused


def _absolute(p: Path) -> Path:
    return Path(os.path.abspath(p))


def read_list(path: Path) -> list[str]:
    """The paths a list file names (see `parse_list`)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read the list ({type(e).__name__}: {e})") from None
    return parse_list(text, str(path))
