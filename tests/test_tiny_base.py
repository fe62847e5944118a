"""training.tiny_base: the tiny presets' own base folder (zeroed UNet output + stage-0 VAE)."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from sodiff.base import BaseModelError, build_vae, decode, encode_mean
from sodiff.config import TINY_FULL
from sodiff.model import SODiff
from sodiff.schedule import interp_alpha
from training import tiny_base
from tolerance import NETWORK, assert_close

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def vae_dir(tmp_path):
    torch.manual_seed(0)
    folder = tmp_path / "vae"
    build_vae(TINY_FULL.vae_class, TINY_FULL.vae).save_pretrained(folder, safe_serialization=True)
    return folder


def test_base_starts_as_the_vae_round_trip(tmp_path, vae_dir):
    base = tiny_base.make_base(vae_dir, tmp_path / "base", seed=3)
    model = SODiff.from_base(TINY_FULL, base).eval()
    assert not model.unet.conv_out.weight.any() and not model.unet.conv_out.bias.any()
    assert model.unet.conv_in.weight.std() > 0  # the rest is a normal random init
    lq = torch.rand(1, 3, 32, 40) * 2 - 1
    with torch.no_grad():
        out = model(lq)
        z = encode_mean(model.vae, lq, 1.0)
        alpha = interp_alpha(model.alphas_cumprod, out.tau)
        expected = decode(model.vae, z / alpha.sqrt(), 1.0)
    assert out.tau.item() == pytest.approx(TINY_FULL.predictor.t_init, rel=1e-4)
    assert_close(out.decoded, expected, NETWORK)
    assert (base / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (vae_dir / "diffusion_pytorch_model.safetensors").read_bytes()


def test_same_seed_same_unet(tmp_path, vae_dir):
    a = tiny_base.make_base(vae_dir, tmp_path / "a", seed=1) / "unet" / \
        "diffusion_pytorch_model.safetensors"
    b = tiny_base.make_base(vae_dir, tmp_path / "b", seed=1) / "unet" / \
        "diffusion_pytorch_model.safetensors"
    assert a.read_bytes() == b.read_bytes()


def test_refuses_to_overwrite_and_names_bad_vaes(tmp_path, vae_dir):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        tiny_base.make_base(vae_dir, out)
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1
    with pytest.raises(BaseModelError, match="config.json"):
        tiny_base.make_base(tmp_path / "nothing", tmp_path / "b1")
    cfg = json.loads((vae_dir / "config.json").read_text())
    (vae_dir / "config.json").write_text(json.dumps({**cfg, "latent_channels": 4}))
    with pytest.raises(ValueError, match="latent_channels"):
        tiny_base.make_base(vae_dir, tmp_path / "b2")
    with pytest.raises(ValueError, match="sd21"):
        tiny_base.make_base(vae_dir, tmp_path / "b3", preset="sd21")


def test_cli_reports_errors_without_a_traceback(tmp_path, vae_dir):
    runner = CliRunner()
    ok = runner.invoke(tiny_base.main, ["--vae", str(vae_dir), "--out", str(tmp_path / "b")])
    assert ok.exit_code == 0, ok.output
    again = runner.invoke(tiny_base.main, ["--vae", str(vae_dir), "--out", str(tmp_path / "b")])
    assert again.exit_code == 1 and "not empty" in again.output
    assert "Traceback" not in again.output
