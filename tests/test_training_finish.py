"""training.loop.finish_run, the end that every training entry point shares: the run's bar
and logs close, then the main process alone runs the final evaluation (only when it is given
one), exports and says where, and every process waits. Each stage passes what it exports and
whether it evaluates; stages 1 and 2 validate during training only."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from sodiff import checkpoint
from sodiff.base import build_vae
from sodiff.config import TINY, TINY_FULL
from sodiff.model import SODiff
from training import denoiser, loop, predictor, stage1, stage2, vae
from training.common import FINAL_DIR, Run
from training.config import TrainConfig
from fixtures.noise_images import noise_pngs

CROP = 16
PREDICTOR_CROP = 32  # the predictor's smallest crop (its real minimum is patched down to it)
STAGES = ("stage1", "stage2", "vae", "predictor", "denoiser")
EVALUATES = {"vae", "predictor", "denoiser"}  # at the end, on --val-data

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return noise_pngs(tmp_path_factory.mktemp("data"), 3, (48, 48))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The stage-0 VAE of the denoiser and the stage-1 checkpoint of stage 2."""
    folder = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    build_vae(TINY_FULL.vae_class, TINY_FULL.vae).save_pretrained(folder / "vae",
                                                                   safe_serialization=True)
    checkpoint.save(SODiff(TINY), folder / "init")
    return folder


def fake_accelerator(main: bool, events: list) -> SimpleNamespace:
    return SimpleNamespace(is_main_process=main, wait_for_everyone=lambda: events.append("wait"))


def started_run(tmp_path, main: bool, events: list) -> Run:
    """A run with its bar and logs open, on a main or another process."""
    run = Run(TrainConfig(out=str(tmp_path / "run"), cpu=True, max_steps=1), "test")
    run.begin()
    run.acc = fake_accelerator(main, events)
    return run


def test_the_main_process_evaluates_after_closing_then_exports_then_waits(tmp_path, capsys):
    events = []
    run = started_run(tmp_path, True, events)

    def final_eval():
        events.append(("eval", run.bar is None and run.writer is None))
        return {"psnr": 1.0}

    final = loop.finish_run(run, lambda folder, ev: events.append(("export", folder, ev)),
                            final_eval)
    assert final == tmp_path / "run" / FINAL_DIR
    assert events == [("eval", True), ("export", final, {"psnr": 1.0}), "wait"]
    assert capsys.readouterr().out.splitlines()[-1] == f"[test] wrote {final}"


def test_without_a_final_eval_the_export_gets_none(tmp_path):
    events = []
    loop.finish_run(started_run(tmp_path, True, events),
                    lambda folder, ev: events.append(("export", ev)))
    assert events == [("export", None), "wait"]


def test_other_processes_close_and_wait_only(tmp_path, capsys):
    events = []
    run = started_run(tmp_path, False, events)
    final = loop.finish_run(run, lambda *a: events.append("export"),
                            lambda: events.append("eval"))
    assert final == tmp_path / "run" / FINAL_DIR
    assert events == ["wait"] and run.bar is None and run.writer is None
    assert "wrote" not in capsys.readouterr().out


def train_stage(name: str, out, data, inputs, val: bool):
    """One step of the stage's tiny run, with or without --val-data."""
    kw = dict(out=str(out), data=str(data), max_steps=1, batch_size=2, cpu=True,
              num_workers=0, val_data=str(data) if val else None, val_images=2)
    if name == "stage1":
        return stage1.train(stage1.Stage1Config(preset="tiny", align=False, crop=CROP, **kw))
    if name == "stage2":
        return stage2.train(stage2.Stage2Config(init=str(inputs / "init"), perceptual="none",
                                                w_gan=0, crop=CROP, **kw))
    if name == "vae":
        return vae.train(vae.VAEConfig(preset="tiny", crop=CROP, **kw))
    if name == "predictor":
        return predictor.train(predictor.PredictorTrainConfig(preset="tiny",
                                                              crop=PREDICTOR_CROP, **kw))
    return denoiser.train(denoiser.DenoiserConfig(vae=str(inputs / "vae"), crop=CROP,
                                                  val_crop=CROP, **kw))


def wrote_evaluation(name: str, final) -> bool:
    if name in ("stage1", "stage2"):
        meta = checkpoint.read_meta(final)
        assert meta["training"]["stage"] == int(name[-1])
        return False
    if name == "predictor":
        return "eval" in json.loads((final / predictor.META_FILE).read_text())
    files = {p.name for p in final.iterdir()}
    if name == "denoiser":  # its two held-out files come together
        assert (denoiser.NOISE_FILE in files) == (denoiser.EVAL_FILE in files)
    return {"vae": vae.EVAL_FILE, "denoiser": denoiser.EVAL_FILE}[name] in files


@pytest.mark.parametrize("val", [True, False], ids=["val", "no-val"])
@pytest.mark.parametrize("name", STAGES)
def test_each_stage_exports_and_evaluates_at_the_end_only_when_told(tmp_path, data, inputs,
                                                                     monkeypatch, name, val):
    monkeypatch.setattr(predictor, "MIN_CROP", PREDICTOR_CROP)
    told, real = [], loop.finish_run

    def spy(run, export, final_eval=None):
        told.append(final_eval is not None)
        return real(run, export, final_eval)

    monkeypatch.setattr(loop, "finish_run", spy)
    final = train_stage(name, tmp_path / "run", data, inputs, val)
    assert final == tmp_path / "run" / FINAL_DIR and final.is_dir()
    assert told == [val and name in EVALUATES]
    assert wrote_evaluation(name, final) == told[0]
