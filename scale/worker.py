"""What a Ray Data actor does: hold one `Restorer` (opened once) and restore its jobs with
`runtime.batch.attempt`, skipping outputs a previous run already completed."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from runtime.batch import LOCAL, BatchOptions, Job, attempt

from .storage import ArrowFiles, opener

JPEG_EOI = b"\xff\xd9"           # the last marker of a complete JPEG
_REPORT_KEYS = ("input", "output", "ok", "error", "skipped", "tau", "qf", "ms")


def is_complete(path, files=LOCAL) -> bool:
    """Whether the output `path` of `files` is a whole image file (cheap: no full decode).
    Outputs are published atomically, so a partial one is someone else's; it is redone."""
    try:
        with opener(files)(path) as f:
            with Image.open(f) as im:
                fmt = im.format
                if fmt == "PNG":
                    im.verify()  # every chunk's CRC, up to IEND
                    return True
            size = f.seek(0, 2)
            if fmt == "JPEG":
                f.seek(size - 2)
                return f.read(2) == JPEG_EOI
            if fmt == "WEBP":
                f.seek(0)
                return int.from_bytes(f.read(8)[4:8], "little") + 8 == size
        return True
    except Exception:  # noqa: BLE001 - whatever Pillow says of a broken file: not complete
        return False


def restore_job(restorer, job: Job, opts: BatchOptions, files=LOCAL) -> dict:
    """One image: skipped when its output is already complete, else `attempt` (an incomplete
    output is replaced); the report line (input, output, ok, error, skipped, tau, qf, ms)."""
    if job.target is not None and not opts.overwrite and files.exists(job.target):
        if is_complete(job.target, files):
            return report_line({"input": str(job.source), "output": str(job.target),
                                "ok": True}, skipped=True)
        opts = replace(opts, overwrite=True)
    return report_line(attempt(restorer, job, opts, files=files))


def report_line(line: dict, skipped: bool = False) -> dict:
    """`attempt`'s line with the job report's keys first; qf is the predicted QF, or the
    JPEG header's when the predictor did not run."""
    qf = line.get("qf_predicted")
    qf = line.get("qf_header") if qf is None else qf
    head = {"input": line["input"], "output": line.get("output"), "ok": line["ok"],
            "error": line.get("error"), "skipped": skipped, "tau": line.get("tau"),
            "qf": qf, "ms": line.get("ms")}
    return {**head, **{k: v for k, v in line.items() if k not in _REPORT_KEYS}}


class RestoreWorker:
    """A Ray Data actor: one Restorer for its lifetime; a batch of rows (index, source,
    target) in, their report lines (JSON, with the index) out."""

    def __init__(self, engine: str, restore, batch: BatchOptions, files=LOCAL):
        from runtime import Restorer

        self.restorer = Restorer(engine, restore)
        self.opts, self.files = batch, files
        src, dst = getattr(files, "src", files), getattr(files, "dst", files)
        self.src_path = PurePosixPath if isinstance(src, ArrowFiles) else Path
        self.dst_path = PurePosixPath if isinstance(dst, ArrowFiles) else Path

    def __call__(self, rows: dict) -> dict:
        lines = []
        for index, source, target in zip(rows["index"], rows["source"], rows["target"]):
            job = Job(self.src_path(source), self.dst_path(target))
            line = restore_job(self.restorer, job, self.opts, self.files)
            lines.append(json.dumps({"index": int(index), **line}))
        return {"line": np.array(lines, dtype=object)}
