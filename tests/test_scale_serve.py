"""`sodiff-serve` (scale/) as users run it: the real command with its own local Ray cluster on
127.0.0.1 and a free port; 50 concurrent requests equal to sodiff-run's outputs, bad and
oversized bodies refused with one line, a clean shutdown."""
import io
import os
import signal
import struct
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fixtures import serve_proc
from fixtures.runtime_engines import tiny_engine
from fixtures.scale_photos import make_photos, sodiff_run
from fixtures.serve_proc import free_port, stop_server

pytest.importorskip("ray", reason="the ray extra is not installed (pip install '.[ray]')")

MAX_BYTES = 200_000      # the server's body limit in these tests
API_KEY = "k3y-for-tests"  # the module server runs with it (SODIFF_API_KEY)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return tiny_engine(tmp_path_factory.mktemp("serve-engine"))[0]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    return make_photos(folder)


@pytest.fixture(scope="module")
def reference(engine, photos, tmp_path_factory):
    return sodiff_run(engine, photos[0].parent, tmp_path_factory.mktemp("sodiff-run"))


def start_server(engine, folder: Path, *args: str):
    """(base URL, process, stderr path) of a sodiff-serve with these tests' body limit and
    key, started with `args`, once it answers /healthz."""
    return serve_proc.start_server(engine, folder, "--max-bytes", str(MAX_BYTES), *args,
                                   env={"SODIFF_API_KEY": API_KEY})


@pytest.fixture(scope="module")
def server(engine, tmp_path_factory):
    """(base URL, process, stderr path) of a running sodiff-serve."""
    # --drain-s 120: on 2 loaded cores the drain test's 768x768 request took 32 s once, past
    # the default 30 s, and the drain (rightly) gave up on it.
    found = start_server(engine, tmp_path_factory.mktemp("serve"), "--max-batch", "4",
                         "--max-queued", "64", "--replicas", "2", "--drain-s", "120")
    yield found
    stop_server(found[1])  # a test failed before the shutdown test: stop it here


def post(url: str, body: bytes, query: str = "", key: str | None = None
         ) -> tuple[int, object, bytes]:
    """POST /restore with the module server's key (or `key`; "" sends none)."""
    return serve_proc.post(url, body, query, API_KEY if key is None else key)


def test_every_route_but_healthz_wants_the_api_key(server, photos):
    for key in ("", "not-the-key", API_KEY[:-1]):
        status, headers, data = post(server[0], photos[0].read_bytes(), key=key)
        assert status == 401 and headers["WWW-Authenticate"] == "Bearer", data
        assert b"--api-key" in data and len(data.strip().splitlines()) == 1
    req = urllib.request.Request(server[0] + "/nowhere", headers={})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)  # no route list for a client without a key
    assert e.value.code == 401


def test_the_page_needs_no_key_and_comes_with_its_csp(server):
    """GET / at the root prefix (tests/test_scale_page.py has the browser, under a prefix)."""
    from scale.page import CSP
    with urllib.request.urlopen(server[0] + "/", timeout=10) as r:
        assert r.status == 200 and r.headers["Content-Type"] == "text/html; charset=utf-8"
        assert r.headers["Content-Security-Policy"] == CSP
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert b'<script src="page.js"' in r.read()
    with urllib.request.urlopen(server[0] + "/page.js", timeout=10) as r:
        assert r.headers["Content-Type"] == "text/javascript; charset=utf-8"


def test_an_open_service_on_every_interface_is_warned_about(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from fixtures.runtime_engines import identity_engine
    from scale import cluster
    from scale.serve_cli import main

    def stop(*a, **k):  # no cluster: the checks before it are what is tested
        raise cluster.ClusterError("stopped before the cluster")
    monkeypatch.setattr(cluster, "connect", stop)
    monkeypatch.delenv("SODIFF_API_KEY", raising=False)
    engine = str(identity_engine(tmp_path / "engine"))
    port = str(free_port())
    open_ = CliRunner().invoke(main, ["--engine", engine, "--host", "0.0.0.0", "--port", port])
    assert open_.exit_code == 2 and "warning: --host 0.0.0.0" in open_.output
    assert "--api-key" in open_.output
    keyed = CliRunner().invoke(main, ["--engine", engine, "--host", "0.0.0.0", "--port", port,
                                      "--api-key", "k"])
    local = CliRunner().invoke(main, ["--engine", engine, "--port", port])
    assert "warning" not in keyed.output and "warning" not in local.output
    empty = CliRunner().invoke(main, ["--engine", engine, "--api-key", " ", "--port", port])
    assert empty.exit_code == 2 and "--api-key is empty" in empty.output


def test_healthz(server):
    import json
    with urllib.request.urlopen(server[0] + "/healthz", timeout=10) as r:
        assert r.status == 200 and json.loads(r.read())["status"] == "ok"


def test_fifty_concurrent_requests_equal_sodiff_run(server, photos, reference):
    bodies = [photos[i % len(photos)] for i in range(50)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(lambda p: post(server[0], p.read_bytes()), bodies))
    batches = []
    for path, (status, headers, data) in zip(bodies, answers):
        assert status == 200, data[:300]
        assert headers["Content-Type"] == "image/png"
        assert data == reference[path.stem + ".png"]
        assert 0 < float(headers["X-SODiff-Tau"]) < 1000 and "total;dur=" in \
            headers["Server-Timing"]
        if path.suffix == ".jpg":  # the exact constraint, from the file's own coefficients
            assert headers["X-SODiff-Constraint"] == "file"
        batches.append(int(headers["X-SODiff-Batch"]))
    assert max(batches) > 1, "no two concurrent requests met in one @serve.batch call"


def test_metrics_count_what_was_served(server, photos):
    from prometheus_client.parser import text_string_to_metric_families
    for _ in range(3):
        assert post(server[0], photos[0].read_bytes())[0] == 200
    assert post(server[0], b"not an image")[0] == 400
    req = urllib.request.Request(server[0] + "/metrics",
                                 headers={"Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
    def samples(family, name):
        return {tuple(sorted(s.labels.items())): s.value for s in families[family].samples
                if s.name == name}
    served = samples("sodiff_requests", "sodiff_requests_total")
    assert served[(("route", "/restore"), ("status", "200"))] >= 3
    assert served[(("route", "/restore"), ("status", "400"))] >= 1
    stages = {dict(k)["stage"] for k, v in samples("sodiff_stage_seconds",
                                                   "sodiff_stage_seconds_count").items()
              if v >= 3}
    assert {"saipe", "predictor", "unet", "vae_decoder", "total"} <= stages
    for name in ("sodiff_tau", "sodiff_qf_predicted", "sodiff_batch_requests"):
        assert samples(name, name + "_count")[()] >= 3, name
    assert "sodiff_requests_in_flight" in families
    with pytest.raises(urllib.error.HTTPError) as e:  # behind the key like every route
        urllib.request.urlopen(server[0] + "/metrics", timeout=10)
    assert e.value.code == 401


def test_output_formats(server, photos):
    status, headers, data = post(server[0], photos[0].read_bytes(), "?format=jpg")
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    assert Image.open(io.BytesIO(data)).format == "JPEG"
    status, _, data = post(server[0], photos[0].read_bytes(), "?format=gif")
    assert status == 400 and b"use one of png, jpg, webp" in data


def _bomb() -> bytes:
    """A valid PNG header that declares 100000x100000 pixels."""
    def chunk(kind, payload):
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("body, status, words", [
    (b"this is not an image\n", 400, b"not an image Pillow can read"),
    (b"", 400, b"empty request body"),
    (b"\xff\xd8\xff\xe0" + b"\x00" * 400, 400, b"request body"),
    (b"x" * (MAX_BYTES + 1), 413, b"over the limit"),
    (_bomb(), 413, b"decompression-bomb"),
], ids=["text", "empty", "broken-jpeg", "oversized-body", "pixel-bomb"])
def test_bad_bodies_get_one_line_4xx(server, body, status, words):
    got, headers, data = post(server[0], body)
    assert got == status, data
    assert words in data and b"Traceback" not in data
    assert len(data.strip().splitlines()) == 1


@pytest.mark.parametrize("tile_batch", [1, 4])
def test_a_serve_batch_call_restores_each_image_as_restore_does(tmp_path, tile_batch):
    """The replica's batch handler in-process: tile batch 1 restores image by image; 4 goes
    through Restorer.restore_batch_info. Either way, each output is `restore`'s, and each
    response gets its own image's tau, QF and timing headers."""

    from fixtures.runtime_engines import edit_manifest, identity_engine
    from runtime import Restorer, RestoreOptions
    from scale.replica import RestoreReplica
    from scale.protocol import ServeOptions, _headers

    eng = identity_engine(tmp_path / "engine")
    edit_manifest(eng, lambda m: m["shapes"].update(batch={"min": 1, "opt": 4, "max": 4}))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, shape, dtype=np.uint8)
              for shape in ((40, 56, 3), (40, 56, 3), (33, 20, 3), (40, 56))]
    opts = RestoreOptions(threads=1, tile_batch=tile_batch)
    service = RestoreReplica(str(eng), opts, ServeOptions())
    results = service._restore_group([(a, None, None) for a in images])
    with Restorer(eng, opts) as r:
        for image, (out, info, batch) in zip(images, results):
            alone, want = r.restore_info(image)
            assert batch == len(images) and np.array_equal(out, alone)
            assert info["tau"] == want["tau"] and info["ms"]["total"] > 0
            headers = _headers(info, batch)
            assert headers["X-SODiff-Tau"] == f"{want['tau']:.3f}"
            assert headers["X-SODiff-QF"] == f"{want['qf_predicted']:.2f}"


def _replicas_of(log: Path) -> list[int]:
    """Pids of the restore replicas of the sodiff-serve whose stderr is `log`."""
    from scale.drain import replica_pids
    session = next(line.split()[-1] for line in log.read_text().splitlines()
                   if line.startswith("sodiff-serve: local Ray cluster"))
    return replica_pids(session)


def test_a_replica_killed_under_load_loses_no_request(server, photos, reference):
    url, _, log = server
    body = photos[0].read_bytes()
    victims = _replicas_of(log)
    assert len(victims) == 2, victims
    with ThreadPoolExecutor(max_workers=16) as pool:
        flying = [pool.submit(post, url, body) for _ in range(64)]  # seconds of work
        time.sleep(0.4)
        os.kill(victims[0], signal.SIGKILL)  # as a crashed or OOM-killed replica
        answers = [f.result() for f in flying]
    statuses = [a[0] for a in answers]
    assert set(statuses) <= {200, 503}, statuses  # never Ray's "Internal Server Error"
    assert statuses.count(200) >= len(statuses) // 2, statuses
    for status, headers, data in answers:
        if status == 200:
            assert data == reference[photos[0].stem + ".png"]
        else:
            assert headers["Retry-After"] and b"replica died" in data
    deadline = time.monotonic() + 10  # the ingress's warning reaches the driver's stderr late
    while "died under a request (attempt 1)" not in log.read_text() and \
            time.monotonic() < deadline:
        time.sleep(0.5)
    assert "died under a request (attempt 1)" in log.read_text()  # the retry was exercised


def test_batched_responses_carry_each_images_own_headers(tmp_path_factory, photos):
    """--tile-batch 4 on an engine that takes batches: same-shape requests meet in one
    restore_batch_info call, and each answer still says its own image's tau and QF."""
    from fixtures.runtime_engines import batched_tiny_engine
    from runtime import Restorer
    from runtime.imageio import read_image
    engine = batched_tiny_engine(tmp_path_factory.mktemp("tiny-batched-serve"))
    url, proc, log = start_server(engine, tmp_path_factory.mktemp("batched-serve"),
                                  "--max-batch", "4", "--tile-batch", "4")
    try:
        chosen = photos[:4]  # one crop size: their tiles go through the engines together
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda p: (p, post(url, p.read_bytes())), chosen * 2))
            y, x = np.mgrid[:768, :768]  # then a second signal ends a drain at once
            slow = io.BytesIO()
            Image.fromarray(((x + 2 * y) // 12 % 256).astype(np.uint8)).save(slow, "JPEG")
            held = pool.submit(post, url, slow.getvalue())
            time.sleep(1.0)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0
            try:
                held.result()  # answered or cut off: either way it did not hold the stop
            except OSError:
                pass
        assert "unfinished" in log.read_text()
    finally:
        stop_server(proc)
    with Restorer(engine, threads=1) as r:
        want = {p: r.restore_info(read_image(p).array, jpeg=read_image(p).jpeg)[1]
                for p in chosen}
    assert any(int(h["X-SODiff-Batch"]) > 1 for _, (_, h, _) in answers)
    for path, (status, headers, data) in answers:
        assert status == 200, data
        assert headers["X-SODiff-Tau"] == f"{want[path]['tau']:.3f}"
        assert headers["X-SODiff-QF"] == f"{want[path]['qf_predicted']:.2f}"
        assert headers["X-SODiff-Constraint"] == "file"


QUEUED, TIMEOUT_S = 3, 2.0  # the bounded server's --max-queued and --timeout-s


@pytest.fixture(scope="module")
def bounded(engine, tmp_path_factory):
    found = start_server(engine, tmp_path_factory.mktemp("bounded"), "--max-batch", "1",
                         "--max-queued", str(QUEUED), "--timeout-s", str(TIMEOUT_S))
    yield found
    stop_server(found[1])


def _timed_post(url, body):
    t = time.monotonic()
    status, headers, data = post(url, body)
    return status, headers, data, time.monotonic() - t


def test_an_overload_gets_503_at_once_and_nothing_waits_past_the_timeout(bounded, photos,
                                                                          reference):
    body = photos[0].read_bytes()
    with ThreadPoolExecutor(max_workers=64) as pool:
        answers = list(pool.map(lambda _: _timed_post(bounded[0], body), range(64)))
    statuses = [a[0] for a in answers]
    assert set(statuses) <= {200, 503, 504}, statuses
    assert statuses.count(503) > 0 and statuses.count(200) > 0, statuses
    for status, headers, data, took in answers:
        assert took < TIMEOUT_S + 10, took  # no request hangs: done, refused or timed out
        if status == 200:
            assert data == reference[photos[0].stem + ".png"]
        elif status == 503:
            assert b"--max-queued" in data and headers["Retry-After"]
        else:
            assert b"--timeout-s" in data
    deadline = time.monotonic() + 60  # every place is given back: one request gets through
    while (status := post(bounded[0], body)[0]) != 200 and time.monotonic() < deadline:
        time.sleep(1)  # a timed-out restore may still hold the replica's CPU for a while
    assert status == 200


def test_a_request_past_the_timeout_gets_504(bounded):
    y, x = np.mgrid[:1024, :1024]
    slow = io.BytesIO()
    Image.fromarray(((x + 2 * y) // 12 % 256).astype(np.uint8)).save(slow, "JPEG", quality=30)
    status, _, data, took = _timed_post(bounded[0], slow.getvalue())
    assert status == 504 and b"longer than 2 s (sodiff-serve --timeout-s)" in data, data
    assert took < TIMEOUT_S + 5


@pytest.mark.last_in_module  # it stops the module's server
def test_sigterm_drains_requests_in_flight_and_leaves_no_ray_process(server, photos,
                                                                      reference):
    from scale.drain import session_processes
    url, proc, log = server
    body = photos[0].read_bytes()
    y, x = np.mgrid[:768, :768]
    slow = io.BytesIO()  # many tiles (a small file): still restoring while the signal comes
    Image.fromarray(((x + 2 * y) // 12 % 256).astype(np.uint8)).save(slow, "JPEG", quality=30)
    assert len(slow.getvalue()) < MAX_BYTES
    with ThreadPoolExecutor(max_workers=12) as pool:
        held = pool.submit(post, url, slow.getvalue())
        flying = [pool.submit(post, url, body) for _ in range(8)]
        time.sleep(1.0)  # in flight: received, queued or restoring
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        late = post(url, body)  # while the slow one drains: the door is closed
        answers = [f.result() for f in flying]
        held = held.result()
    statuses = [a[0] for a in answers]
    assert set(statuses) <= {200, 503}, statuses  # never a reset, never Ray's own 500
    for status, headers, data in answers:
        if status == 200:
            assert data == reference[photos[0].stem + ".png"]
        else:
            assert headers["Retry-After"] and b"shutting down" in data
    assert held[0] == 200 and Image.open(io.BytesIO(held[2])).size == (768, 768)
    assert late[0] == 503 and late[1]["Retry-After"], late
    assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "sodiff-serve: stopped" in text and "Traceback" not in text
    assert "draining" in text
    with pytest.raises(OSError):
        urllib.request.urlopen(url + "/healthz", timeout=5)
    session = next(line.split()[-1] for line in text.splitlines()
                   if line.startswith("sodiff-serve: local Ray cluster"))
    assert session_processes(session) == [], "Ray processes outlived sodiff-serve"
