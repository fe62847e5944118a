import json

import pytest
import torch
from safetensors.torch import load_file

from sodiff import checkpoint
from sodiff.checkpoint import CheckpointError
from sodiff.config import TINY
from sodiff.model import SODiff
from tolerance import NETWORK, assert_close


def test_round_trip_is_bit_exact(tiny_model, tmp_path):
    checkpoint.save(tiny_model, tmp_path / "ck")
    again = checkpoint.load(tmp_path / "ck")
    assert again.cfg == tiny_model.cfg
    a, b = tiny_model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.equal(tiny_model.eval()(x).restored, again.eval()(x).restored)


def test_lora_is_also_written_in_diffusers_format(tiny_model, tmp_path):
    checkpoint.save(tiny_model, tmp_path / "ck")
    lora = load_file(tmp_path / "ck" / "pytorch_lora_weights.safetensors")
    assert lora and all(k.startswith("unet.") and ".lora_" in k for k in lora)
    # A fresh diffusers UNet loads it through diffusers' own LoRA loader and then matches.
    fresh = SODiff(TINY)
    fresh.unet.delete_adapters("default")
    fresh.unet.load_state_dict(tiny_model.unet.state_dict(), strict=False)  # base weights
    fresh.unet.load_lora_adapter(str(tmp_path / "ck"), prefix="unet",
                                 weight_name="pytorch_lora_weights.safetensors",
                                 adapter_name="default")
    z, t = torch.randn(1, TINY.latent_channels, 16, 16), torch.tensor([300.0])
    p = torch.randn(1, 77, 64)
    with torch.no_grad():
        want = tiny_model.unet(z, t, encoder_hidden_states=p).sample
        got = fresh.unet(z, t, encoder_hidden_states=p).sample
    assert_close(got, want, NETWORK)


def test_resave_replaces_atomically(tiny_model, tmp_path):
    checkpoint.save(tiny_model, tmp_path / "ck")
    checkpoint.save(tiny_model, tmp_path / "ck")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_truncated_weights_are_reported(tiny_model, tmp_path):
    ck = checkpoint.save(tiny_model, tmp_path / "ck")
    w = ck / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        checkpoint.load(ck)


def test_corrupted_json_is_reported(tiny_model, tmp_path):
    ck = checkpoint.save(tiny_model, tmp_path / "ck")
    (ck / "sodiff.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        checkpoint.load(ck)


def test_unknown_version_is_rejected(tiny_model, tmp_path):
    ck = checkpoint.save(tiny_model, tmp_path / "ck")
    meta = json.loads((ck / "sodiff.json").read_text())
    meta["format_version"] = 99
    (ck / "sodiff.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="version 99"):
        checkpoint.load(ck)


def test_missing_and_misshaped_tensors_are_named(tiny_model, tmp_path):
    from safetensors.torch import save_file

    ck = checkpoint.save(tiny_model, tmp_path / "ck")
    weights = load_file(ck / "model.safetensors")
    del weights["predictor.qf_head.bias"]
    weights["predictor.stem.weight"] = torch.zeros(1, 2, 3)
    save_file(weights, ck / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(ck)
    assert "predictor.qf_head.bias" in str(err.value)
    assert "predictor.stem.weight: shape (1, 2, 3)" in str(err.value)


def test_missing_folder_and_non_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="sodiff.json is missing"):
        checkpoint.load(tmp_path / "empty")
