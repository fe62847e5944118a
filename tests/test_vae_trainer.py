"""Stage-0 VAE trainer: the L1 round trip learns, the output is a loadable diffusers folder,
--resume is bit-exact, and bad options are named ValueErrors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sodiff.config import TINY
from training import vae as vae_mod
from training.vae import VAEConfig

CROP = 16


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Smooth synthetic images (gradients + a blob), larger than the crop; one odd-sized."""
    folder = tmp_path_factory.mktemp("data")
    yy, xx = np.mgrid[0:21, 0:27] / 20.0
    for i in range(3):
        img = np.stack([xx * (i + 1), yy, np.sin(3 * xx + i) * 0.5 + 0.5], -1) % 1.0
        Image.fromarray((img * 255).astype(np.uint8)).save(folder / f"{i}.png")
    return folder


def config(out, data, **kw):
    base = dict(out=str(out), data=data and str(data), crop=CROP, batch_size=2, max_steps=4,
                save_every=2, cpu=True, num_workers=0, lr=1e-3, lr_schedule="constant")
    return VAEConfig(**{**base, **kw})


def test_l1_falls_on_a_fixed_batch(data):
    vae = vae_mod.build_model(TINY, seed=0)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, CROP, CROP, generator=g) * 2 - 1
    x = torch.nn.functional.avg_pool2d(x, 3, 1, 1)  # some spatial structure
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    losses = []
    for _ in range(40):
        loss = vae_mod.l1_loss(vae, x, TINY.vae_factor)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_batch_is_half_jpeg_half_clean():
    batch = {"lq": torch.zeros(4, 3, 2, 2), "hq": torch.ones(4, 3, 2, 2)}
    x = vae_mod.autoencoder_inputs(batch)
    assert x[:2].eq(0).all() and x[2:].eq(1).all()


def test_output_loads_with_from_pretrained_and_round_trips(tmp_path, data):
    from diffusers import AutoencoderTiny

    final = vae_mod.train(config(tmp_path / "run", data, val_data=str(data)))
    assert (final / "config.json").is_file()
    assert (final / "diffusion_pytorch_model.safetensors").is_file()
    vae = AutoencoderTiny.from_pretrained(str(final)).eval()
    image = torch.rand(1, 3, 21, 27) * 2 - 1  # odd sides: padded to the factor, cropped back
    out = vae_mod.roundtrip(vae, image, TINY.vae_factor)
    assert out.shape == image.shape
    z = vae.encode(image[..., :20, :26]).latents
    assert z.shape == (1, TINY.latent_channels, 10, 13)
    ev = json.loads((final / "eval.json").read_text())
    assert ev["images"] == 3 and set(ev["per_image"]) == {"0.png", "1.png", "2.png"}
    again = vae_mod.evaluate_folder(final, data)
    assert again["psnr"] == pytest.approx(ev["psnr"], abs=1e-9)


def test_roundtrip_psnr_is_exact_for_an_identity_like_error():
    """The PSNR helper compares uint8 outputs with the references: +inf for a perfect copy."""
    class Identity(torch.nn.Module):
        def encode(self, x):
            return type("O", (), {"latents": x})()

        def decode(self, z):
            return type("O", (), {"sample": z})()

    image = (np.arange(5 * 7 * 3) % 256).astype(np.uint8).reshape(5, 7, 3)
    result = vae_mod.roundtrip_psnr(Identity(), [("a", image)], factor=2)
    assert result["psnr"] == float("inf") and result["images"] == 1
    assert result["signed_error_rgb"] == [0.0, 0.0, 0.0]
    # With qf the input is the JPEG, compared with the clean image: the JPEG's own error.
    from sodiff.jpeg import compress
    from sodiff.metrics import psnr

    smooth = np.stack(np.mgrid[0:32, 0:32], -1).sum(-1, keepdims=True).repeat(3, -1) * 4
    smooth = smooth.astype(np.uint8)
    jpeg = compress(smooth, 10)[0]
    at10 = vae_mod.roundtrip_psnr(Identity(), [("s", smooth)], factor=2, qf=10)
    assert at10["qf"] == 10 and at10["psnr"] == pytest.approx(psnr(jpeg, smooth))
    assert at10["signed_error_rgb"] == pytest.approx(
        (jpeg.astype(float) - smooth).mean(axis=(0, 1)).tolist())


def test_resume_is_bit_exact(tmp_path, data):
    vae_mod.train(config(tmp_path / "a", data))
    vae_mod.train(config(tmp_path / "b", data, max_steps=2))
    vae_mod.train(config(tmp_path / "b", data, resume=True))
    for name in ("train_state/step-4/weights.safetensors",
                 "final/diffusion_pytorch_model.safetensors"):
        a, b = load_file(str(tmp_path / "a" / name)), load_file(str(tmp_path / "b" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    meta = json.loads((tmp_path / "b" / "train_state" / "step-4" / "state.json").read_text())
    assert meta["position"] == 8


@pytest.mark.parametrize("kw, match", [
    (dict(crop=15), "crop=15 must be a multiple of the VAE factor 2"),
    (dict(batch_size=1), "batch_size=1 must be >= 2"),
    (dict(data=None), "data is required"),
    (dict(preset="nope"), "preset='nope'"),
    (dict(val_qf=30), "val_qf=30 is not used"),
    (dict(qf_min=50, qf_max=40), r"qf range \[50, 40\]"),
])
def test_bad_options_are_named(tmp_path, data, kw, match):
    with pytest.raises(ValueError, match=match):
        vae_mod.train(config(tmp_path / "run", **{"data": data, **kw}))
    assert not (tmp_path / "run").exists()


def test_refuses_to_overwrite_a_run(tmp_path, data):
    vae_mod.train(config(tmp_path / "run", data, max_steps=2))
    with pytest.raises(ValueError, match="already holds a training run"):
        vae_mod.train(config(tmp_path / "run", data, max_steps=2))


def test_init_starts_from_the_given_weights(tmp_path, data):
    first = vae_mod.train(config(tmp_path / "a", data))
    again = vae_mod.build_model(TINY, seed=1, init=str(first))
    saved = load_file(str(first / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(again.state_dict()[k], v) for k, v in saved.items())
    fresh = vae_mod.build_model(TINY, seed=0)
    assert not all(torch.equal(fresh.state_dict()[k], v) for k, v in saved.items())
    second = vae_mod.train(config(tmp_path / "b", data, init=str(first), max_steps=1))
    moved = load_file(str(second / "diffusion_pytorch_model.safetensors"))
    step = max((moved[k] - v).abs().max().item() for k, v in saved.items())
    assert 0 < step < 0.01  # one small step away from `first`, not from a random start


def test_bad_init_folders_are_named(tmp_path, data):
    with pytest.raises(ValueError, match="is not a diffusers VAE folder: config.json"):
        vae_mod.train(config(tmp_path / "run", data, init=str(tmp_path)))
    first = vae_mod.train(config(tmp_path / "a", data, max_steps=1))
    cfg = json.loads((first / "config.json").read_text())
    (first / "config.json").write_text(json.dumps({**cfg, "latent_channels": 4}))
    with pytest.raises(ValueError, match="'latent_channels': 4.*differ from preset 'tiny'"):
        vae_mod.train(config(tmp_path / "run", data, init=str(first)))
    assert not (tmp_path / "run").exists()
