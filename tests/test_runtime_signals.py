"""Signals and leftovers (issue 15, item 13): SIGTERM is handled like SIGINT (the batch stops
after the current image, no temporary file stays, the summary is printed, exit 130), and a
run removes the temporary files that killed earlier runs left, only where their writer is
gone."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from fixtures.noise_images import noise_pngs
from fixtures.runtime_engines import identity_engine
from runtime.cli import EXIT_INTERRUPTED, main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return identity_engine(tmp_path_factory.mktemp("signals") / "engine")


def _folder(root: Path, n: int) -> Path:
    root.mkdir()  # a new folder: an existing one is a test's mistake
    return noise_pngs(root, n, (32, 32), "{i:04d}.png")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_after_the_current_image_with_a_summary(engine, tmp_path, sig):
    src, out = _folder(tmp_path / "in", 150), tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "runtime.cli", "--engine", str(engine),
                             str(src), "-o", str(out), "--report"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()  # one image done: the batch is under way
    assert first.startswith("{"), proc.stderr.read()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)  # (reads the pipes past readline's buffer)
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert "Traceback" not in err
    written = sorted(p.name for p in out.iterdir())
    done = len([n for n in written if n.endswith(".png")])
    assert f"{done} restored, 0 failed, {150 - done} not started (interrupted)" in err
    assert 0 < done < 150
    assert len(written) == done and not [n for n in written if n.endswith(".tmp")]
    for name in written:
        Image.open(out / name).load()  # complete files only


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temporary_files_of_dead_writers_are_removed(engine, tmp_path):
    src, out = _folder(tmp_path / "in", 1), tmp_path / "out"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(1.5)  # the files below are written after the sleeper started
        dead = out / f".0000.png.{_dead_pid()}.abcdefgh.tmp"
        live = out / f".0000.png.{sleeper.pid}.abcdefgh.tmp"
        reused = out / f".other.png.{sleeper.pid}.ijklmnop.tmp"
        foreign = out / ".notes.tmp"  # not this tool's pattern
        for p in (dead, live, reused, foreign):
            p.write_bytes(b"partial")
        hour_ago = time.time() - 3600  # written before the sleeper existed: another process
        os.utime(reused, (hour_ago, hour_ago))
        res = CliRunner().invoke(main, ["--engine", str(engine), str(src), "-o", str(out)])
        assert res.exit_code == 0, res.output
        assert "removed 2 temporary file(s)" in res.stderr
        assert not dead.exists() and not reused.exists()
        assert live.exists() and foreign.exists() and (out / "0000.png").is_file()
    finally:
        sleeper.kill()
        sleeper.wait()
