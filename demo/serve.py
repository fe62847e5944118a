"""`sodiff-demo --serve`: the bundled model (or --checkpoint), exported as the demo exports
it, behind sodiff-serve's before/after page on 127.0.0.1 until Ctrl-C. Ray (the `ray` extra)
is imported only once it starts, by scale/."""
from __future__ import annotations

from .core import DemoOptions, Log, engine_dir, export_engine

# Loopback only: the demo runs without an API key, so no other machine may reach it.
HOST = "127.0.0.1"


def serve_args(opts: DemoOptions, port: int) -> list[str]:
    """sodiff-serve's command line for the demo's engine dir on HOST:port."""
    return ["--engine", str(engine_dir(opts)), "--host", HOST, "--port", str(port),
            "--threads", str(opts.threads), "--replicas", "1"]


def serve_demo(opts: DemoOptions, port: int, log: Log) -> None:
    """Export (unchanged components are reused), then run sodiff-serve in this process: it
    prints the page's URL once it answers, and ends the process (SystemExit) when stopped."""
    from scale.serve_cli import main as serve_main

    export_engine(opts, log)
    log(f"[serve] starting sodiff-serve on a local Ray cluster (seconds); then open "
        f"http://{HOST}:{port}/")
    serve_main.main(args=serve_args(opts, port), prog_name="sodiff-demo --serve")
