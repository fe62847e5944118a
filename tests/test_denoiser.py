"""Diffusion pretraining of the tiny UNet (training.denoiser): the noise-prediction loss learns,
the output is a base folder that stage 1/2 load, the latent scaling gives unit variance, the
noise-level table is written, --resume is bit-exact, and bad options are named."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sodiff.base import build_vae
from sodiff.config import TINY_FULL
from sodiff.schedule import alphas_cumprod
from training import denoiser
from training.denoiser import DenoiserConfig
from tolerance import NETWORK, assert_differs
from fixtures.noise_images import noise_pngs

CROP = 16


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("vae")
    build_vae(TINY_FULL.vae_class, TINY_FULL.vae).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return noise_pngs(tmp_path_factory.mktemp("data"), 3, (24, 20))


def config(out, data, vae_dir, **kw):
    base = dict(out=str(out), data=data and str(data), vae=str(vae_dir), crop=CROP,
                batch_size=2, max_steps=4, save_every=2, cpu=True, num_workers=0, lr=1e-3,
                warmup_steps=0, val_crop=CROP, val_images=2, lr_schedule="constant")
    return DenoiserConfig(**{**base, **kw})


def test_eps_loss_falls_on_a_fixed_batch():
    unet = denoiser.build_model(TINY_FULL, seed=0)
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(2, TINY_FULL.latent_channels, 8, 8, generator=g)
    noise = torch.randn(z0.shape, generator=g)
    t = torch.tensor([100, 600])
    table = alphas_cumprod()
    prompt = denoiser.null_prompt(TINY_FULL, 2, torch.device("cpu"))
    opt = torch.optim.Adam(unet.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        loss = denoiser.eps_loss(unet, z0, t, noise, table, prompt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(1.0, abs=0.3)  # zeroed output layer: predicts 0
    assert losses[-1] < 0.6 * losses[0]


def test_unit_variance_scaling(vae_dir):
    vae = denoiser.load_vae(vae_dir, "tiny-full")
    x = torch.rand(3, 3, CROP, CROP) * 2 - 1
    s = denoiser.unit_variance_scaling(vae, x)
    from sodiff.base import encode_mean

    with torch.no_grad():
        assert float(encode_mean(vae, x, s).std()) == pytest.approx(1.0, rel=1e-3)


def test_output_is_a_base_folder_and_resume_is_exact(tmp_path, data, vae_dir):
    from sodiff.model import SODiff

    final = denoiser.train(config(tmp_path / "a", data, vae_dir, val_data=str(data),
                                  val_every=2))
    vae_cfg = json.loads((final / "vae" / "config.json").read_text())
    noise = json.loads((final / "noise_levels.json").read_text())
    ev = json.loads((final / "eval.json").read_text())
    assert vae_cfg["scaling_factor"] == noise["scaling_factor"] == ev["scaling_factor"] > 0
    assert set(noise["per_qf"]) == {str(q) for q in denoiser.NOISE_QFS}
    assert all(v["tau"] >= 0 and v["latent_rms_error"] >= 0 for v in noise["per_qf"].values())
    assert set(ev["eps_mse"]) == {f"t{t}" for t in denoiser.EVAL_TIMESTEPS} | {"mean"}
    model = SODiff.from_base(TINY_FULL, final)
    assert model.cfg.scaling_factor == vae_cfg["scaling_factor"]
    weights = load_file(str(final / "unet" / "diffusion_pytorch_model.safetensors"))
    assert weights["conv_out.weight"].abs().sum() > 0  # the zeroed output layer trained
    denoiser.train(config(tmp_path / "b", data, vae_dir, max_steps=2))
    denoiser.train(config(tmp_path / "b", data, vae_dir, resume=True))
    resumed = load_file(str(tmp_path / "b" / "final" / "unet" /
                            "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(resumed[k], v) for k, v in weights.items())


def test_noise_levels_grow_as_quality_falls(vae_dir):
    vae = denoiser.load_vae(vae_dir, "tiny-full")
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    smooth = np.stack([xx, yy, (xx + yy) / 2], -1) * 2 - 1
    images = torch.from_numpy(smooth).permute(2, 0, 1)[None].float()
    levels = denoiser.noise_levels(vae, images, 1.0, alphas_cumprod(), qfs=(5, 50, 100))
    assert levels["5"]["latent_rms_error"] > levels["100"]["latent_rms_error"]
    assert levels["5"]["tau"] >= levels["100"]["tau"]


@pytest.mark.parametrize("kw, message", [
    (dict(crop=12), "crop=12 must be a multiple of 8"),
    (dict(preset="sd21"), "must be a tiny preset"),
    (dict(scaling=-1.0), "scaling=-1.0 must be a positive number"),
    (dict(val_qf=20), "val_qf=20 is not used"),
    (dict(saipe="/no/such/ckpt"), "saipe='/no/such/ckpt': checkpoint folder /no/such/ckpt does "
     "not exist"),
])
def test_invalid_options_are_named(tmp_path, data, vae_dir, kw, message):
    with pytest.raises(ValueError, match=message):
        denoiser.validate_denoiser_config(config(tmp_path, data, vae_dir, **kw))


def test_data_is_required(tmp_path, vae_dir):
    with pytest.raises(ValueError, match="data is required"):
        denoiser.validate_denoiser_config(config(tmp_path, None, vae_dir))


@pytest.fixture(scope="module")
def stage1_ckpt(tmp_path_factory):
    """A tiny-full checkpoint as stage 1 writes it (random SAIPE: its tokens differ by image)."""
    from sodiff import checkpoint
    from sodiff.model import SODiff

    torch.manual_seed(0)
    return checkpoint.save(SODiff(TINY_FULL), tmp_path_factory.mktemp("s1") / "final")


def test_prompts_come_from_saipe_or_are_zero(stage1_ckpt):
    saipe = denoiser.load_saipe(stage1_ckpt)
    assert not any(p.requires_grad for p in saipe.parameters())
    lq = torch.rand(2, 3, CROP, CROP, generator=torch.Generator().manual_seed(1)) * 2 - 1
    p = denoiser.prompts(saipe, lq, TINY_FULL)
    s = TINY_FULL.saipe
    assert p.shape == (2, s.num_queries, s.prompt_dim)
    assert_differs(p[1], p[0], NETWORK)  # two crops, two prompts
    assert denoiser.prompts(None, lq, TINY_FULL).eq(0).all()


def test_saipe_prompts_condition_the_training(tmp_path, data, vae_dir, stage1_ckpt):
    kw = dict(val_data=str(data), val_every=4)
    free = denoiser.train(config(tmp_path / "free", data, vae_dir, **kw))
    cond = denoiser.train(config(tmp_path / "cond", data, vae_dir, saipe=str(stage1_ckpt),
                                 val_qf=30, **kw))
    name = "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(str(free / name)), load_file(str(cond / name))
    assert any(not torch.equal(a[k], b[k]) for k in a)  # same seed, data and noise: the prompt
    ev = json.loads((cond / "eval.json").read_text())
    assert ev["prompt"] == {"saipe": str(stage1_ckpt), "val_qf": 30}
    assert ev["eps_mse"]["shuffled_mean"] != ev["eps_mse"]["mean"]
    assert json.loads((free / "eval.json").read_text())["prompt"] is None


def test_saipe_of_another_preset_is_refused(tmp_path, data, vae_dir, stage1_ckpt):
    bad = tmp_path / "bad"
    shutil.copytree(stage1_ckpt, bad)
    meta = json.loads((bad / "sodiff.json").read_text())
    meta["config"]["saipe"]["num_queries"] += 1
    (bad / "sodiff.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="its SAIPE config differs from preset 'tiny-full'"):
        denoiser.validate_denoiser_config(config(tmp_path, data, vae_dir, saipe=str(bad)))
