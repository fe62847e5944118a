"""training.config's CLI plumbing: every config field becomes an option of the right type."""
from __future__ import annotations

import dataclasses

import click
import pytest

from training import denoiser, predictor, stage1, stage2, vae

CLIS = [(stage1.main, stage1.Stage1Config), (stage2.main, stage2.Stage2Config),
        (vae.main, vae.VAEConfig), (predictor.main, predictor.PredictorTrainConfig),
        (denoiser.main, denoiser.DenoiserConfig)]
NUMBERS = {"int | None": click.INT, "float | None": click.FLOAT}


@pytest.mark.parametrize("command, cls", CLIS, ids=lambda x: getattr(x, "__name__", ""))
def test_optional_numbers_parse_as_numbers(command, cls):
    # --view-crop 256 once reached stage 2 as the string "256" (its default None gave click
    # no type), and the config check failed comparing it with an int.
    options = {p.name: p for p in command.params}
    fields = [f for f in dataclasses.fields(cls) if f.type in NUMBERS]
    assert fields
    for f in fields:
        assert options[f.name].type == NUMBERS[f.type], f.name
