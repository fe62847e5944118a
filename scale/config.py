"""Constants and options of the Ray front ends (frozen dataclasses, validated in one place)."""
from __future__ import annotations

from dataclasses import dataclass

# What to run when ray is missing (there is no sodiff on PyPI: the checkout's extra).
RAY_EXTRA = "pip install '.[ray]' (from the sodiff checkout)"
# A worker's default CPU share: a fraction, so that N workers on an N-CPU node still leave
# whole CPUs for Ray Data's read tasks (two 1-CPU actors deadlock a 2-CPU cluster).
DEFAULT_CPUS_PER_WORKER = 0.5
DEFAULT_WORKERS = 2
DEFAULT_THREADS = 1              # onnxruntime threads per worker: workers share the cores
DEFAULT_RETRIES = 2              # reruns of the unfinished images after a worker dies
# Ray Data blocks: one image each up to MAX_BLOCKS images (the finest load balance, and a
# block is what a dead worker's rerun repeats), then MAX_BLOCKS blocks of several images.
MAX_BLOCKS = 10_000
TASKS_IN_FLIGHT = 2              # blocks queued on an actor: one running, one ready, so that
#                                  no actor idles at the end while another holds a queue
REPORT_NAME = "sodiff-batch.jsonl"  # the job's report, in DST unless --report says otherwise
LIST_SUFFIXES = (".txt", ".lst", ".csv")  # SRC files that list paths, one per line / row
CSV_PATH_COLUMN = "path"         # a CSV list's column of paths (else its first column)

# Serving
DEFAULT_PORT = 8000
DEFAULT_HOST = "127.0.0.1"       # loopback: exposing the service is the user's choice
DEFAULT_MAX_BATCH = 4            # requests restored together by @serve.batch
BATCH_WAIT_S = 0.01              # how long a batch waits for more requests
DEFAULT_MAX_BYTES = 32 << 20     # request body limit
DEFAULT_CPUS_PER_REPLICA = 0.5
APP_NAME = "sodiff"
MEDIA_TYPES = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp"}
HEADER_PREFIX = "X-SODiff-"      # tau, QF and timings of a restored image
DEFAULT_DRAIN_S = 30.0           # SIGTERM: how long requests in flight may still take
QUEUED_BATCHES = 4               # default --max-queued: this many batches per replica
DEFAULT_TIMEOUT_S = 300.0        # a request that waits or runs longer gets 504
RETRY_AFTER_S = 5                # what a 503 tells the client to wait
REPLICA_RETRIES = 1              # a request whose restore replica dies is sent again this often
DOOR_NAMESPACE = "sodiff"        # Ray namespace of the service's door actor (scale/drain.py)


@dataclass(frozen=True)
class ClusterOptions:
    address: str | None = None    # an existing cluster ("auto", "HOST:6379", "ray://..."); None:
    #                               start a local one for this command only
    workers: int = DEFAULT_WORKERS  # actors (batch) or replicas (serve), one Restorer each
    cpus: float = DEFAULT_CPUS_PER_WORKER  # CPUs reserved per actor (fractions allowed)
    gpus: float = 0.0             # GPUs reserved per actor (fractions share a GPU)


def validate_cluster(opts: ClusterOptions) -> None:
    """ValueError naming every cluster option that cannot work."""
    problems = []
    if not isinstance(opts.workers, int) or opts.workers < 1:
        problems.append(f"workers={opts.workers!r} (expected an integer >= 1)")
    if not opts.cpus >= 0:
        problems.append(f"cpus per worker={opts.cpus!r} (expected >= 0)")
    if not opts.gpus >= 0:
        problems.append(f"gpus per worker={opts.gpus!r} (expected >= 0)")
    elif opts.gpus > 1 and opts.gpus != int(opts.gpus):
        problems.append(f"gpus per worker={opts.gpus!r} (above 1 it must be a whole number)")
    if problems:
        raise ValueError("invalid cluster options: " + "; ".join(problems))
