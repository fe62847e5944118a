"""Stage 2 (one-step diffusion) training: over-fitting, what trains and what stays frozen, the
generator's GAN gradient, options, the CLI and a 2-process accelerate launch on CPU."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

from sodiff import checkpoint
from sodiff.base import decode
from sodiff.config import TINY, TINY_UNET
from sodiff.model import SODiff
from training import stage2
from training.dists import DISTS
from training.losses import Stage2Weights
from training.stage2 import Stage2Config
from tolerance import NETWORK, assert_close
from fixtures.noise_images import noise_pngs

REPO = Path(__file__).resolve().parents[1]
CROP = 16


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    """A stage-1 style checkpoint of the tiny preset (seeded random weights).

    A fresh SAIPE's pooling queries start at 0.02 scale, so its 77 prompt tokens are nearly
    identical; cross-attention then cannot tell them apart and its query projections get ~no
    gradient. Spread queries stand in for a trained SAIPE's distinct tokens. Likewise a random
    AutoencoderTiny decoder's outputs sit near -1 (black); a +0.5 bias on its last conv (outputs
    are 2 * net - 1) centres them, as a trained VAE's would be."""
    torch.manual_seed(0)
    model = SODiff(TINY)
    with torch.no_grad():
        model.saipe.t_align.pool.queries.normal_(0, 1, generator=torch.Generator().manual_seed(2))
        model.vae.decoder.layers[-1].bias += 0.5
    return checkpoint.save(model, tmp_path_factory.mktemp("init") / "ckpt")


@pytest.fixture(scope="module")
def images(init, tmp_path_factory):
    """Two 16 px images the frozen random tiny VAE can represent (its decoder's outputs), so a
    perfect fit exists: natural images lie far outside a random decoder's range."""
    return decoder_images(init, tmp_path_factory.mktemp("images"), 2, 2.0)


def decoder_images(init, folder: Path, n: int, scale: float) -> Path:
    """`n` PNGs in `folder`: the decoder of `init`'s VAE on latents of std `scale`."""
    vae = checkpoint.load(init).vae
    with torch.no_grad():
        x = decode(vae, scale * torch.randn(n, TINY.latent_channels, 8, 8, generator=torch.Generator().manual_seed(5)),
                   1.0).clamp(-1, 1)
    for i, img in enumerate(x):
        arr = ((img.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
        Image.fromarray(arr).save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def fixed_tau_init(init, tmp_path_factory):
    """`init` with its timestep head saturated at t = 900, where Eq. 6 scales the UNet's output
    by sqrt(1 - alpha_bar) / sqrt(alpha_bar) ~ 8 (1.6 at the untrained head's t ~ 500): the
    LoRA fits a batch in tens of steps, not hundreds. Without the Gumbel timestep's noise, a
    generator that does not learn logs the same terms every step."""
    model = checkpoint.load(init)
    with torch.no_grad():
        model.predictor.timestep_head.bias[900] = 1e4
    return checkpoint.save(model, tmp_path_factory.mktemp("fixed_tau") / "ckpt")


def config(tmp_path, init, images, **kw):
    base = dict(out=str(tmp_path / "run"), init=str(init), data=str(images), crop=CROP,
                batch_size=2, qf_min=45, qf_max=45, max_steps=2, cpu=True, num_workers=0,
                save_every=100, log_every=1, perceptual="none", lr=3e-3, disc_lr=3e-3)
    return Stage2Config(**{**base, **kw})



@pytest.fixture(scope="module")
def one_image(init, tmp_path_factory):
    """One decoder image of std-1 latents: the LoRA fits it faster than `images`."""
    return decoder_images(init, tmp_path_factory.mktemp("one_image"), 1, 1.0)


@pytest.mark.parametrize("seed", range(5))
def test_overfits_a_fixed_batch_with_every_term(tmp_path, fixed_tau_init, one_image, logged,
                                                seed):
    # One image at one QF with batch 1: every step sees the same batch. The seed draws the
    # random DISTS weights and the discriminator's noise.
    torch.manual_seed(seed)
    steps, k = 25, 4
    final = stage2.train(config(tmp_path, fixed_tau_init, one_image, batch_size=1, seed=seed,
                                max_steps=steps, perceptual="random"), perceptual=DISTS())
    assert len(logged) == steps
    for row in logged:
        for name in ("mse", "ea", "gan", "qf", "total", "d_loss"):
            assert np.isfinite(row[name]) and row[name] > 0, (name, row)
    # The terms the generator fits fall; the adversarial ones need not (G and D take turns):
    # test_gan_gradient_reaches_the_generator_but_not_the_discriminator checks L_G's gradient.
    # 0.7: at least 2x headroom on every seed here, and a generator that stays put logs 1.
    for name in ("mse", "ea", "qf"):
        first, last = (np.mean([r[name] for r in rows]) for rows in (logged[:k], logged[-k:]))
        assert last <= 0.7 * first, (name, first, last)
    model = checkpoint.load(final)
    assert (final / "pytorch_lora_weights.safetensors").is_file()
    lq = torch.rand(1, 3, 20, 28) * 2 - 1
    assert model.restore(lq).shape == lq.shape


def test_frozen_parts_stay_bit_identical_trained_parts_move(tmp_path, init, images, logged,
                                                            capsys):
    # No weight decay: a tensor that moves had a gradient. Two steps: LoRA A only gets one once
    # B is non-zero.
    cfg = config(tmp_path, init, images, weight_decay=0.0, val_data=str(images), val_every=2,
                 val_crop=CROP, val_images=1)
    final = stage2.train(cfg)
    before = checkpoint.load(init).state_dict()
    after = checkpoint.load(final).state_dict()
    trained = load_file(str(Path(cfg.out) / "train_state" / "step-2" / "weights.safetensors"))
    frozen = [k for k in before if k.startswith(("saipe.", "vae."))
              or (k.startswith("unet.") and "lora_" not in k)]
    moving = [k for k in before if "lora_" in k or k.startswith("predictor.")]
    assert frozen and moving and set(frozen) | set(moving) == set(before)
    for k in frozen:
        assert torch.equal(before[k], after[k]), k
    for k in moving:
        assert not torch.equal(before[k], after[k]), k
        assert torch.equal(after[k], trained[f"model.{k}"]), k
    disc = {k: v for k, v in trained.items() if k.startswith("disc.")}
    unet_base = {k.replace(".base_layer", ""): v for k, v in before.items()
                 if k.startswith("unet.") and "lora_" not in k}
    assert disc and not any("lora_" in k for k in disc)
    for k, v in disc.items():
        ref = unet_base.get("unet." + k[len("disc."):])
        if ref is not None:  # the trunk started as the base UNet, and every tensor trained
            assert not torch.equal(v, ref), k
    assert all(r["ea"] == 0 and r["mse"] > 0 for r in logged)  # --perceptual none
    out = capsys.readouterr()
    assert "L_EA OFF" in out.out and "validation PSNR" in out.out


def test_full_unet_without_discriminator_embeds_its_base(tmp_path, images, logged, capsys):
    # tiny-full on a training.tiny_base folder: the whole UNet trains, --w-gan 0 builds no
    # discriminator, and --embed-base makes the final checkpoint load without --base.
    from sodiff.base import build_vae
    from sodiff.config import TINY_FULL
    from training.tiny_base import make_base

    torch.manual_seed(0)
    build_vae(TINY_FULL.vae_class, TINY_FULL.vae).save_pretrained(tmp_path / "vae")
    base = make_base(tmp_path / "vae", tmp_path / "base")
    init = checkpoint.save(SODiff.from_base(TINY_FULL, base), tmp_path / "init")
    assert checkpoint.read_meta(init)["base"] == "external"
    cfg = config(tmp_path, init, images, base=str(base), w_gan=0.0, embed_base=True,
                 weight_decay=0.0)
    final = stage2.train(cfg)
    assert "discriminator OFF" in capsys.readouterr().out
    assert all(r["gan"] == 0 and "d_loss" not in r for r in logged)
    state = load_file(str(Path(cfg.out) / "train_state" / "step-2" / "weights.safetensors"))
    assert state and not any(k.startswith("disc.") for k in state)
    assert checkpoint.read_meta(final)["base"] == "embedded"
    before = checkpoint.load(init, base).state_dict()
    after = checkpoint.load(final).state_dict()  # no base needed any more
    for k in before:
        moved = not torch.equal(before[k], after[k])
        assert moved == k.startswith(("unet.", "predictor.")), k


def gan_gradients(init, checkpointing):
    cfg = config(Path("unused"), init, "unused", gradient_checkpointing=checkpointing)
    torch.manual_seed(0)
    model = stage2.prepare_model(cfg)
    disc = stage2.build_discriminator(cfg, model)
    g = torch.Generator().manual_seed(0)
    batch = {"lq": torch.rand(2, 3, CROP, CROP, generator=g) * 2 - 1,
             "hq": torch.rand(2, 3, CROP, CROP, generator=g) * 2 - 1,
             "qf": torch.tensor([20.0, 30.0])}
    _, loss, terms = stage2.generator_objective(model, disc, None, batch,
                                                Stage2Weights(0, 0, 1, 0), g)
    loss.backward()
    assert terms["gan"] > 0
    assert all(p.grad is None for p in disc.parameters())
    assert all(p.requires_grad for p in disc.parameters())  # restored after the G phase
    assert all(p.grad is None for p in model.saipe.parameters())
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_gan_gradient_reaches_the_generator_but_not_the_discriminator(init):
    grads = gan_gradients(init, checkpointing=False)
    lora_b = [g for n, g in grads.items() if "lora_B" in n]
    assert lora_b and all(g is not None and g.abs().sum() > 0 for g in lora_b)
    # Gradient checkpointing recomputes activations: same gradients, still none for D.
    assert_close = {n: torch.equal(g, grads[n]) if g is not None else grads[n] is None
                    for n, g in gan_gradients(init, checkpointing=True).items()}
    assert all(assert_close.values()), [n for n, ok in assert_close.items() if not ok][:3]


def test_other_discriminator_unet_and_crop_check(tmp_path, init):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(1)
    UNet2DConditionModel(**TINY_UNET).save_pretrained(tmp_path / "disc")
    cfg = config(tmp_path, init, "unused", disc_unet=str(tmp_path / "disc"))
    model = stage2.prepare_model(cfg)
    disc = stage2.build_discriminator(cfg, model)
    saved = load_file(str(tmp_path / "disc" / "diffusion_pytorch_model.safetensors"))
    assert torch.equal(disc.conv_in.weight, saved["conv_in.weight"])
    with pytest.raises(FileNotFoundError, match="no diffusers UNet"):
        stage2.build_discriminator(config(tmp_path, init, "x", disc_unet=str(tmp_path)), model)
    with pytest.raises(ValueError, match="crop=18 must be a multiple of 8"):
        stage2.prepare_model(config(tmp_path, init, "x", crop=18))


def test_perceptual_weights_are_required_or_explicitly_off(tmp_path, init, images):
    with pytest.raises(ValueError, match="perceptual is required"):
        stage2.validate_train_config(config(tmp_path, init, images, perceptual=None))
    res = CliRunner().invoke(stage2.main, [
        "--init", str(init), "--data", str(images), "--out", str(tmp_path / "r"), "--cpu",
        "--crop", str(CROP), "--perceptual", str(tmp_path / "missing.safetensors")])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "missing.safetensors not found" in res.output and "--perceptual none" in res.output


@pytest.mark.parametrize("kw, message", [
    (dict(data=None), "data is required"),
    (dict(w_gan=-1.0), "w_gan=-1.0"),
    (dict(disc_trainable="some"), "disc_trainable='some'"),
    (dict(batch_size=0, keep_last=0), "batch_size=0 must be >= 1; keep_last=0"),
    (dict(mixed_precision="fp8"), "mixed_precision='fp8'"),
    (dict(view_crop=8), "view_crop=8 must be >= crop=16"),
    (dict(pool_scale=0.5), r"pool_scale=0.5 must be in \[1, 100.0\]"),
    (dict(align_lr_scale=0.0), "align_lr_scale=0.0 must be > 0"),
    (dict(pool_scale=10.0, train_align="off"), "pool_scale needs T_align to train"),
])
def test_invalid_options_are_named(tmp_path, init, images, kw, message):
    with pytest.raises(ValueError, match=message):
        stage2.validate_train_config(config(tmp_path, init, images, **kw))


def test_accelerate_launch_two_cpu_processes(tmp_path, init, images):
    """The documented `accelerate launch -m training.stage2`, as 2 CPU processes (gloo DDP):
    each saves checks that the processes hold bit-identical weights, which fails if the
    generator's or the discriminator's gradients are not synchronised."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
           "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "training.stage2", "--init", str(init), "--data", str(images), "--out",
           str(tmp_path / "ddp"), "--perceptual", "none", "--crop", str(CROP), "--batch-size",
           "1", "--grad-accum", "2", "--max-steps", "2", "--save-every", "1", "--cpu",
           "--gradient-checkpointing",
           "--num-workers", "0", "--lr", "1e-3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 process(es)" in res.stdout and "4 images per optimizer step" in res.stdout
    assert checkpoint.load(tmp_path / "ddp" / "final").cfg == TINY
    assert sorted(p.name for p in (tmp_path / "ddp" / "train_state").iterdir()) == \
        ["step-1", "step-2"]


def test_module_help_runs():
    res = subprocess.run([sys.executable, "-m", "training.stage2", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0
    for flag in ("--init", "--perceptual", "--disc-unet", "--w-gan", "--resume"):
        assert flag in res.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_mixed_precision_train_and_resume(tmp_path, init, images, precision):
    """The CUDA path (device generators, autocast, fp16 loss scaler, pinned batches) with a
    DISTS weights file, then --resume: in subprocesses, so the accelerator state is fresh."""
    from training.dists import write_weights

    torch.manual_seed(0)
    dists = write_weights(dict(DISTS().state_dict()), tmp_path / "dists.safetensors")
    args = [sys.executable, "-m", "training.stage2", "--init", str(init), "--data", str(images),
            "--out", str(tmp_path / "run"), "--perceptual", str(dists), "--crop", str(CROP),
            "--batch-size", "2", "--save-every", "2", "--val-data", str(images),
            "--val-every", "2", "--num-workers", "2", "--mixed-precision", precision]
    for extra in (["--max-steps", "2"], ["--max-steps", "4", "--resume"]):
        res = subprocess.run(args + extra, cwd=REPO, capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        assert "on cuda" in res.stdout and "validation PSNR" in res.stdout
    state = tmp_path / "run" / "train_state" / "step-4"
    assert (state / "scaler.pt").is_file() == (precision == "fp16")
    weights = load_file(str(state / "weights.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert checkpoint.load(tmp_path / "run" / "final").cfg == TINY


def unaligned_init(tmp_path, head_bias: dict[int, float] | None = None):
    """A stage-1 checkpoint that says its stage 1 ran with --no-align (spread queries, as the
    module fixture), a QF head that reads the features, optionally a timestep head biased
    towards some candidates."""
    torch.manual_seed(0)
    model = SODiff(TINY)
    with torch.no_grad():
        model.saipe.t_align.pool.queries.normal_(0, 1, generator=torch.Generator().manual_seed(2))
        model.vae.decoder.layers[-1].bias += 0.5
        # As after stage 1.5: a fresh QF head is zero, which would leave the trunk gradient-free.
        model.predictor.qf_head.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
        for i, v in (head_bias or {}).items():
            model.predictor.timestep_head.bias[i] = v
    return checkpoint.save(model, tmp_path / "init",
                           extra={"training": {"stage": 1, "align": False}})


def test_configured_pipeline_trains_t_align_and_the_predictor(tmp_path, images):
    # Stage 1 without alignment: stage 2 trains T_align jointly, E_down and D_up stay frozen,
    # and every part of the predictor (trunk, QF head, timestep head) gets a gradient.
    cfg = config(tmp_path, unaligned_init(tmp_path), images)
    assert stage2.aligns(cfg)
    model = stage2.prepare_model(cfg)
    names = [g["name"] for g in stage2.generator_groups(model, cfg)]
    assert names == ["unet", "t_align", "predictor", "timestep_head"]
    g = torch.Generator().manual_seed(0)
    batch = {"lq": torch.rand(2, 3, CROP, CROP, generator=g) * 2 - 1,
             "hq": torch.rand(2, 3, CROP, CROP, generator=g) * 2 - 1,
             "qf": torch.tensor([20.0, 30.0])}
    _, loss, _ = stage2.generator_objective(model, None, None, batch, Stage2Weights(1, 0, 0, 1e-3),
                                            g)
    loss.backward()
    for part in (model.saipe.t_align, model.predictor.stem, model.predictor.blocks,
                 model.predictor.qf_head, model.predictor.timestep_head):
        grads = [p.grad for p in part.parameters()]
        assert grads and all(x is not None for x in grads)
        assert sum(float(x.abs().sum()) for x in grads) > 0, part
    for part in (model.saipe.e_down, model.saipe.d_up):
        assert all(not p.requires_grad and p.grad is None for p in part.parameters())
    off = stage2.prepare_model(config(tmp_path, cfg.init, images, train_align="off"))
    assert not any(p.requires_grad for p in off.saipe.parameters())
    frozen_cfg = config(tmp_path, cfg.init, images, predictor_lr_scale=0.0)
    frozen = stage2.prepare_model(frozen_cfg)
    assert {n for n, p in frozen.predictor.named_parameters() if p.requires_grad} == \
        {"timestep_head.weight", "timestep_head.bias"}
    assert "predictor" not in [g["name"] for g in stage2.generator_groups(frozen, frozen_cfg)]


def test_stage2_logs_the_predictor_and_warns_on_a_saturated_softmax(tmp_path, images, logged,
                                                                    capsys):
    # A timestep head whose softmax is one-hot at 21 (what the first bundled model ended with).
    init = unaligned_init(tmp_path, {21: 1e4})
    final = stage2.train(config(tmp_path, init, images, w_gan=0.0))
    for row in logged:
        assert row["p_max"] > 0.99 and row["tau"] == pytest.approx(21, abs=0.01)
        assert row["qf_mae"] >= 0
    out = capsys.readouterr().out
    assert "timestep softmax is saturated" in out and "T_align trains" in out
    assert checkpoint.read_meta(final)["training"]["t_align_trained"] is True


def test_view_crop_gives_prompt_and_timestep_the_whole_view(tmp_path, images, logged):
    # Issue 13: on small crops the stage-1.5 predictor's QF estimate is off by ~14, so the UNet
    # trained at other timesteps than whole images get. With --view-crop the predictor and
    # SAIPE see the larger compressed crop; the UNet and the losses see a --crop patch of it.
    folder = noise_pngs(tmp_path / "big", 2, (40, 48))
    cfg = config(tmp_path, unaligned_init(tmp_path), folder, view_crop=32)
    item = stage2.training_pairs(cfg)[(0, 0, 0)]
    assert item["view"].shape == (3, 32, 32) and item["lq"].shape == (3, CROP, CROP)
    model = stage2.prepare_model(cfg)
    batch = {k: v[None] for k, v in item.items()}
    out, _, _ = stage2.generator_objective(model, None, None, batch, Stage2Weights(1, 0, 0, 1e-3),
                                           torch.Generator().manual_seed(0))
    assert out.restored.shape == (1, 3, CROP, CROP)
    expected, _, _ = model.predictor(batch["view"], gumbel=True,
                                     generator=torch.Generator().manual_seed(0))
    assert_close(out.tau, expected, NETWORK)
    stage2.train(cfg)
    assert len(logged) == cfg.max_steps
    with pytest.raises(ValueError, match="view_crop=36 must be a multiple of 8"):
        stage2.prepare_model(config(tmp_path, cfg.init, folder, view_crop=36))


def test_pool_scale_makes_the_pooling_cosine_and_trains_its_scale(tmp_path, images):
    # The bundled model's dot-product pooling attended uniformly (its 77 tokens 0.7% apart);
    # --pool-scale converts it, the logit scale learns with T_align, and the final checkpoint
    # rebuilds the converted model from its own config.
    init = unaligned_init(tmp_path)
    cfg = config(tmp_path, init, images, pool_scale=10.0)
    model = stage2.prepare_model(cfg)
    assert model.cfg.saipe.pool_scale == 10.0 and model.saipe.cfg.pool_scale == 10.0
    assert model.saipe.t_align.pool.log_scale.requires_grad
    assert any(p is model.saipe.t_align.pool.log_scale
               for g in stage2.generator_groups(model, cfg) for p in g["params"])
    slow = config(tmp_path, init, images, pool_scale=10.0, align_lr_scale=0.1)
    groups = {g["name"]: g for g in stage2.generator_groups(stage2.prepare_model(slow), slow)}
    assert groups["t_align"]["lr"] == pytest.approx(0.1 * slow.lr)
    assert groups["t_align"]["lr_scale"] == 0.1 and groups["unet"]["lr"] == slow.lr
    final = stage2.train(cfg)
    again = checkpoint.load(final)
    assert again.cfg.saipe.pool_scale == 10.0
    x = torch.rand(1, 3, TINY.saipe.image_size, TINY.saipe.image_size) * 2 - 1
    with torch.no_grad():
        assert not torch.equal(again.saipe.prompt(x), checkpoint.load(init).saipe.prompt(x))
    with pytest.raises(ValueError, match="already cosine.*drop --pool-scale"):
        stage2.prepare_model(config(tmp_path, final, images, pool_scale=10.0,
                                    train_align="on"))
    aligned = checkpoint.save(checkpoint.load(init), tmp_path / "aligned",
                              extra={"training": {"stage": 1, "align": True}})
    with pytest.raises(ValueError, match="--train-align auto does not train it"):
        stage2.prepare_model(config(tmp_path, aligned, images, pool_scale=10.0))


def test_freeze_cross_attention_keeps_the_prompt_readers_as_they_were(tmp_path, init, images):
    # A short continuation of the bundled model unlearnt much of the prompt's use (swap change
    # 0.105 -> 0.073 grey levels): --freeze-cross-attention leaves attn2 bit-identical.
    cfg = config(tmp_path, init, images, freeze_cross_attention=True)
    model = stage2.prepare_model(cfg)
    grads = {n: p.requires_grad for n, p in model.unet.named_parameters()}
    assert any(".attn2." in n for n in grads)
    assert not any(g for n, g in grads.items() if ".attn2." in n)
    assert any(g for n, g in grads.items() if ".attn2." not in n)
    before = {n: p.clone() for n, p in checkpoint.load(init).unet.named_parameters()}
    after = checkpoint.load(stage2.train(cfg)).unet.named_parameters()
    moved = {n for n, p in after if not torch.equal(p, before[n])}
    assert moved and not any(".attn2." in n for n in moved)
