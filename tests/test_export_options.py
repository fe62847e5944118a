"""sodiff-export's option layer: the target table, parsers, refused combinations, the CLI's
error paths (no model is exported here)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from click.testing import CliRunner

from export import source
from export.cli import main
from export.errors import OptionError
from export.options import (ExportOptions, parse_batch, parse_dynamic, parse_precisions,
                            parse_size, parse_timestep)
from export.plan import resolve_plan
from export.targets import TARGETS, get_target


def opts(tmp_path: Path, **kw) -> ExportOptions:
    return ExportOptions(out=tmp_path / "eng", **kw)


def refused(o: ExportOptions, *fragments: str) -> None:
    with pytest.raises(OptionError) as e:
        resolve_plan(o)
    for f in fragments:
        assert f in str(e.value), (f, str(e.value))


def test_targets_aliases_and_suggestions():
    assert get_target("TensorRT").name == "trt"
    assert get_target("ort").name == "onnx"
    with pytest.raises(OptionError, match="did you mean 'onnx'"):
        get_target("onxx")
    with pytest.raises(OptionError, match="did you mean 'tensorrt'"):
        get_target("tensorrtt")
    names = [n for t in TARGETS for n in (t.name, *t.aliases)]
    assert len(names) == len(set(names)), "a name may belong to one target only"


def test_parsers():
    assert parse_size("512", "--shape") == (512, 512)
    assert parse_size("256x384", "--shape") == (256, 384)
    assert parse_dynamic("256:512:1024x768") == ((256, 256), (512, 512), (1024, 768))
    assert parse_batch("2") == (2, 2, 2) and parse_batch("1:2:4") == (1, 2, 4)
    assert parse_precisions(["fp16", "vae_decoder=fp32"]) == ("fp16", (("vae_decoder", "fp32"),))
    assert parse_timestep("fixed:250.5") == ("fixed", 250.5)
    for bad in (lambda: parse_size("0", "--shape"), lambda: parse_dynamic("1:2"),
                lambda: parse_batch("4:2:1"), lambda: parse_timestep("fixd:3"),
                lambda: parse_timestep("fixed:5000"),
                lambda: parse_precisions(["fp16", "fp32"])):
        with pytest.raises(OptionError):
            bad()


def test_components_and_precisions(tmp_path):
    o = opts(tmp_path, target="trt", timestep="fixed:300",
             precision_overrides=(("vae_decoder", "fp32"),))
    plan = resolve_plan(o)
    assert plan.target.name == "trt" and plan.timestep_mode == "fixed" and plan.fixed_tau == 300
    assert plan.components == ("saipe", "vae_encoder", "unet", "vae_decoder")
    assert plan.precision == {"saipe": "fp16", "vae_encoder": "fp16", "unet": "fp16",
                              "vae_decoder": "fp32"}
    assert resolve_plan(opts(tmp_path)).precision["unet"] == "fp32"  # onnx defaults to fp32
    with pytest.raises(TypeError):  # frozen: no stage can change what was resolved
        plan.precision["unet"] = "fp32"


@pytest.mark.parametrize("kw,fragments", [
    (dict(timestep="calibrated"), ["needs --calibration"]),
    (dict(timestep="fixed:300", components=("predictor", "unet")), ["predictor is dropped"]),
    (dict(shape=(512, 512), dynamic=((256, 256), (512, 512), (1024, 1024))),
     ["exclude each other"]),
    (dict(precision_overrides=(("vae_decodr", "fp32"),)), ["did you mean 'vae_decoder'"]),
    (dict(components=("unet",), precision_overrides=(("saipe", "fp32"),)),
     ["saipe is not exported"]),
    (dict(components=("unte",)), ["did you mean 'unet'"]),
    (dict(timing_cache=Path("c")), ["TensorRT option"]),
    (dict(preset="tiny"), ["without --random-weights"]),
    (dict(random_weights=True), ["needs --preset"]),
    (dict(checkpoint=Path("ck"), preset="tiny", random_weights=True), ["one or the other"]),
    (dict(base=Path("b"), preset="tiny", random_weights=True), ["--base is only used"]),
    (dict(target="trt", opset=20), ["outside 17..18"]),
    (dict(precision="bf16"), ["not available"]),
    (dict(preset="sd21", random_weights=True, timestep="calibrated",
          calibration=Path("/")), ["untrained predictor"]),
    (dict(dynamic=((512, 512), (256, 256), (1024, 1024))), ["MIN <= OPT <= MAX"]),
    (dict(samples=0), ["at least 1 sample"]),
    (dict(preset="sd2l", random_weights=True), ["did you mean 'sd21'"]),
])
def test_refused_combinations(tmp_path, kw, fragments):
    refused(opts(tmp_path, **kw), *fragments)


def test_every_problem_is_reported_at_once(tmp_path):
    refused(opts(tmp_path, timestep="calibrated", timing_cache=Path("c"), samples=0),
            "needs --calibration", "TensorRT option", "at least 1 sample")


def test_shapes_must_fit_the_model(tmp_path):
    def sizes(pad_multiple, saipe_size, **kw):
        return resolve_plan(opts(tmp_path, **kw)).for_model(pad_multiple, saipe_size).sizes

    assert sizes(64, 512, shape=(512, 768)) == ((512, 768),) * 3
    assert sizes(64, 512) == ((512, 512),) * 3  # no --shape: SAIPE's input size
    assert sizes(8, 64, dynamic=((8, 8), (64, 64), (128, 96))) == ((8, 8), (64, 64), (128, 96))
    with pytest.raises(OptionError, match="multiples of the model's pad_multiple 64"):
        sizes(64, 512, shape=(500, 512))
    with pytest.raises(OptionError, match="at least 8"):
        sizes(4, 64, shape=(4, 4))


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None,
                    reason="TensorRT is installed: the missing-TensorRT path does not apply")
def test_cli_trt_without_tensorrt_writes_nothing(tmp_path):
    out = tmp_path / "eng"
    r = CliRunner().invoke(main, ["--preset", "tiny", "--random-weights", "--target",
                                  "tensorrt", "--out", str(out)])
    assert r.exit_code != 0
    assert "TensorRT is not installed" in r.output and "nothing was written" in r.output
    assert "Traceback" not in r.output
    assert not out.exists()


def test_cli_missing_default_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(source, "DEFAULT_CHECKPOINT", tmp_path / "weights" / "tiny")
    r = CliRunner().invoke(main, ["--out", str(tmp_path / "eng")])
    assert r.exit_code == 1
    assert "bundled default checkpoint" in r.output and "--random-weights" in r.output
    assert not (tmp_path / "eng").exists()


def test_cli_usage_error_exit_code_and_one_line(tmp_path):
    r = CliRunner().invoke(main, ["--preset", "tiny", "--random-weights", "--target", "onxx",
                                  "--out", str(tmp_path / "eng")])
    assert r.exit_code == 2
    assert r.output.strip().startswith("error:") and "did you mean 'onnx'" in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_cli_refuses_foreign_output_folder(tmp_path):
    out = tmp_path / "eng"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = CliRunner().invoke(main, ["--preset", "tiny", "--random-weights", "--out", str(out)])
    assert r.exit_code == 1 and "not from sodiff-export" in r.output
    assert (out / "notes.txt").read_text() == "mine" and len(list(out.iterdir())) == 1


@pytest.mark.parametrize("kw,match", [
    (dict(dynamic=((8, 8), (256, 256), (1_000_000, 1_000_000))), "16384"),
    (dict(shape=(512, 20_000)), "16384"),
    (dict(batch=(1, 1, 100_000)), "256")])
def test_sizes_are_bounded(tmp_path, kw, match):
    """Engines past these sizes cannot be built or held, and the runtime refuses their dirs:
    the export says so before loading anything."""
    with pytest.raises(OptionError, match=match):
        resolve_plan(ExportOptions(out=tmp_path / "e", preset="tiny", random_weights=True, **kw))
