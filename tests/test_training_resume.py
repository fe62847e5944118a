"""Train states: --resume continues bit-exactly (N steps == N/2, a kill, --resume, N/2 more),
options that would change the run are refused, and a NaN/inf loss stops the run keeping the
last good state."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from sodiff import checkpoint
from sodiff.config import TINY
from sodiff.model import SODiff
from training import common, stage1, stage2
from training.config import EXIT_DIVERGED, Diverged
from training.stage1 import Stage1Config
from training.stage2 import Stage2Config
from fixtures.noise_images import noise_pngs

CROP = 16


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Three images larger than the crop: random crops, random QFs, epochs of 3 items."""
    return noise_pngs(tmp_path_factory.mktemp("data"), 3, (20, 24))


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    torch.manual_seed(0)
    return checkpoint.save(SODiff(TINY), tmp_path_factory.mktemp("init") / "ckpt")


def s1_config(out, data, **kw):
    base = dict(out=str(out), preset="tiny", align=False, data=str(data), crop=CROP,
                batch_size=1, grad_accum=2, max_steps=4, save_every=2, cpu=True,
                num_workers=0, lr=1e-3)
    return Stage1Config(**{**base, **kw})


def s2_config(out, data, init, **kw):
    base = dict(out=str(out), init=str(init), data=str(data), crop=CROP, batch_size=1,
                grad_accum=2, max_steps=4, save_every=2, cpu=True, num_workers=0,
                perceptual="none", lr=1e-3, disc_lr=1e-3)
    return Stage2Config(**{**base, **kw})


class Kill(BaseException):
    """Stands in for SIGKILL: nothing in the trainer catches it."""


def kill_on_call(monkeypatch, module, name, n):
    """Make `module.name` raise Kill on its n-th call (1-based)."""
    real, calls = getattr(module, name), []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise Kill()
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)


def assert_same(a, b, where=""):
    """Nested state (dicts, lists, tensors, numbers) equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_run(a: Path, b: Path, step: int):
    sa, sb = a / "train_state" / f"step-{step}", b / "train_state" / f"step-{step}"
    assert_same(load_file(str(sa / "weights.safetensors")),
                load_file(str(sb / "weights.safetensors")), "weights")
    assert_same(torch.load(sa / "optimizers.pt"), torch.load(sb / "optimizers.pt"), "optimizers")
    assert_same(torch.load(sa / "rng-0.pt", weights_only=True),
                torch.load(sb / "rng-0.pt", weights_only=True), "rng")
    ma, mb = (json.loads((s / "state.json").read_text()) for s in (sa, sb))
    assert (ma["position"], ma["epoch"], ma["index"]) == (mb["position"], mb["epoch"],
                                                          mb["index"])
    assert_same(load_file(str(a / "final" / "model.safetensors")),
                load_file(str(b / "final" / "model.safetensors")), "final")


def test_stage1_resume_is_bit_exact(tmp_path, data, monkeypatch):
    stage1.train(s1_config(tmp_path / "a", data))
    kill_on_call(monkeypatch, stage1, "stage1_loss", 5)  # step 3's first micro-batch
    with pytest.raises(Kill):
        stage1.train(s1_config(tmp_path / "b", data))
    assert [d.name for d in common.state_dirs(tmp_path / "b")] == ["step-2"]
    monkeypatch.undo()
    stage1.train(s1_config(tmp_path / "b", data, resume=True, num_workers=2))
    assert_same_run(tmp_path / "a", tmp_path / "b", 4)
    meta = json.loads((tmp_path / "a" / "train_state" / "step-4" / "state.json").read_text())
    assert (meta["position"], meta["epoch"], meta["index"]) == (8, 2, 2)  # 4 steps x 2 x 1


def test_stage2_resume_is_bit_exact(tmp_path, data, init, monkeypatch):
    stage2.train(s2_config(tmp_path / "a", data, init))
    kill_on_call(monkeypatch, stage2, "stage2_generator_loss", 6)  # step 3's 2nd micro-batch
    with pytest.raises(Kill):
        stage2.train(s2_config(tmp_path / "b", data, init))
    monkeypatch.undo()
    stage2.train(s2_config(tmp_path / "b", data, init, resume=True))
    assert_same_run(tmp_path / "a", tmp_path / "b", 4)
    opt = torch.load(tmp_path / "a" / "train_state" / "step-4" / "optimizers.pt")
    assert set(opt) == {"generator", "discriminator"}
    assert all(s["step"] == 4 for s in opt["discriminator"]["state"].values())


def test_resume_refuses_changed_options_and_missing_state(tmp_path, data):
    with pytest.raises(ValueError, match="no train state"):
        stage1.train(s1_config(tmp_path / "none", data, resume=True))
    stage1.train(s1_config(tmp_path / "a", data, max_steps=2))
    with pytest.raises(ValueError, match=r"lr: 0.001 -> 0.002"):
        stage1.train(s1_config(tmp_path / "a", data, max_steps=4, lr=2e-3, resume=True))
    with pytest.raises(ValueError, match="already holds a training run"):
        stage1.train(s1_config(tmp_path / "a", data, max_steps=4))
    # max_steps may grow: the run continues from step 2
    stage1.train(s1_config(tmp_path / "a", data, max_steps=4, resume=True))
    assert [d.name for d in common.state_dirs(tmp_path / "a")] == ["step-2", "step-4"]


def nan_on_call(monkeypatch, module, name, n, term):
    real, calls = getattr(module, name), []

    def wrapped(*args, **kwargs):
        calls.append(1)
        loss, terms = real(*args, **kwargs)
        if len(calls) >= n:
            loss, terms = loss * float("nan"), {**terms, term: terms[term] * float("nan")}
        return loss, terms

    monkeypatch.setattr(module, name, wrapped)


def test_nan_loss_stops_keeping_the_last_good_state(tmp_path, data, monkeypatch):
    nan_on_call(monkeypatch, stage1, "stage1_loss", 9, "rec")  # step 5's first micro-batch
    args = ["--preset", "tiny", "--no-align", "--data", str(data), "--out", str(tmp_path / "r"),
            "--crop", str(CROP), "--batch-size", "1", "--grad-accum", "2", "--max-steps", "8",
            "--save-every", "2", "--keep-last", "3", "--cpu", "--num-workers", "0"]
    res = CliRunner().invoke(stage1.main, args)
    assert res.exit_code == EXIT_DIVERGED, res.output
    assert "step 5: loss 'rec' = nan is not finite" in res.output
    assert "step-4" in res.output and "Traceback" not in res.output
    states = common.state_dirs(tmp_path / "r")
    assert [d.name for d in states] == ["step-2", "step-4"]
    assert not (tmp_path / "r" / "final").exists()
    weights = load_file(str(states[-1] / "weights.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_diverged_weights_are_never_saved(tmp_path, data):
    run = common.Run(s1_config(tmp_path / "r", data), "stage1")
    module = torch.nn.Linear(2, 2)
    run.track({"m": module}, {})
    run.dataset_len = 3
    assert (run.save(1) / "weights.safetensors").is_file()
    with torch.no_grad():
        module.weight[0, 1] = float("inf")
    with pytest.raises(Diverged, match=r"step 2: trained tensor m.weight is not finite.*"
                                       r"last good train state is .*step-1"):
        run.save(2)
    assert [d.name for d in common.state_dirs(tmp_path / "r")] == ["step-1"]
