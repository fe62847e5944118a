"""Connecting to Ray: an existing cluster (`--address`) or a local one for this command."""
from __future__ import annotations

from pathlib import Path

from .config import RAY_EXTRA


class ClusterError(RuntimeError):
    """Ray is missing, or the cluster cannot be reached; one line."""


def connect(address: str | None) -> bool:
    """`ray.init`: the cluster at `address`, or a new local one (all this machine's CPUs and
    GPUs) that ends with the command. A process already connected (a notebook, a test) keeps
    its connection. Returns whether this call connected (and so `disconnect` should end it)."""
    try:
        import ray
    except ImportError:
        raise ClusterError(f"ray is not installed; {RAY_EXTRA}") from None
    if ray.is_initialized():
        return False
    try:
        if address:
            ray.init(address=address)
        else:
            ray.init(include_dashboard=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
        raise ClusterError(f"cannot connect to {where}: {str(e).splitlines()[0]}") from None
    return True


def disconnect() -> None:
    try:
        import ray
    except ImportError:
        return
    if ray.is_initialized():
        ray.shutdown()


def check_engine(engine: Path, restore) -> None:
    """Fail on the driver, before any worker starts, for an engine dir or options that cannot
    work: the manifest and (unless --no-verify) every file's sha256, as each worker will.
    A worker's own failure reaches the user through Ray's logs, tracebacks and all."""
    from runtime.config import validate_options
    from runtime.manifest import read_manifest

    validate_options(restore)
    read_manifest(engine, verify_hashes=restore.verify_hashes)


def check_resources(workers: int, cpus: float, gpus: float, local: bool,
                    say=lambda msg: None, what: str = "worker") -> None:
    """Ray waits forever for actors the cluster cannot hold: refuse them on a local cluster
    (ClusterError), warn on a remote one (an autoscaler may add nodes)."""
    import ray

    have = ray.cluster_resources()
    short = [f"{workers} x {need:g} {kind}s = {workers * need:g}, the cluster has "
             f"{have.get(kind, 0):g}" for kind, need in (("CPU", cpus), ("GPU", gpus))
             if need and workers * need > have.get(kind, 0) + 1e-9]
    if not short:
        return
    message = f"not enough resources for the {what}s ({'; '.join(short)})"
    if local:
        raise ClusterError(f"{message}; lower --{what}s, --cpus-per-{what} or "
                           f"--gpus-per-{what}")
    say(f"warning: {message}; they start only if the cluster grows")
