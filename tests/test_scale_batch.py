"""`sodiff-batch` (scale/) on a real local Ray cluster: outputs byte-identical to sodiff-run's,
a corrupt file reported while the rest is restored, a SIGKILLed job resumed, a worker actor
killed mid-job. One 2-CPU cluster serves the module; the tiny exported engine makes every
output depend on the model."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from fixtures.runtime_engines import tiny_engine
from fixtures.scale_photos import make_photos, outputs, sodiff_run

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install '.[ray]')")

REPO = Path(__file__).resolve().parents[1]
BATCH = [sys.executable, "-m", "scale.batch_cli"]


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return tiny_engine(tmp_path_factory.mktemp("scale-engine"))[0]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    make_photos(folder)
    return folder


@pytest.fixture(scope="module")
def reference(engine, photos, tmp_path_factory):
    ref = sodiff_run(engine, photos, tmp_path_factory.mktemp("sodiff-run"))
    assert len(ref) == 20
    return ref


def batch(*args):
    from scale.batch_cli import main
    return CliRunner().invoke(main, [str(a) for a in args])


def report(dst: Path) -> list[dict]:
    return [json.loads(line) for line in (dst / "sodiff-batch.jsonl").read_text().splitlines()]


def test_two_workers_match_sodiff_run_byte_for_byte(cluster, engine, photos, reference,
                                                    tmp_path):
    dst = tmp_path / "out"
    result = batch(photos, dst, "--engine", engine, "--workers", 2)
    assert result.exit_code == 0, result.output
    assert "20 restored, 0 failed, 0 skipped" in result.output
    assert outputs(dst) == reference
    lines = report(dst)
    assert len(lines) == 20 and all(line["ok"] and not line["skipped"] for line in lines)
    for line in lines:
        assert {"input", "output", "ok", "error", "tau", "qf", "ms"} <= set(line)
        assert 0 < line["tau"] < 1000 and line["ms"]["total"] > 0
    again = batch(photos, dst, "--engine", engine, "--workers", 2)  # a rerun: nothing to do
    assert again.exit_code == 0 and "0 restored, 0 failed, 20 skipped" in again.output


def test_a_corrupt_file_fails_alone(cluster, engine, photos, reference, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for p in photos.glob("*.jpg"):
        (src / p.name).write_bytes(p.read_bytes())
    whole = (src / "bikes.jpg").read_bytes()
    (src / "zz_truncated.jpg").write_bytes(whole[: len(whole) // 3])
    (src / "zz_text.jpg").write_text("not a JPEG\n")
    dst = tmp_path / "out"
    result = batch(src, dst, "--engine", engine)
    assert result.exit_code == 1
    assert "20 restored, 2 failed, 0 skipped" in result.output
    assert "Traceback" not in result.output
    assert outputs(dst) == reference
    bad = {Path(line["input"]).name: line for line in report(dst) if not line["ok"]}
    assert set(bad) == {"zz_truncated.jpg", "zz_text.jpg"}
    assert "truncated or corrupt" in bad["zz_truncated.jpg"]["error"]
    assert "not an image" in bad["zz_text.jpg"]["error"]
    assert all("\n" not in line["error"] and line["output"] is None for line in bad.values())


def _live_in_session(sid: int) -> list[int]:
    """Processes of session `sid` that are not zombies (this test started all of them)."""
    live = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            if os.getsid(int(d)) == sid and Path(f"/proc/{d}/stat").read_text().split()[2] != "Z":
                live.append(int(d))
        except (OSError, IndexError):
            pass
    return live


def test_sigkilled_job_resumes_without_rewriting(cluster, engine, photos, reference,
                                                 tmp_path):
    dst = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    job = subprocess.Popen(BATCH + [str(photos), str(dst), "--engine", str(engine)], cwd=REPO,
                           env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(outputs(dst) if dst.exists() else {}) < 3 and time.monotonic() < deadline:
        assert job.poll() is None, "the job ended before it could be killed"
        time.sleep(0.005)
    os.killpg(job.pid, signal.SIGKILL)  # the driver, its local cluster and its workers
    job.wait()
    while _live_in_session(job.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _live_in_session(job.pid)
    done = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in dst.glob("*.png") if not p.name.startswith(".")}
    assert 3 <= len(done) < 20, f"{len(done)} outputs when killed: not halfway"
    for name in done:
        assert (dst / name).read_bytes() == reference[name]  # what was published is whole

    result = batch(photos, dst, "--engine", engine)
    assert result.exit_code == 0, result.output
    assert f"{20 - len(done)} restored, 0 failed, {len(done)} skipped" in result.output
    assert outputs(dst) == reference  # none missing, all complete
    for name, stamp in done.items():  # none written twice
        p = dst / name
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == stamp


def test_worker_killed_mid_job_still_completes(cluster, engine, photos, reference, tmp_path):
    from runtime.batch import BatchOptions, plan_jobs
    from runtime.config import RestoreOptions
    from scale.config import ClusterOptions
    from scale.job import run_job
    from scale.sources import find_inputs
    from scale.worker import RestoreWorker

    @ray.remote(num_cpus=0)
    class Handles:
        def __init__(self):
            self.handles = []

        def add(self, h):
            self.handles.append(h)

        def get(self):
            return self.handles

    registry = Handles.options(name="scale-test-handles").remote()

    class Tracked(RestoreWorker):  # the real worker, which also says where it can be killed
        def __init__(self, *args):
            super().__init__(*args)
            me = ray.get_runtime_context().current_actor
            ray.get(ray.get_actor("scale-test-handles").add.remote(me))

    dst = tmp_path / "out"
    dst.mkdir()
    opts = BatchOptions(out=dst)
    found, refused = find_inputs(str(photos))
    jobs = refused + plan_jobs(found, opts)
    killed = {}

    def kill_one():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if len(ray.get(registry.get.remote())) == 2 and outputs(dst):
                killed["outputs"] = len(outputs(dst))
                ray.kill(ray.get(registry.get.remote())[0])  # no restart: the harder case
                return
            time.sleep(0.005)

    said = []
    killer = threading.Thread(target=kill_one)
    killer.start()
    summary = run_job(jobs, str(engine), RestoreOptions(threads=1), opts,
                      ClusterOptions(workers=2), None, said.append, worker=Tracked)
    killer.join()
    ray.kill(registry)
    assert 0 < killed["outputs"] < 20, killed
    assert any(s.startswith("warning: a worker died") for s in said), said
    assert not summary.failed and summary.restored + summary.skipped == 20
    assert outputs(dst) == reference


def test_uris_go_through_pyarrow_file_systems(cluster, engine, photos, reference, tmp_path):
    dst = tmp_path / "out"
    log = tmp_path / "report.jsonl"
    args = [photos.as_uri(), dst.as_uri(), "--engine", engine, "--report", log]
    result = batch(*args)
    assert result.exit_code == 0, result.output
    assert outputs(dst) == reference
    again = batch(*args)  # pyarrow's view of the outputs: complete, so skipped
    assert "0 restored, 0 failed, 20 skipped" in again.output, again.output


def test_remote_listings_follow_the_local_rules(photos, tmp_path):
    from runtime.batch import BatchOptions, plan_jobs
    from scale.sources import find_inputs
    from scale.storage import find_remote

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "bikes.jpg").write_bytes((photos / "bikes.jpg").read_bytes())
    (tmp_path / "a" / ".hidden.jpg").write_bytes(b"x")
    (tmp_path / "list.csv").write_text("path\na/bikes.jpg\nmissing.jpg\n")
    found, refused = find_remote((tmp_path / "list.csv").as_uri())
    assert [f.name for f, _ in found] == ["bikes.jpg"] and len(refused) == 1
    local, _ = find_inputs(str(tmp_path / "list.csv"))
    out = BatchOptions(out=tmp_path / "out")
    assert [str(j.target) for j in plan_jobs(found, out)] == \
        [str(j.target) for j in plan_jobs(local, out)] == [str(tmp_path / "out/a/bikes.png")]
    folder, _ = find_remote((tmp_path / "a").as_uri())
    assert [f.name for f, _ in folder] == ["bikes.jpg"]
    glob, _ = find_remote(tmp_path.as_uri() + "/a/*.jpg")
    assert [f.name for f, _ in glob] == ["bikes.jpg"]
    _, none = find_remote(tmp_path.as_uri() + "/nothing/*.jpg")
    assert "no file matches" in none[0].error


def test_a_worker_that_cannot_open_the_engine_is_one_line(cluster, engine, photos, tmp_path):
    import shutil

    broken = tmp_path / "engine"
    shutil.copytree(engine, broken)
    unet = broken / "unet.onnx"
    data = bytearray(unet.read_bytes())
    data[:64] = b"\xff" * 64  # same size: with --no-verify only loading the graph finds it
    unet.write_bytes(bytes(data))
    result = batch(photos, tmp_path / "out", "--engine", broken, "--no-verify")
    assert result.exit_code == 2
    ours = [ln for ln in result.output.splitlines() if ln.startswith("error: ")]  # not Ray's log
    assert len(ours) == 1, result.output[-3000:]
    assert ours[0].startswith("error: a worker could not start: onnxruntime cannot load")
    assert not outputs(tmp_path / "out")
    checked = batch(photos, tmp_path / "out", "--engine", broken)  # the driver's own check
    assert checked.exit_code == 2 and "does not match its sha256" in checked.output


def test_workers_the_cluster_cannot_hold_are_refused(cluster, engine, photos, tmp_path):
    result = batch(photos, tmp_path / "out", "--engine", engine, "--gpus-per-worker", 0.5)
    assert result.exit_code == 2
    assert result.output.strip().endswith("error: not enough resources for the workers (2 x 0.5 "
                                          "GPUs = 1, the cluster has 0); lower --workers, "
                                          "--cpus-per-worker or --gpus-per-worker")


def test_bad_arguments_are_one_line_errors_before_any_cluster(engine, photos, tmp_path):
    (tmp_path / "file").write_text("x")
    cases = [
        ([photos, tmp_path / "o", "--engine", tmp_path / "none"], "engine dir"),
        ([photos, tmp_path / "file", "--engine", engine], "is a file"),
        ([tmp_path / "missing", tmp_path / "o", "--engine", engine], "no such file"),
        ([str(tmp_path / "*.jpg"), tmp_path / "o", "--engine", engine], "no file matches"),
    ]
    for args, words in cases:
        result = batch(*args)
        assert result.exit_code == 2, result.output
        assert words in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output


def test_list_files_mirror_relative_paths(photos, tmp_path):
    from scale.sources import find_inputs

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for sub in ("a", "b"):
        (tmp_path / sub / "bikes.jpg").write_bytes((photos / "bikes.jpg").read_bytes())
    (tmp_path / "list.txt").write_text(f"# a comment\na/bikes.jpg\n\nb/bikes.jpg\n"
                                       f"{photos / 'caps.jpg'}\nmissing.jpg\n")
    (tmp_path / "list.csv").write_text("id,path\n1,a/bikes.jpg\n2,b/bikes.jpg\n")
    found, refused = find_inputs(str(tmp_path / "list.txt"))
    from runtime.batch import BatchOptions, plan_jobs
    jobs = plan_jobs(found, BatchOptions(out=tmp_path / "out"))
    targets = sorted(str(j.target.relative_to(tmp_path / "out")) for j in jobs)
    assert targets == ["a/bikes.png", "b/bikes.png", "caps.png"]
    assert [Path(j.source).name for j in refused] == ["missing.jpg"]
    found_csv, refused_csv = find_inputs(str(tmp_path / "list.csv"))
    assert sorted(f.relative_to(tmp_path).as_posix() for f, _ in found_csv) == \
        ["a/bikes.jpg", "b/bikes.jpg"] and not refused_csv


def test_incomplete_outputs_are_redone_and_complete_ones_kept(engine, photos, tmp_path):
    from runtime import Restorer
    from runtime.batch import BatchOptions, Job
    from scale.worker import is_complete, restore_job

    good, cut = tmp_path / "good.png", tmp_path / "cut.png"
    with Restorer(engine, threads=1) as r:
        line = restore_job(r, Job(photos / "bikes.jpg", good), BatchOptions())
        assert line["ok"] and not line["skipped"] and is_complete(good)
        cut.write_bytes(good.read_bytes()[:-20])
        assert not is_complete(cut)
        jpg = tmp_path / "x.jpg"
        jpg.write_bytes((photos / "caps.jpg").read_bytes()[:-2])
        assert not is_complete(jpg) and is_complete(photos / "caps.jpg")
        kept = restore_job(r, Job(photos / "bikes.jpg", good), BatchOptions())
        redone = restore_job(r, Job(photos / "bikes.jpg", cut), BatchOptions())
    assert kept["skipped"] and kept["ok"]
    assert redone["ok"] and not redone["skipped"] and cut.read_bytes() == good.read_bytes()


def test_import_runtime_never_imports_ray():
    code = ("import sys, runtime, runtime.batch, runtime.imageio, runtime.cli\n"
            "from runtime import Restorer\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'scale'))\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
