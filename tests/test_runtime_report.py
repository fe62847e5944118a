"""`sodiff-run --report`: every line has the same keys, restored or failed, with `error: null`
on success (issue 16, item 8), and the schema constant lists exactly those keys."""
from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner
from PIL import Image

from fixtures.runtime_engines import identity_engine
from runtime.batch import REPORT_KEYS
from runtime.cli import main


def test_report_lines_share_one_schema(tmp_path):
    engine = identity_engine(tmp_path / "engine")
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 24, 3), np.uint8)).save(
        src / "good.png")
    (src / "bad.png").write_bytes(b"not an image at all")
    res = CliRunner().invoke(main, ["--engine", str(engine), str(src), "-o", str(tmp_path / "o"),
                                    "--report"])
    lines = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 2, res.output
    good, bad = sorted(lines, key=lambda d: not d["ok"])
    assert list(good) == list(bad) == list(REPORT_KEYS)
    assert good["ok"] and good["error"] is None and good["tau"] is not None
    assert not bad["ok"] and "bad.png" in bad["error"]
    assert bad["output"] is None and bad["tau"] is None and bad["warnings"] == []
