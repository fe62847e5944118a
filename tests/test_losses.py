import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from sodiff.config import TINY
from sodiff.model import SODiff, SODiffOutput
from training.discriminator import UNetDiscriminator
from training.dists import DISTS
from training.losses import (Stage2Weights, discriminator_loss, edge_aware_dists, generator_loss,
                             sobel, stage1_loss, stage2_generator_loss)
from tolerance import LAYER, NETWORK, assert_close


@pytest.fixture(scope="module")
def dists():
    torch.manual_seed(0)
    return DISTS()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = SODiff(TINY)
    disc = UNetDiscriminator.from_generator_unet(model.unet)
    return model, disc


def test_sobel_constant_is_flat():
    out = sobel(torch.full((1, 3, 16, 16), 0.7))
    assert out.shape == (1, 3, 16, 16)
    assert out.max() < 1e-3  # only sqrt(eps) / (4 sqrt 2) remains


def test_sobel_vertical_step():
    x = torch.zeros(1, 2, 8, 10)
    x[:, 0, :, 5:] = 1.0  # channel 0: step between columns 4 and 5; channel 1 stays flat
    out = sobel(x)
    edge = 4 / (4 * math.sqrt(2))  # |gx| = 1 + 2 + 1 on both sides of the step
    # sobel's sqrt(g^2 + eps) moves the edge by eps / (2 edge): below 1e-4, not a rounding.
    torch.testing.assert_close(out[0, 0, :, 4:6], torch.full((8, 2), edge), rtol=0, atol=1e-4)
    assert out[0, 0, :, :4].max() < 1e-3 and out[0, 0, :, 6:].max() < 1e-3
    assert out[0, 1].max() < 1e-3  # channels are independent
    assert out.max() <= 1.0


def test_sobel_range_on_random_images():
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = sobel(x)
    assert out.min() >= 0 and out.max() <= 1 and out.max() > 0.3
    with torch.autocast("cpu", dtype=torch.bfloat16):  # stays float32 under mixed precision
        low = sobel(x)
    assert low.dtype == torch.float32 and torch.equal(low, out)


def test_gan_losses_known_values():
    zero = torch.zeros(4)
    assert_close(generator_loss(zero), torch.tensor(math.log(2)), LAYER)
    assert_close(discriminator_loss(zero, zero), torch.tensor(2 * math.log(2)), LAYER)
    # A confident, correct discriminator: small L_D, large L_G.
    assert discriminator_loss(torch.full((4,), 10.0), torch.full((4,), -10.0)) < 1e-3
    assert_close(generator_loss(torch.full((4,), -10.0)), -F.logsigmoid(torch.tensor(-10.0)),
                 LAYER)


def test_edge_aware_dists_zero_for_identical_and_positive_otherwise(dists):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    assert_close(edge_aware_dists(dists, x, x), torch.tensor(0.0), NETWORK, scale=1.0)
    y = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    plain = dists((x + 1) / 2, (y + 1) / 2).mean()
    assert edge_aware_dists(dists, x, y) > plain > 0  # the Sobel term adds a positive amount


def fake_output(seed=0, b=2, size=32, prompt_dim=64):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).requires_grad_()  # noqa: E731
    decoded = (torch.rand(b, 3, size, size, generator=g) * 2 - 1).requires_grad_()
    return SODiffOutput(restored=decoded.clamp(-1, 1), decoded=decoded, prompt=r(b, 77, prompt_dim),
                        rec=r(b, 3, 64, 64), tau=torch.full((b,), 500.0),
                        qf=(torch.rand(b, generator=g) * 90 + 5).requires_grad_(),
                        logits=r(b, 1000), z_lq=r(b, TINY.latent_channels, 8, 8), z_hq=r(b, TINY.latent_channels, 8, 8))


def test_stage2_terms_finite_nonzero_and_weighted(dists, tiny):
    _, disc = tiny
    out = fake_output()
    hq = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(9)) * 2 - 1
    qf_gt = torch.tensor([10.0, 80.0])
    total, terms = stage2_generator_loss(out, hq, qf_gt, dists, disc, Stage2Weights(),
                                         torch.Generator().manual_seed(3))
    with torch.no_grad():  # same noise (same seed), only the adversarial weight changed
        total_b, _ = stage2_generator_loss(out, hq, qf_gt, dists, disc, Stage2Weights(gan=0.5),
                                           torch.Generator().manual_seed(3))
    for k in ("mse", "ea", "gan", "qf", "total"):
        assert torch.isfinite(terms[k]) and terms[k] != 0, k
    assert_close(terms["mse"], F.mse_loss(out.decoded, hq), LAYER)
    assert_close(terms["qf"], (out.qf - qf_gt).abs().mean(), LAYER)
    w = Stage2Weights()
    assert_close(total, terms["mse"] + terms["ea"] + w.gan * terms["gan"] + w.qf * terms["qf"],
                 LAYER)
    # Changing only the adversarial weight moves the total by delta_weight * L_G; the
    # difference of two totals keeps the totals' rounding, so their magnitude is the scale.
    assert_close(total_b - total, (0.5 - 1e-2) * terms["gan"], LAYER, scale=float(total_b.detach()))
    total.backward()
    for name in ("decoded", "z_hq", "qf"):
        grad = getattr(out, name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_stage2_optional_terms_off(tiny):
    _, disc = tiny
    out = dataclasses.replace(fake_output(1), qf=None)
    hq = torch.zeros(2, 3, 32, 32)
    total, terms = stage2_generator_loss(out, hq, torch.tensor([5.0, 5.0]), None, None)
    assert terms["ea"] == 0 and terms["gan"] == 0 and terms["qf"] == 0
    assert_close(total, F.mse_loss(out.decoded, hq), LAYER)
    with pytest.raises(ValueError, match="gan=-1"):
        stage2_generator_loss(out, hq, None, None, disc, Stage2Weights(gan=-1))
    with pytest.raises(ValueError, match="differ"):
        stage2_generator_loss(out, hq[:, :, :16], None, None, None)


def test_gan_term_reaches_the_lora_of_a_real_forward(tiny):
    """End to end on the tiny model: L_G alone produces LoRA gradients (not blocked by no_grad)."""
    model, disc = tiny
    model.zero_grad()
    lq = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    out = model(lq)
    w = Stage2Weights(mse=0.0, ea=0.0, gan=1.0, qf=0.0)
    total, _ = stage2_generator_loss(out, lq, None, None, disc, w, torch.Generator().manual_seed(0))
    total.backward()
    lora = [p.grad for n, p in model.unet.named_parameters() if "lora_B" in n]
    assert lora and any(g is not None and g.abs().sum() > 0 for g in lora)


def test_stage1_loss_values_and_alignment_switch():
    g = torch.Generator().manual_seed(4)
    prompt = torch.randn(2, 77, 64, generator=g, requires_grad=True)
    text = torch.randn(2, 77, 64, generator=g)
    rec, hq = torch.rand(2, 3, 64, 64, generator=g), torch.rand(2, 3, 64, 64, generator=g)
    total, terms = stage1_loss(prompt, rec, hq, text)
    l1, mse = (rec - hq).abs().mean(), ((prompt - text) ** 2).mean()
    assert_close(terms["rec"], l1, LAYER)
    assert_close(terms["align"], mse, LAYER)
    assert_close(total, l1 + 0.5 * mse, LAYER)
    total2, _ = stage1_loss(prompt, rec, hq, text, lambda_align=1.5)
    assert_close(total2 - total, mse, LAYER, scale=float(total2.detach()))
    total.backward()
    assert prompt.grad.abs().sum() > 0
    off, terms_off = stage1_loss(prompt, rec, hq, None)
    assert_close(off, l1, LAYER)
    assert terms_off["align"] == 0
    with pytest.raises(ValueError, match="resize hq"):
        stage1_loss(prompt, rec, hq[..., :32, :32], text)
    with pytest.raises(ValueError, match="text embedding"):
        stage1_loss(prompt, rec, hq, text[:, :10])


def test_color_term_weighs_a_cast_not_the_noise():
    """A constant offset of 0.01 and zero-mean noise of the same MSE: only the cast counts."""
    g = torch.Generator().manual_seed(4)
    hq = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    sign = torch.where(torch.rand(hq.shape, generator=g) < 0.5, -1.0, 1.0)
    noise = sign - sign.mean(dim=(2, 3), keepdim=True)  # zero mean per crop and channel
    noise = 0.01 * noise / noise.pow(2).mean().sqrt()
    cast = hq.clone()
    cast[:, 1] += 0.01 * 3 ** 0.5  # the green channel only, same MSE as the noise
    w = Stage2Weights(mse=1.0, ea=0.0, gan=0.0, qf=0.0, color=10.0)
    terms = {}
    for name, decoded in (("cast", cast), ("noise", hq + noise)):
        out = dataclasses.replace(fake_output(), decoded=decoded, qf=None)
        total, terms[name] = stage2_generator_loss(out, hq, None, None, None, w)
        assert_close(total, terms[name]["mse"] + 10.0 * terms[name]["color"], LAYER)
    # Both MSEs are 1e-4 made of values ~1: the subtraction leaves eps / 1e-2 of relative
    # rounding, so the scale of the inputs (1) sets the bound, squared by the MSE (x 2e-2).
    assert_close(terms["cast"]["mse"], terms["noise"]["mse"], LAYER, scale=2e-2)
    assert_close(terms["cast"]["color"], torch.tensor(0.01 ** 2), LAYER, scale=2e-2)
    assert terms["noise"]["color"] < 1e-10
    out = dataclasses.replace(fake_output(), decoded=cast, qf=None)
    default, _ = stage2_generator_loss(out, hq, None, None, None)
    assert_close(default, terms["cast"]["mse"], LAYER)  # off unless asked for
