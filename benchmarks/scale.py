"""Throughput of `sodiff-batch` (1 and 2 workers) against one `sodiff-run` process on the same
images, and `sodiff-serve` under load: 1, 4, 16 and 64 concurrent clients, with request
batching on (`--max-batch`) and off (1), and once with a replica killed mid-run; throughput,
p50/p95/p99 and every answer that was not a 200 (our 503/504, other statuses, resets).

    python benchmarks/scale.py                    # exports the bundled model (weights/tiny)
    python benchmarks/scale.py --engine DIR --images 40 --replicas 2

Every command runs as a user runs it (a fresh process; sodiff-batch starts its own local Ray
cluster), timed end to end, from one run each. Where the time goes comes from the commands'
own reports: the sum of per-image milliseconds against the wall time, and a bare
`ray.init()` + `ray.shutdown()`. Writes benchmarks/results/scale-cpu.{json,md}.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click  # noqa: E402
import numpy as np  # noqa: E402

from runtime.cliopts import CONTEXT_SETTINGS, version_option  # noqa: E402
from benchmarks import _common as C  # noqa: E402

BIN = Path(sys.executable).parent
DYNAMIC = ((8, 8), (256, 256), (512, 512))  # BSDS500's 481x321 photos run untiled
QUALITIES = (10, 20, 30, 40)                 # the JPEGs' qualities, in turn
CLIENTS = (1, 4, 16, 64)
REQUESTS_PER_CLIENT = 4                      # requests each client sends, one after another
START_S = 300                                # a cold cluster and its replicas, on busy cores


def make_images(folder: Path, n: int) -> list[Path]:
    """`n` BSDS500 test photos re-encoded at QF 10..40."""
    from PIL import Image

    names = sorted((C.SHARED_DATA / "BSDS500" / "test").glob("*.jpg"))[:n]
    if len(names) < n:
        raise click.ClickException(f"{C.SHARED_DATA}/BSDS500/test has {len(names)} JPEGs, "
                                   f"fewer than --images {n}")
    folder.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(names):
        with Image.open(p) as im:
            im.convert("RGB").save(folder / p.name, quality=QUALITIES[i % len(QUALITIES)])
    return sorted(folder.glob("*.jpg"))


def export_bundled(out: Path) -> Path:
    from export.options import ExportOptions
    from export.pipeline import run_export

    run_export(ExportOptions(out=out, dynamic=DYNAMIC), log=lambda m: None)
    return out


def timed(argv: list[str]) -> tuple[float, str]:
    """(wall seconds, stdout) of a command that must succeed."""
    t = time.perf_counter()
    done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t
    if done.returncode != 0:
        raise click.ClickException(f"{' '.join(argv)} failed ({done.returncode}): "
                                   f"{done.stderr[-2000:]}")
    return wall, done.stdout


def images_ms(lines: list[dict]) -> float:
    """Sum of read + restore + write milliseconds over a report's restored images."""
    ms = [line["ms"] for line in lines if line.get("ok") and line.get("ms")]
    return float(sum(m["read"] + m["total"] + m["write"] for m in ms))


def ray_startup_s() -> float:
    code = "import ray; ray.init(include_dashboard=False); ray.shutdown()"
    return timed([sys.executable, "-c", code])[0]


def bench_batch(engine: Path, src: Path, work: Path, n: int) -> dict:
    run_out = work / "run"
    wall, report = timed([str(BIN / "sodiff-run"), "--engine", str(engine), "--threads", "1",
                          "-o", str(run_out), "--report", str(src)])
    rows = {"sodiff-run --threads 1": {"wall_s": round(wall, 2), "images_s": round(
        images_ms([json.loads(x) for x in report.splitlines()]) / 1000, 2)}}
    reference = {p.name: p.read_bytes() for p in run_out.glob("*.png")}
    for workers in (1, 2):
        out = work / f"batch{workers}"
        wall, _ = timed([str(BIN / "sodiff-batch"), str(src), str(out), "--engine",
                         str(engine), "--workers", str(workers), "--threads", "1"])
        lines = [json.loads(x) for x in (out / "sodiff-batch.jsonl").read_text().splitlines()]
        same = {p.name: p.read_bytes() for p in out.glob("*.png")} == reference
        rows[f"sodiff-batch --workers {workers} --threads 1"] = {
            "wall_s": round(wall, 2), "images_s": round(images_ms(lines) / 1000, 2),
            "identical_to_sodiff_run": same}
    return breakdown(rows, n)


def breakdown(rows: dict, n: int) -> dict:
    """Ratios to sodiff-run, and where the wall time goes: the images' own time per worker
    (read + restore + write, summed over the report, divided by the workers) and the rest
    (process and Ray start-up, actors opening the engine, scheduling, the last image's tail)."""
    base = rows["sodiff-run --threads 1"]["wall_s"]
    for name, row in rows.items():
        workers = int(name.split("--workers ")[1].split()[0]) if "--workers" in name else 1
        row["time_vs_sodiff_run"] = round(row["wall_s"] / base, 3)
        row["images_per_s"] = round(n / row["wall_s"], 3)
        row["images_s_per_worker"] = round(row["images_s"] / workers, 2)
        row["other_s"] = round(row["wall_s"] - row["images_s_per_worker"], 2)
    return rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: bytes) -> tuple[str, float]:
    """The answer's status ("200", "503", ..., or "reset" for a connection that failed) and
    its milliseconds."""
    t = time.perf_counter()
    try:
        req = urllib.request.Request(url, data=body, method="POST")
        with urllib.request.urlopen(req, timeout=600) as r:
            status = str(r.status) if r.read() else "empty"
    except urllib.error.HTTPError as e:
        status = str(e.code)
    except (urllib.error.URLError, OSError):
        status = "reset"
    return status, (time.perf_counter() - t) * 1000


def load_level(base: str, bodies: list[bytes], clients: int, kill=None) -> dict:
    """`clients` concurrent clients, REQUESTS_PER_CLIENT requests each; `kill()` runs once a
    second into the level."""
    jobs = [bodies[i % len(bodies)] for i in range(clients * REQUESTS_PER_CLIENT)]
    t = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(post, base + "/restore", b) for b in jobs]
        if kill is not None:
            time.sleep(1.0)
            kill()
        got = [f.result() for f in futures]
    wall = time.perf_counter() - t
    ms = np.array([m for status, m in got if status == "200"])
    pct = lambda q: round(float(np.percentile(ms, q)), 1) if ms.size else None  # noqa: E731
    statuses = [status for status, _ in got]
    return {"requests": len(jobs), "ok": int(ms.size),
            "not_ok": {k: statuses.count(k) for k in sorted(set(statuses)) if k != "200"},
            "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99),
            "max_ms": round(max(m for _, m in got), 1),
            "requests_per_s": round(ms.size / wall, 3)}


def bench_serve(engine: Path, images: list[Path], replicas: int, max_batch: int,
                work: Path, kill: bool = False) -> dict:
    """One sodiff-serve under every CLIENTS level; with `kill`, one replica is SIGKILLed a
    second into the 16-client level."""
    from scale.drain import replica_pids, session_processes

    port, log = free_port(), work / f"serve-{max_batch}-{kill}.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([str(BIN / "sodiff-serve"), "--engine", str(engine), "--port",
                                 str(port), "--replicas", str(replicas), "--max-batch",
                                 str(max_batch), "--threads", "1"], stdout=subprocess.DEVNULL,
                                stderr=err, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    killed = []
    try:
        t = time.perf_counter()
        while not _healthy(base):
            if proc.poll() is not None or time.perf_counter() - t > START_S:
                raise click.ClickException("sodiff-serve did not start: "
                                           + log.read_text()[-2000:])
            time.sleep(0.5)
        startup = time.perf_counter() - t
        session = next(line.split()[-1] for line in log.read_text().splitlines()
                       if line.startswith("sodiff-serve: local Ray cluster"))
        bodies = [p.read_bytes() for p in images]
        for b in bodies[:replicas * 2]:
            post(base + "/restore", b)  # warm-up: each replica's first runs

        def kill_one():
            pid = replica_pids(session)[0]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        levels = {str(c): load_level(base, bodies, c, kill_one if kill and c == 16 else None)
                  for c in CLIENTS}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
    return {"replicas": replicas, "max_batch": max_batch, "startup_s": round(startup, 1),
            "replica_killed": bool(killed), "exit_code": rc,
            "ray_processes_left": len(session_processes(session)), "clients": levels}


def _healthy(base: str) -> bool:
    try:
        with urllib.request.urlopen(base + "/healthz", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def render(doc: dict) -> str:
    m = doc["machine"]
    lines = [f"# sodiff-batch and sodiff-serve on {m['name']}", "",
             f"{doc['images']} BSDS500 test photos (481x321, JPEG QF 10-40), the bundled "
             f"model (`weights/tiny`) as ONNX, onnxruntime 1 thread per process/worker; one "
             f"run each, wall time of the whole command (Ray start-up included). Load average "
             f"before / after: {doc['load_before']} / {doc['load_after']}.", "",
             "| command | wall s | time vs sodiff-run | images/s | images s (sum) | "
             "images s per worker | other s | identical |", "|---|---|---|---|---|---|---|---|"]
    for name, r in doc["batch"].items():
        lines.append(f"| `{name}` | {r['wall_s']} | {r['time_vs_sodiff_run']} | "
                     f"{r['images_per_s']} | {r['images_s']} | {r['images_s_per_worker']} | "
                     f"{r['other_s']} | {r.get('identical_to_sodiff_run', '-')} |")
    lines += ["", f"A bare `ray.init()` + `ray.shutdown()`: {doc['ray_startup_s']} s."]
    for s in doc["serve"]:
        lines += ["", f"## sodiff-serve: {s['replicas']} replicas, --max-batch {s['max_batch']}"
                  f"{', a replica SIGKILLed 1 s into the 16-client level' if s['replica_killed'] else ''}"
                  f" (start-up {s['startup_s']} s; after SIGTERM exit code {s['exit_code']}, "
                  f"{s['ray_processes_left']} Ray processes left)", "",
                  "| clients | requests | 200 | other answers | p50 ms | p95 ms | p99 ms | "
                  "max ms | requests/s |", "|---|---|---|---|---|---|---|---|---|"]
        for c, r in s["clients"].items():
            other = ", ".join(f"{k}: {v}" for k, v in r["not_ok"].items()) or "-"
            lines.append(f"| {c} | {r['requests']} | {r['ok']} | {other} | {r['p50_ms']} | "
                         f"{r['p95_ms']} | {r['p99_ms']} | {r['max_ms']} | "
                         f"{r['requests_per_s']} |")
    lines += ["", f"Serving against sodiff-batch ({doc['overhead']['batch']}): "
              f"{doc['overhead']['text']}"]
    return "\n".join(lines) + "\n"


def overhead(doc: dict, replicas: int) -> dict:
    """sodiff-serve's best requests/s (batching on, no kill) against sodiff-batch's images/s
    with as many workers, both from its wall time and from its images' own time."""
    name = f"sodiff-batch --workers {min(replicas, 2)} --threads 1"
    batch = doc["batch"][name]
    best = max(r["requests_per_s"] for r in doc["serve"][0]["clients"].values())
    steady = doc["images"] / batch["images_s_per_worker"]
    return {"batch": f"`{name}`", "serve_requests_per_s": best,
            "ratio_to_wall": round(best / batch["images_per_s"], 3),
            "ratio_to_images_time": round(best / steady, 3),
            "text": f"{best} requests/s at best, {round(best / batch['images_per_s'], 2)}x its "
                    f"{batch['images_per_s']} images/s over the whole command, "
                    f"{round(best / steady, 2)}x its {round(steady, 2)} images/s over the "
                    f"images' own time"}


@version_option()
@click.command(context_settings=CONTEXT_SETTINGS)
@click.option("--engine", type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="Engine dir (default: export the bundled model for this run).")
@click.option("--images", type=click.IntRange(min=1), default=40, show_default=True)
@click.option("--replicas", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--max-batch", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=C.RESULTS_DIR / "scale-cpu",
              show_default=True, help="Results, without the .json/.md extension.")
def main(engine, images, replicas, max_batch, out):
    """Run the benchmark; see the module docstring."""
    load_before = C.load_average()
    with tempfile.TemporaryDirectory(prefix="sodiff-scale-") as tmp:
        work = Path(tmp)
        engine = engine or export_bundled(work / "engine")
        photos = make_images(work / "src", images)
        doc = {"kind": "sodiff-scale", "created": C.now_utc(), "images": images,
               "machine": C.machine_info("cpu"), "versions": C.versions(),
               "load_before": load_before}
        doc["ray_startup_s"] = round(ray_startup_s(), 2)
        doc["batch"] = bench_batch(engine, work / "src", work, images)
        doc["serve"] = [bench_serve(engine, photos, replicas, max_batch, work),
                        bench_serve(engine, photos, replicas, 1, work),
                        bench_serve(engine, photos, replicas, max_batch, work, kill=True)]
        doc["overhead"] = overhead(doc, replicas)
    doc["load_after"] = C.load_average()
    C.write_json(out.with_suffix(".json"), doc)
    C.write_text(out.with_suffix(".md"), render(doc))
    click.echo(render(doc))


if __name__ == "__main__":
    main()
