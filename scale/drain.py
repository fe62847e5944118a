"""Graceful drain for `sodiff-serve`: a door that the replicas pass requests through, closed on
SIGTERM so that new requests get 503 while those in flight finish; then the Ray processes of
the local cluster the command started are made sure to be gone.

The door is one small named Ray actor (no CPU reserved) owned by the sodiff-serve process:
each replica asks it once per request to enter and tells it when it leaves, so the front knows
how many requests are in flight across every replica.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from .config import DOOR_NAMESPACE

QUIET_S = 1.0  # a drained service waits this long with nothing in flight before it stops


def door_actor():
    """The door's actor class (Ray imported only when serving)."""
    import ray

    @ray.remote(num_cpus=0)
    class Door:
        def __init__(self, limit: int | None):
            self.open, self.inflight, self.last = True, 0, time.monotonic()
            self.limit = limit

        def enter(self) -> str:
            """"in", or why not: "closed" (draining) or "full" (--max-queued reached)."""
            self.last = time.monotonic()
            if not self.open:
                return "closed"
            if self.limit is not None and self.inflight >= self.limit:
                return "full"
            self.inflight += 1
            return "in"

        def leave(self) -> None:
            self.inflight, self.last = self.inflight - 1, time.monotonic()

        def close(self) -> int:
            self.open = False
            return self.inflight

        def is_open(self) -> bool:
            return self.open

        def state(self) -> tuple[int, float]:
            """Requests in flight, and seconds since a request last came or went."""
            return self.inflight, time.monotonic() - self.last
    return Door


def open_door(name: str, limit: int | None = None):
    """Start the door actor under `name`, letting at most `limit` requests in at once (None:
    any number); returns its handle."""
    return door_actor().options(name=name, namespace=DOOR_NAMESPACE).remote(limit)


def find_door(name: str | None):
    """A replica's handle on the door, or None (no door: a service built without one)."""
    if not name:
        return None
    import ray
    return ray.get_actor(name, namespace=DOOR_NAMESPACE)


def drain(door, limit_s: float, hurry, say, quiet_s: float = QUIET_S, poll_s: float = 0.1
          ) -> int:
    """Close `door` and wait until no request is in flight and none has come for `quiet_s`
    (requests still queued in Serve's proxy reach a replica, and get their 503, as soon as
    slots free), `limit_s` passes or `hurry()` is true; returns how many were in flight."""
    import ray

    left = ray.get(door.close.remote())
    say(f"sodiff-serve: draining {left} request(s) in flight (at most {limit_s:g} s; a second "
        f"signal stops at once)")
    deadline = time.monotonic() + limit_s
    quiet = 0.0
    while (left or quiet < quiet_s) and time.monotonic() < deadline and not hurry():
        time.sleep(poll_s)
        left, quiet = ray.get(door.state.remote())
    return left


def session_dir() -> str | None:
    """The local Ray session's folder (its processes name it on their command line)."""
    try:
        import ray
        return ray._private.worker._global_node.get_session_dir_path()
    except Exception:  # noqa: BLE001 - a private API: without it nothing is reaped
        return None


def session_processes(session: str) -> list[int]:
    """Pids, other than this one, whose command line names `session` (Linux /proc)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if session in cmd and int(entry.name) != os.getpid():
            found.append(int(entry.name))
    return found


def replica_pids(session: str) -> list[int]:
    """Pids of the restore replicas of the local Ray session `session`: processes Serve
    titled RestoreReplica whose parent (the raylet) names the session."""
    parents, found = set(session_processes(session)), []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            title = (entry / "cmdline").read_bytes()
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if b"ServeReplica:sodiff:RestoreReplica" in title and ppid in parents:
            found.append(int(entry.name))
    return found


def reap(session: str | None, wait_s: float = 10.0) -> int:
    """Stop what is left of the local cluster `session` after ray.shutdown() (its dashboard
    and runtime-env agents outlive it): SIGTERM, then SIGKILL after `wait_s`; returns how many
    were found."""
    if not session:
        return 0
    pids = session_processes(session)
    found = len(pids)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.1)
        pids = [p for p in pids if _alive(p)]
        if not pids:
            break
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return "zombie" not in _state(pid)


def _state(pid: int) -> str:
    try:
        return (Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0]
                .lower())
    except (OSError, IndexError):
        return ""
