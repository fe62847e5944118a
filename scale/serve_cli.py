"""`sodiff-serve`: a thin click front end of `scale.service` (Ray Serve)."""
from __future__ import annotations

import os
import re
import signal
import socket
import sys
import threading
from pathlib import Path

import click

from runtime.cliopts import CONTEXT_SETTINGS, version_option
from runtime.config import DEFAULT_MAX_PIXELS, DEFAULT_QUALITY

from .cliopts import restore_options
from .config import (APP_NAME, DEFAULT_CPUS_PER_REPLICA, DEFAULT_DRAIN_S, DEFAULT_HOST,
                     DEFAULT_MAX_BATCH, DEFAULT_MAX_BYTES, DEFAULT_PORT, DEFAULT_THREADS,
                     DEFAULT_TIMEOUT_S, QUEUED_BATCHES)

EXIT_UNUSABLE = 2
PREFIX_CHARS = re.compile(r"[A-Za-z0-9._~/-]*")  # what a route prefix may hold, unescaped


def _route_prefix(ctx, param, value: str) -> str:
    """`--route-prefix`: "/" or "/a/b" (leading slash added, trailing ones dropped)."""
    if not PREFIX_CHARS.fullmatch(value):
        raise click.BadParameter(f"{value!r}: use letters, digits and . _ ~ - / only")
    return "/" + "/".join(part for part in value.split("/") if part)


@version_option()
@click.command(context_settings=CONTEXT_SETTINGS)
@click.option("--engine", required=True, type=click.Path(path_type=Path),
              help="Engine dir written by sodiff-export (the same path on every node).")
@click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True,
              help="Replicas, one Restorer each.")
@click.option("--cpus-per-replica", type=click.FloatRange(min=0), show_default=True,
              default=DEFAULT_CPUS_PER_REPLICA, help="CPUs Ray reserves per replica.")
@click.option("--gpus-per-replica", type=click.FloatRange(min=0), default=0.0,
              show_default=True, help="GPUs per replica (fractions share a GPU).")
@click.option("--max-batch", type=click.IntRange(min=1), default=DEFAULT_MAX_BATCH,
              show_default=True, help="Concurrent requests restored in one batch at most.")
@click.option("--host", default=DEFAULT_HOST, show_default=True,
              help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(1, 65535), default=DEFAULT_PORT,
              show_default=True, help="HTTP port.")
@click.option("--route-prefix", default="/", show_default=True, callback=_route_prefix,
              help="Serve every route (the page too) under this path, e.g. /sodiff.")
@click.option("--max-bytes", type=click.IntRange(min=1), default=DEFAULT_MAX_BYTES,
              show_default=True, help="Request body limit (413 above it).")
@click.option("--max-pixels", type=click.IntRange(min=0), default=DEFAULT_MAX_PIXELS,
              show_default=True, help="Decompression-bomb limit in pixels (413 above it).")
@click.option("--quality", type=click.IntRange(1, 100), default=DEFAULT_QUALITY,
              show_default=True, help="JPEG/WebP response quality.")
@click.option("--address", help="An existing Ray cluster (auto, HOST:6379). Default: a local "
                                "cluster that stops with the server.")
@click.option("--threads", type=click.IntRange(min=0), default=DEFAULT_THREADS,
              show_default=True, help="onnxruntime CPU threads per replica (0: it decides).")
@click.option("--api-key", envvar="SODIFF_API_KEY", show_envvar=True,
              help="Require 'Authorization: Bearer KEY' on every route but /healthz and "
                   "the page's files (the page asks for the key).")
@click.option("--max-queued", type=click.IntRange(min=1), help="Requests waiting or restoring "
              f"at once, over all replicas; above it 503 at once (default: {QUEUED_BATCHES} "
              f"batches per replica).")
@click.option("--timeout-s", type=click.FloatRange(min=0, min_open=True),
              default=DEFAULT_TIMEOUT_S, show_default=True,
              help="A request that waits or runs longer gets 504 and frees its place.")
@click.option("--drain-s", type=click.FloatRange(min=0), default=DEFAULT_DRAIN_S,
              show_default=True, help="On SIGTERM/SIGINT: new requests get 503 while those in "
                                      "flight have this long to finish.")
@restore_options
def main(engine, replicas, cpus_per_replica, gpus_per_replica, max_batch, host, port,
         route_prefix, max_bytes, max_pixels, quality, address, threads, api_key, max_queued,
         timeout_s, drain_s, backend, device, tile, overlap, tile_batch, timestep, no_verify,
         no_keep_colour, no_jpeg_constraint, no_gate):
    """Serve restoration over HTTP: POST an image to /restore[?format=png|jpg|webp], get the
    restored image back (tau, QF and timings in X-SODiff-* and Server-Timing headers).
    GET / is a before/after page to try it in a browser, GET /healthz reports liveness,
    GET /metrics Prometheus metrics. Ctrl-C (or SIGTERM) drains it: requests in flight
    finish, new ones get 503; a second signal stops at once."""
    from runtime.config import RestoreOptions
    from runtime.errors import EngineDirError

    from .cluster import ClusterError, check_engine, check_resources, connect, disconnect
    from .drain import drain, open_door, reap, session_dir
    from .protocol import ServeOptions

    restore = RestoreOptions(backend=backend, device=device, tile=tile, overlap=overlap,
                             tile_batch=tile_batch, timestep=timestep, threads=threads,
                             verify_hashes=not no_verify, keep_colour=not no_keep_colour,
                             jpeg_constraint=not no_jpeg_constraint, gate=not no_gate)
    try:
        check_engine(engine, restore)
        if address is None:
            _check_port(host, port)
    except (ValueError, EngineDirError, OSError) as e:
        _die(str(e))
    if api_key is not None and not api_key.strip():
        _die("--api-key is empty; give a key, or leave the option out for an open service")
    if not api_key and not _loopback(host):
        click.echo(f"warning: --host {host} serves every client that can reach this machine, "
                   f"with no key: anyone there can use its CPUs/GPUs; pass --api-key (or set "
                   f"SODIFF_API_KEY)", err=True)
    stop, hurry = threading.Event(), threading.Event()

    def on_signal(*_):  # the first drains, a second stops at once
        (hurry if stop.is_set() else stop).set()
    say = lambda msg: click.echo(msg, err=True)  # noqa: E731
    owned, session = False, None
    try:
        owned = connect(address)
        for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which sets its own
            signal.signal(sig, on_signal)
        session = session_dir() if owned else None
        if session:
            say(f"sodiff-serve: local Ray cluster {session}")
        check_resources(replicas, cpus_per_replica, gpus_per_replica, address is None, say,
                        what="replica")
        name = f"door-{os.getpid()}-{port}"
        queued = max_queued or QUEUED_BATCHES * max_batch * replicas
        door = open_door(name, queued)
        opts = ServeOptions(max_batch=max_batch, max_bytes=max_bytes, max_pixels=max_pixels,
                            quality=quality, api_key=api_key or None, door=name, queued=queued,
                            timeout_s=timeout_s)
        _start(engine, restore, replicas, cpus_per_replica, gpus_per_replica, host, port,
               route_prefix, opts)
        base = f"http://{f'[{host}]' if ':' in host else host}:{port}{route_prefix.rstrip('/')}"
        say(f"sodiff-serve: {base}/  (the before/after page; POST {base}/restore, "
            f"GET /healthz, GET /metrics); Ctrl-C stops it")
        stop.wait()
        left = drain(door, drain_s, hurry.is_set, say)
        say("sodiff-serve: stopping" + (f" with {left} request(s) unfinished" if left else ""))
    except ClusterError as e:
        _die(str(e))
    finally:
        _stop()
        if owned:
            disconnect()
            reap(session)
    say("sodiff-serve: stopped")


def _start(engine, restore, replicas, cpus, gpus, host, port, prefix, opts) -> None:
    from ray import serve

    from .cluster import ClusterError
    from .service import build_app

    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(str(engine), restore, opts, replicas, cpus, gpus),
                  name=APP_NAME, route_prefix=prefix, blocking=False)
    except Exception as e:  # noqa: BLE001 - Serve reports a replica that cannot start so
        raise ClusterError(f"the service did not start: {_reason(e)}") from None


def _stop() -> None:
    try:
        import ray
        from ray import serve
    except ImportError:
        return
    if ray.is_initialized():
        serve.shutdown()


def _reason(e: Exception) -> str:
    """The runtime's own one-line message inside Serve's wrapped traceback, if there is one."""
    from .job import first_line

    return first_line(e)


def _loopback(host: str) -> bool:
    """Whether `host` names only this machine (127.0.0.0/8, ::1, localhost)."""
    import ipaddress
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise OSError(f"cannot listen on {host}:{port} ({e.strerror}); pass another "
                          f"--port or --host") from None


def _die(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(EXIT_UNUSABLE)


if __name__ == "__main__":
    main()
