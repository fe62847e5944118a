"""Batches of files: find the inputs, choose outputs that never clobber anything, restore each,
report. A bad file fails alone; the batch goes on and lists the failures at the end."""
from __future__ import annotations

import glob
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Callable, TextIO

from .config import DEFAULT_MAX_PIXELS, DEFAULT_QUALITY, OUTPUT_SUFFIX
from .errors import BackendError, ImageError
from .imageio import (check_output_size, check_parent, output_format, read_image,
                      readable_suffixes, stale_temps, write_image)

GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class Job:
    source: Path                  # the input file
    target: Path | None           # where its output goes (None: refused before running)
    error: str | None = None      # why it was refused


@dataclass(frozen=True)
class BatchOptions:
    out: Path | None = None       # output file (one input) or folder; None: beside each input
    fmt: str = "png"              # output extension for outputs named by the batch
    quality: int = DEFAULT_QUALITY  # JPEG/WebP quality
    overwrite: bool = False       # replace existing outputs (inputs are never replaced)
    max_pixels: int = DEFAULT_MAX_PIXELS  # decompression-bomb limit; 0: none


@dataclass
class Summary:
    done: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (input, reason)
    not_started: int = 0          # jobs left when a stop was asked for (SIGINT, SIGTERM)


def collect_inputs(args: list[str], skipped: list[Path] | None = None
                   ) -> tuple[list[tuple[Path, Path | None]], list[Job]]:
    """(file, folder it was found under or None) for files, folders (recursive) and globs;
    plus refused jobs for arguments that match nothing. Files a folder scan passes over as
    not images are appended to `skipped` when given."""
    found, bad = [], []
    for arg in args:
        p = Path(arg).expanduser()
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if _candidate(f):
                    found.append((f, p))
                elif skipped is not None and f.is_file() and \
                        f.suffix.lower() not in readable_suffixes():
                    skipped.append(f)
        elif p.exists():
            found.append((p, None))
        elif GLOB_CHARS & set(arg):
            matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(arg), recursive=True))
            files = [(m, None) for m in matches if m.is_file()]
            found += files
            if not files:
                bad.append(Job(p, None, f"{arg}: no file matches this pattern"))
        else:
            bad.append(Job(p, None, f"{arg}: no such file or folder"))
    unique, seen = [], set()
    for f, root in found:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append((f, root))
    return unique, bad


def _candidate(f: Path) -> bool:
    return f.is_file() and candidate_name(f)


def candidate_name(f: PurePath) -> bool:
    """Whether a file found in a folder is an input by its name: an image, not hidden, not our
    own output from an earlier run beside its input."""
    return (f.suffix.lower() in readable_suffixes() and not f.stem.endswith(OUTPUT_SUFFIX)
            and not f.name.startswith("."))


def _key(p: PurePath) -> PurePath:
    # Local paths compare resolved; pure paths (keys of an object store) as they are.
    return p.resolve() if isinstance(p, Path) else p


def plan_jobs(inputs: list[tuple[Path, Path | None]], opts: BatchOptions) -> list[Job]:
    """An output per input; refuse outputs that are inputs or collide with each other.
    Pure (non-local) paths work too: an `opts.out` that is one names a folder."""
    ext = "." + opts.fmt.lower().lstrip(".")
    names_file = (opts.out is not None and isinstance(opts.out, Path) and not opts.out.is_dir()
                  and opts.out.suffix != "")
    single_file = names_file and len(inputs) == 1 and inputs[0][1] is None
    if names_file and not single_file and inputs:
        raise ValueError(f"-o {opts.out} names one file, but the inputs are {len(inputs)} "
                         f"files or a folder; pass a folder to -o")
    sources = {_key(f) for f, _ in inputs}
    jobs, taken = [], {}
    for f, root in inputs:
        if single_file:
            target = opts.out
        elif opts.out is None:
            target = f.with_name(f.stem + OUTPUT_SUFFIX + ext)
        else:
            rel = f.relative_to(root) if root is not None else PurePath(f.name)
            target = opts.out / rel.with_suffix(ext)
        key = _key(target)
        if key in sources:
            jobs.append(Job(f, None, f"{f}: its output {target} would replace an input"))
        elif key in taken:
            jobs.append(Job(f, None, f"{f}: its output {target} is also the output of "
                                     f"{taken[key]}"))
        else:
            taken[key] = f
            jobs.append(Job(f, target))
    return jobs


class LocalFiles:
    """Where `process` reads inputs and writes outputs: the local file system. A front end
    may pass another object with these three methods (sodiff-batch: pyarrow file systems)."""

    def exists(self, path: PurePath) -> bool:
        return Path(path).exists()

    def read(self, path: PurePath, max_pixels: int):
        return read_image(path, max_pixels)

    def write(self, path: PurePath, array, icc, exif, quality: int, overwrite: bool) -> None:
        write_image(path, array, icc, exif, quality, overwrite)


LOCAL = LocalFiles()


# One --report line per image, every key on every line (null when not known: a failed image
# has no tau); docs/runtime.md documents each. `ms` holds read, each stage, total and write.
REPORT_KEYS = ("input", "output", "ok", "error", "mode", "format", "size", "qf_header",
               "qf_predicted", "tau", "tau_source", "neutral", "jpeg_constraint", "constraint_k",
               "gate", "tiles", "ms", "warnings")


def report_line(**fields) -> dict:
    """A report line with every key of REPORT_KEYS, in that order (missing ones null; an
    empty warnings list)."""
    unknown = set(fields) - set(REPORT_KEYS)
    if unknown:
        raise ValueError(f"report fields {sorted(unknown)} are not in REPORT_KEYS")
    line = {k: fields.get(k) for k in REPORT_KEYS}
    line["warnings"] = list(line["warnings"] or ())
    return line


def process(restorer, job: Job, opts: BatchOptions, tiles: Callable | None = None,
            files=LOCAL) -> dict:
    """Restore one file; returns its report (raises ImageError/BackendError/ValueError).
    `tiles(done, total)` follows the tiles of a large image; `files` reads and writes."""
    output_format(job.target)  # an unwritable extension fails before any work
    if isinstance(files, LocalFiles):
        check_parent(job.target)
    if files.exists(job.target) and not opts.overwrite:
        raise ImageError(f"{job.target} exists; pass --overwrite to replace it")
    t0 = time.perf_counter()
    img = files.read(job.source, opts.max_pixels)
    check_output_size(job.target, img.array.shape[0], img.array.shape[1])  # before restoring
    t1 = time.perf_counter()
    out, info = restorer.restore_info(img.array, img.qf, tiles, jpeg=getattr(img, "jpeg", None))
    t2 = time.perf_counter()
    files.write(job.target, out, img.icc, img.exif, opts.quality, opts.overwrite)
    ms = {"read": round((t1 - t0) * 1000, 2), **info.pop("ms"),
          "write": round((time.perf_counter() - t2) * 1000, 2)}
    return report_line(input=str(job.source), output=str(job.target), ok=True, error=None,
                       mode=img.mode, format=img.format, **info, ms=ms,
                       warnings=getattr(img, "warnings", ()))


def attempt(restorer, job: Job, opts: BatchOptions, tiles: Callable | None = None,
            files=LOCAL) -> dict:
    """`process`, but a failure becomes its report line (ok: False, error: one line) instead
    of an exception: what every front end (sodiff-run, sodiff-batch's workers) reports."""
    try:
        if job.error:
            raise ImageError(job.error)
        return process(restorer, job, opts, tiles, files)
    except (ImageError, BackendError, ValueError, OSError) as e:
        return failure_line(job, str(e))
    except Exception as e:  # noqa: BLE001 - one broken image must not stop the batch
        return failure_line(job, f"internal error ({type(e).__name__}: {e})")


def run_batch(restorer, jobs: list[Job], opts: BatchOptions, report: TextIO | None,
              say: Callable[[str], None], progress: Callable | None = None,
              tiles: Callable | None = None, stop: Callable[[], bool] | None = None
              ) -> Summary:
    """Process every job, continuing past failures; `say` prints one line per failure (and
    at most one per image for its decoder's warnings), `report` (when given) gets one JSON
    line per image; `progress(total=n)` makes the images' progress bar, `tiles(done, total)`
    follows one image's tiles; `stop()` true ends the batch before the next image."""
    summary = Summary()
    bar = progress(total=len(jobs)) if progress else None
    for i, job in enumerate(jobs):
        if stop is not None and stop():
            summary.not_started = len(jobs) - i
            break
        line = attempt(restorer, job, opts, tiles)
        if line["ok"]:
            summary.done += 1
            if line["warnings"]:
                more = len(line["warnings"]) - 1
                say(f"warning: {job.source}: {line['warnings'][0]}"
                    + (f" (and {more} more; see --report)" if more else ""))
        else:
            summary.failed.append((line["input"], line["error"]))
            say(f"error: {line['error']}")
        if report is not None:
            report.write(json.dumps(line) + "\n")
            report.flush()
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return summary


def remove_stale_temps(jobs: list[Job]) -> int:
    """Delete the temporary files a killed earlier run left in the jobs' output folders (only
    this tool's pattern, only where the writing process is gone); returns how many."""
    removed = 0
    for folder in {job.target.parent for job in jobs if isinstance(job.target, Path)}:
        for tmp in stale_temps(folder):
            try:
                tmp.unlink()
                removed += 1
            except OSError:
                pass  # another run removed it first, or it is not ours to remove
    return removed


def failure_line(job: Job, reason: str) -> dict:
    """The report line of a failed job; `reason` cut to one line that starts with the input."""
    reason = reason.splitlines()[0] if reason else "unknown error"
    if not reason.startswith(str(job.source)):
        reason = f"{job.source}: {reason}"
    return report_line(input=str(job.source), output=None, ok=False, error=reason)
