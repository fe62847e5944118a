"""Stage 1 (SAIPE) training: over-fitting, the final checkpoint, options and the CLI."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file, save_file

from sodiff import checkpoint
from training import stage1
from training.config import with_crops
from training.loop import lr_at
from training.stage1 import Stage1Config
from training.text_embeddings import INDEX_FILE, SHARD_PATTERN, TENSOR_NAME

CROP = 16


pytestmark = pytest.mark.usefixtures("one_thread")


def smooth_image(path, h, w, seed):
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([128 + 90 * np.sin(xx / (3 + seed)), 128 + 90 * np.cos(yy / 4),
                    40 + 6 * xx + 20 * seed], -1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path)
    return path


def write_store(folder, rows):
    """A text-embedding store in training.text_embeddings' layout: (image, box, embedding)."""
    folder.mkdir(parents=True)
    shard = SHARD_PATTERN.format(0)
    save_file({TENSOR_NAME: torch.stack([e for _, _, e in rows]).half()}, str(folder / shard))
    with (folder / INDEX_FILE).open("w") as f:
        for i, (image, box, _) in enumerate(rows):
            f.write(json.dumps({"shard": shard, "row": i, "image": str(image), "box": box,
                                "caption": f"caption {i}"}) + "\n")
    return folder


@pytest.fixture
def store(tmp_path):
    # Like CLIP states (padding tokens dominate, a few channels carry large offsets): a shared
    # per-channel component plus per-caption, per-token variation.
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(64, generator=g)
    rows = [(smooth_image(tmp_path / "img" / f"{i}.png", 24, 24, i), [4, 4, 4 + CROP, 4 + CROP],
             shared + 0.3 * torch.randn(77, 64, generator=g)) for i in range(2)]
    return write_store(tmp_path / "store", rows)


def config(tmp_path, **kw):
    base = dict(out=str(tmp_path / "run"), preset="tiny", crop=CROP, batch_size=2,
                qf_min=30, qf_max=30, max_steps=2, cpu=True, num_workers=0, save_every=100,
                log_every=1)
    return Stage1Config(**{**base, **kw})



def test_overfits_a_fixed_batch_and_exports_a_loadable_checkpoint(tmp_path, store, logged):
    # Two captioned crops at one QF and batch 2: every step sees the same batch. 60 steps: the
    # L1 falls slower than the alignment term, and 30 left some seeds near its bound.
    cfg = config(tmp_path, embeddings=str(store), lr=2e-3, max_steps=60)
    final = stage1.train(cfg)
    assert len(logged) == 60
    for row in logged:
        for k in ("rec", "align", "total"):
            assert np.isfinite(row[k]) and row[k] > 0, (k, row)
    last = {k: np.mean([r[k] for r in logged[-3:]]) for k in ("rec", "total")}
    assert last["total"] <= 0.5 * logged[0]["total"], (logged[0], last)
    assert last["rec"] <= 0.75 * logged[0]["rec"], (logged[0], last)
    model = checkpoint.load(final)
    trained = load_file(str(tmp_path / "run" / "train_state" / "step-60" / "weights.safetensors"))
    for k, v in model.saipe.state_dict().items():
        if f"saipe.{k}" in trained:
            assert torch.equal(v, trained[f"saipe.{k}"]), k
    assert len(trained) == sum(1 for _ in model.saipe.parameters())


def test_no_align_trains_on_a_folder_and_validates(tmp_path, logged, capsys):
    for i in range(3):
        smooth_image(tmp_path / "data" / f"{i}.png", 20, 20, i)
    cfg = config(tmp_path, align=False, data=str(tmp_path / "data"), val_data=str(
        tmp_path / "data"), val_every=2, val_crop=CROP, val_images=2)
    stage1.train(cfg)
    assert all(r["align"] == 0 and r["rec"] > 0 for r in logged)
    out = capsys.readouterr()
    assert "alignment loss OFF" in out.out + out.err
    assert "validation PSNR" in out.out + out.err
    assert list((tmp_path / "run" / "logs").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("kw, message", [
    (dict(align=True), "needs embeddings"),
    (dict(align=False), "needs data"),
    (dict(align=False, data="x", preset="sd21"), "needs base"),
    (dict(align=False, data="x", crop=0), "crop=0"),
    (dict(align=False, data="x", qf_min=50, qf_max=40), r"qf range \[50, 40\]"),
    (dict(align=False, data="x", lr=-1.0), "lr=-1.0"),
    (dict(align=False, data="x", embeddings="s"), "embeddings='s' given with --no-align"),
])
def test_invalid_options_are_named(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        stage1.validate_train_config(config(tmp_path, **kw))


def test_missing_base_fails_before_training(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        stage1.train(config(tmp_path, align=False, data=str(tmp_path), preset="sd21",
                            base=str(tmp_path / "no-sd21")))
    assert not (tmp_path / "run").exists()


def test_crop_defaults_follow_the_preset(tmp_path):
    unset = config(tmp_path, crop=None)
    assert (with_crops(unset, "tiny").crop, with_crops(unset, "sd21").crop) == \
        (64, 512)
    assert with_crops(config(tmp_path, crop=32), "sd21").val_crop == 32
    assert with_crops(config(tmp_path, crop=32, val_crop=48), "tiny").val_crop == 48


def test_lr_schedule_is_a_pure_function_of_the_step(tmp_path):
    cfg = config(tmp_path, lr=1.0, warmup_steps=4, max_steps=14, lr_schedule="cosine")
    lrs = [lr_at(s, cfg) for s in range(14)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[9] == pytest.approx(0.5) and lrs[13] < lrs[12] < lrs[4]
    assert all(lr_at(s, config(tmp_path, lr=0.1)) == 0.1 for s in range(5))


def test_cli_bad_input_is_one_line_and_nothing_is_overwritten(tmp_path):
    (tmp_path / "run" / "final").mkdir(parents=True)
    runner = CliRunner()
    args = ["--preset", "tiny", "--no-align", "--data", str(tmp_path), "--out",
            str(tmp_path / "run"), "--cpu"]
    res = runner.invoke(stage1.main, args)
    assert res.exit_code == 1 and "already holds a training run" in res.output
    assert "Traceback" not in res.output
    res = runner.invoke(stage1.main, args[:-3] + ["--out", str(tmp_path / "new"), "--crop", "0"])
    assert res.exit_code == 1 and "crop=0 must be >= 1" in res.output
    assert not (tmp_path / "new").exists()


def test_module_help_runs():
    res = subprocess.run([sys.executable, "-m", "training.stage1", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0
    for flag in ("--embeddings", "--no-align", "--lambda-align", "--resume",
                 "--mixed-precision", "--grad-accum"):
        assert flag in res.stdout


@pytest.mark.parametrize("env,flag,want", [("bf16", None, "bf16"), (None, None, "no"),
                                           ("bf16", "no", "no")])
def test_accelerate_launch_precision_stands_unless_the_flag_is_given(tmp_path, store, monkeypatch,
                                                                     env, flag, want):
    """`accelerate launch --mixed_precision bf16` sets ACCELERATE_MIXED_PRECISION; without
    --mixed-precision the script passes nothing, so that choice stands and is logged."""
    if env is None:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", env)
    kw = {} if flag is None else {"mixed_precision": flag}
    from accelerate.state import AcceleratorState

    from training import common
    lines = []
    monkeypatch.setattr(common.Run, "info", lambda self, msg: lines.append(msg))
    AcceleratorState._reset_state(True)  # one state per process: as a fresh launch sees it
    try:
        run = common.Run(config(tmp_path, embeddings=str(store), **kw), "stage1")
        assert run.acc.mixed_precision == want
        run.begin()
        run.close()
    finally:
        AcceleratorState._reset_state(True)
    assert any(f"mixed precision {want}," in line for line in lines), lines
