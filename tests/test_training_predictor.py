"""Stage 1.5 (training.predictor): QF regression learns, the held-out evaluation is exact,
--resume is bit-exact, the output loads into stage 2, and bad options are named."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sodiff.config import TINY
from sodiff.predictor import TimestepPredictor
from training import predictor as stage15
from training.predictor import PredictorTrainConfig

CROP = 32


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Three textured 48 px images (random noise, smoothed), larger than the crop."""
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for i in range(3):
        noise = rng.random((48, 48, 3))
        img = (noise + np.roll(noise, 1, 0) + np.roll(noise, 1, 1)) / 3
        Image.fromarray((img * 255).astype(np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.fixture
def small_crops(monkeypatch):
    """The real minimum (256 px) would make these tests slow; the rule itself is tested below."""
    monkeypatch.setattr(stage15, "MIN_CROP", CROP)


def config(out, data, **kw):
    base = dict(out=str(out), data=data and str(data), crop=CROP, batch_size=4, max_steps=4,
                save_every=2, cpu=True, num_workers=0, lr=3e-3, lr_schedule="constant",
                preset="tiny")
    return PredictorTrainConfig(**{**base, **kw})


def test_qf_loss_falls_on_a_fixed_batch():
    from sodiff.jpeg import compress

    torch.manual_seed(0)
    pred = TimestepPredictor(TINY.predictor)
    rng = np.random.default_rng(1)
    image = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
    qfs = [5, 30, 60, 95]
    lq = torch.stack([torch.from_numpy(compress(image, q)[0]).permute(2, 0, 1).float() / 127.5 - 1
                      for q in qfs])
    qf = torch.tensor(qfs, dtype=torch.float32)
    opt = torch.optim.Adam(pred.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = stage15.qf_loss(pred, lq, qf)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
    assert pred.timestep_head.weight.grad is None  # QF alone never touches the timestep head


def test_evaluate_is_the_mean_absolute_qf_error(data):
    pred = TimestepPredictor(TINY.predictor)
    with torch.no_grad():
        pred.qf_head.bias.fill_(0.0)  # QF 50 for every input
    result = stage15.evaluate(pred, data, qfs=(10, 50, 90))
    assert result["images"] == 3
    assert result["per_qf"] == {"10": pytest.approx(40.0), "50": pytest.approx(0.0, abs=1e-4),
                                "90": pytest.approx(40.0)}
    assert result["qf_mae"] == pytest.approx(80 / 3, abs=1e-4)


def test_train_writes_a_loadable_predictor_and_resumes_exactly(tmp_path, data, small_crops):
    final = stage15.train(config(tmp_path / "a", data, val_data=str(data), val_every=2))
    meta = json.loads((final / "predictor.json").read_text())
    assert meta["config"]["front"] == "dct" and meta["eval"]["images"] == 3
    loaded = stage15.load_predictor(final)
    saved = load_file(str(final / "predictor.safetensors"))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in saved.items())
    assert not torch.equal(saved["qf_head.weight"], torch.zeros_like(saved["qf_head.weight"]))
    assert torch.equal(saved["timestep_head.weight"], torch.zeros_like(saved["timestep_head.weight"]))
    # Half the run, then --resume to the end: the same weights bit for bit.
    stage15.train(config(tmp_path / "b", data, max_steps=2))
    stage15.train(config(tmp_path / "b", data, resume=True))
    resumed = load_file(str(tmp_path / "b" / "final" / "predictor.safetensors"))
    assert all(torch.equal(resumed[k], v) for k, v in saved.items())


def test_stage2_starts_from_the_pretrained_predictor(tmp_path, data, small_crops):
    from sodiff import checkpoint
    from sodiff.model import SODiff
    from training import stage2
    from training.stage2 import Stage2Config

    final = stage15.train(config(tmp_path / "p", data))
    torch.manual_seed(0)
    init = checkpoint.save(SODiff(TINY), tmp_path / "init")
    cfg = Stage2Config(out=str(tmp_path / "s2"), init=str(init), data=str(data), crop=16,
                       perceptual="none", predictor=str(final), cpu=True)
    model = stage2.prepare_model(cfg)
    ref = stage15.load_predictor(final).state_dict()
    assert all(torch.equal(model.predictor.state_dict()[k], v) for k, v in ref.items())


@pytest.mark.parametrize("kw, message", [
    (dict(crop=128), "crop=128 must be >= 256"),
    (dict(crop=260), "crop=260 must be a multiple of 8"),
    (dict(val_qf=30), "val_qf=30 is not used"),
])
def test_invalid_options_are_named(tmp_path, data, kw, message):
    with pytest.raises(ValueError, match=message):
        stage15.validate_predictor_config(config(tmp_path, data, **kw))


def test_data_is_required(tmp_path):
    with pytest.raises(ValueError, match="data is required"):
        stage15.validate_predictor_config(config(tmp_path, None))


def test_a_folder_that_is_no_predictor_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not a stage-1.5 predictor folder"):
        stage15.load_predictor(tmp_path)


def test_bundled_stage15_predictor_loads_and_passed_its_check():
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "weights" / "tiny-predictor"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    pred = stage15.load_predictor(folder)
    meta = json.loads((folder / "predictor.json").read_text())
    assert pred.cfg.front == "dct" and meta["eval"]["images"] == 100
    assert meta["eval"]["qf_mae"] <= 6.0  # issue 13: held-out QF MAE <= 6 on BSDS500/val
