"""The driver of `sodiff-batch`: plan on the driver, restore on a Ray Data actor pool, stream
the report lines back; when a worker dies, rerun what is not done yet."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Callable, TextIO

from runtime.batch import LOCAL, BatchOptions, Job, failure_line

from .config import DEFAULT_RETRIES, MAX_BLOCKS, TASKS_IN_FLIGHT, ClusterOptions
from .worker import RestoreWorker, report_line


# The last line of a traceback that carries one of the runtime's one-line messages.
RUNTIME_ERROR = re.compile(r"(?:^|[.\s])(?:EngineDirError|BackendError|ImageError|ValueError): "
                           r"(.+)$")


class JobError(RuntimeError):
    """The job could not finish (its workers cannot start, or kept dying); one line."""


@dataclass
class JobSummary:
    restored: int = 0
    skipped: int = 0              # outputs already complete when their worker reached them
    failed: list[str] = field(default_factory=list)  # one reason per failed image

    def line(self) -> str:
        return f"{self.restored} restored, {len(self.failed)} failed, {self.skipped} skipped"


def run_job(jobs: list[Job], engine: str, restore, batch: BatchOptions,
            cluster: ClusterOptions, report: TextIO | None, say: Callable[[str], None],
            retries: int = DEFAULT_RETRIES, worker: type = RestoreWorker,
            files=LOCAL) -> JobSummary:
    """Restore `jobs` on the connected Ray cluster; one report line per image. Refused jobs
    (no target) fail here without reaching a worker. `worker`: the actor class; `files`:
    where inputs and outputs live (`storage.files_for`)."""
    summary, todo = JobSummary(), {}
    for i, job in enumerate(jobs):
        if job.target is None:
            _record(report_line(failure_line(job, job.error or "refused")), summary, report,
                    say)
        else:
            todo[i] = job
    for round_ in range(retries + 1):
        if not todo:
            break
        try:
            for line in _stream(todo, (engine, restore, batch, files), cluster, worker):
                todo.pop(line.pop("index"), None)
                _record(line, summary, report, say)
        except Exception as e:  # noqa: BLE001 - Ray raises many types; sorted out below
            if _init_failed(e):
                raise JobError(f"a worker could not start: {first_line(e)}") from None
            if not _worker_died(e) or round_ == retries:
                raise JobError(f"{first_line(e)}; {len(todo)} images not done (rerun the same "
                               f"command to resume: finished outputs are skipped)") from None
            say(f"warning: a worker died ({first_line(e)}); rerunning the {len(todo)} "
                f"images not done yet")
    return summary


def _stream(todo: dict[int, Job], worker_args: tuple, cluster: ClusterOptions, worker: type):
    """The report lines of `todo`'s jobs as the actor pool finishes them."""
    import ray.data

    rows = [{"index": i, "source": str(j.source), "target": str(j.target)}
            for i, j in todo.items()]
    pool = ray.data.ActorPoolStrategy(size=cluster.workers,
                                      max_tasks_in_flight_per_actor=TASKS_IN_FLIGHT)
    ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), MAX_BLOCKS))
    ds = ds.map_batches(worker, fn_constructor_args=worker_args, batch_size=1, compute=pool,
                        num_cpus=cluster.cpus, num_gpus=cluster.gpus or None)
    for row in ds.iter_rows():
        yield json.loads(row["line"])


def _record(line: dict, summary: JobSummary, report: TextIO | None,
            say: Callable[[str], None]) -> None:
    if not line["ok"]:
        summary.failed.append(line["error"])
        say(f"error: {line['error']}")
    elif line["skipped"]:
        summary.skipped += 1
    else:
        summary.restored += 1
    if report is not None:
        report.write(json.dumps(line) + "\n")
        report.flush()


def _worker_died(e: Exception) -> bool:
    """A worker actor that died while running (killed, lost node): worth a rerun."""
    import ray.exceptions

    return isinstance(e, ray.exceptions.RayActorError) and not e.actor_init_failed


def _init_failed(e: Exception) -> bool:
    import ray.exceptions

    return isinstance(e, ray.exceptions.RayActorError) and e.actor_init_failed


def first_line(e: Exception) -> str:
    """The one line of a Ray error worth showing: the runtime's own message when there is
    one (Ray wraps it in tracebacks), else the first line."""
    text = str(e)
    for line in reversed(text.splitlines()):
        found = RUNTIME_ERROR.search(line)
        if found:
            return found.group(1)
    return next((ln.strip() for ln in text.splitlines() if ln.strip()), type(e).__name__)
