import dataclasses
import json

import pytest

from sodiff.config import PRESETS, TINY, ModelConfig, get_preset, parse_timestep_mode


def test_presets_round_trip_through_json():
    for cfg in PRESETS.values():
        again = ModelConfig.from_dict(json.loads(cfg.to_json()))
        assert again == cfg


def test_tiny_full_differs_from_tiny_only_in_lora_and_start_timestep():
    full = get_preset("tiny-full")
    assert full.lora is None and full.predictor.t_init == 50.0
    assert full.replace(name="tiny", lora=TINY.lora,
                        predictor=TINY.predictor.__class__(**{**full.predictor.__dict__,
                                                               "t_init": None})) == TINY


def test_sd21_sizes_follow_the_paper():
    cfg = PRESETS["sd21"]
    assert cfg.saipe.embed_dim == 180 and cfg.saipe.downsample == 4
    assert len(cfg.saipe.rstb_depths) == 2
    assert cfg.saipe.num_queries == 77 and cfg.saipe.prompt_dim == 1024
    assert cfg.lora.rank == 16
    assert cfg.pad_multiple == 64 and cfg.vae_factor == 8 and cfg.latent_channels == 4
    assert cfg.scaling_factor == pytest.approx(0.18215)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="sd21, tiny"):
        get_preset("sd15")


@pytest.mark.parametrize("change, needle", [
    (dict(saipe=TINY.saipe.__class__(**{**TINY.saipe.__dict__, "window_size": 3})), "window_size"),
    (dict(unet={**TINY.unet, "cross_attention_dim": 32}), "cross_attention_dim"),
    (dict(vae_class="AutoencoderXL"), "vae_class"),
    (dict(timestep_mode="fixed:2000"), "fixed:2000"),
    (dict(timestep_mode="sometimes"), "sometimes"),
    (dict(predictor=TINY.predictor.__class__(t_init=600.0)), "t_init=600.0"),
    (dict(predictor=TINY.predictor.__class__(t_init=0.0)), "t_init=0.0"),
    (dict(saipe=dataclasses.replace(TINY.saipe, pool_scale=0.5)), r"pool_scale=0.5 must"),
    (dict(saipe=dataclasses.replace(TINY.saipe, pool_scale="10")), r"pool_scale='10' must"),
])
def test_invalid_configs_name_the_offending_value(change, needle):
    with pytest.raises(ValueError, match=needle):
        TINY.replace(**change)


def test_unknown_keys_are_rejected():
    d = TINY.to_dict()
    d["saipe"]["depth_of_field"] = 3
    with pytest.raises(ValueError, match="depth_of_field"):
        ModelConfig.from_dict(d)


def test_timestep_modes():
    assert parse_timestep_mode("predicted") is None
    assert parse_timestep_mode("fixed:499") == 499.0
    assert parse_timestep_mode("fixed:12.5") == 12.5
    with pytest.raises(ValueError):
        parse_timestep_mode("fixed:abc")
