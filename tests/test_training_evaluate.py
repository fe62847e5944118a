"""training.evaluate: the per-QF report of a checkpoint (tau, QF head, prompt spread, PSNR,
signed channel error) on whole images, and its CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from sodiff import checkpoint, metrics
from sodiff.config import TINY
from sodiff.jpeg import compress
from sodiff.model import SODiff
from training import evaluate as ev

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = SODiff(TINY)
    with torch.no_grad():  # heads that read the image (fresh ones are zero: constant outputs)
        model.predictor.qf_head.weight.normal_(0, 0.3)
        model.predictor.timestep_head.weight.normal_(0, 3.0)
    return checkpoint.save(model, tmp_path_factory.mktemp("ck") / "model")


def test_token_spread():
    same = torch.ones(77, 8)
    assert ev.token_spread(same) == 0.0
    spread = torch.randn(77, 8, generator=torch.Generator().manual_seed(0))
    assert ev.token_spread(spread) > 0.9


def test_report_per_qf(ckpt):
    rng = np.random.default_rng(0)
    images = [(f"{i}.png", rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)) for i in range(2)]
    result = ev.evaluate(checkpoint.load(ckpt), images, (10, 60), (10, 50, 90), progress=False)
    assert result["images"] == 2 and set(result["per_qf"]) == {"10", "60"}
    assert len(result["rows"]) == 4 and result["head_qfs"] == [10, 50, 90]
    row = result["rows"][0]
    assert row["psnr_jpeg"] == pytest.approx(metrics.psnr(compress(images[0][1], 10)[0],
                                                          images[0][1]))
    assert len(row["signed_error_rgb"]) == 3 and row["token_spread"] >= 0
    assert -1 <= result["tau_qf_spearman"] <= 1 and result["qf_head_mae"] >= 0


def test_cli_writes_json_and_names_bad_qualities(tmp_path, ckpt):
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    out = tmp_path / "r.json"
    res = CliRunner().invoke(ev.main, ["--checkpoint", str(ckpt), "--data", str(tmp_path),
                                       "--qf", "10,40", "--head-qf", "10", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "| 10 |" in res.output and json.loads(out.read_text())["images"] == 1
    bad = CliRunner().invoke(ev.main, ["--checkpoint", str(ckpt), "--data", str(tmp_path),
                                       "--qf", "0,x", "--out", str(out)])
    assert bad.exit_code != 0 and "Traceback" not in bad.output and "'0,x'" in bad.output
