import copy

import pytest
import torch

from sodiff.config import PRESETS, TINY
from sodiff.model import SODiff, keep_mean_colour, pad_reflect
from tolerance import ELEMENTWISE, LAYER, PIPELINE, assert_close, assert_differs


def lq(b=1, h=64, w=64, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def base_params(module):
    return sum(p.numel() for n, p in module.named_parameters() if "lora_" not in n)


def test_sd21_on_meta_has_the_paper_sizes():
    with torch.device("meta"):
        model = SODiff(PRESETS["sd21"])
        out = model(torch.empty(1, 3, 512, 512))
    assert round(base_params(model.unet) / 1e6, 1) == 865.9
    assert round(base_params(model.vae) / 1e6, 1) == 83.7
    assert out.prompt.shape == (1, 77, 1024)
    assert out.z_lq.shape == (1, 4, 64, 64) and out.restored.shape == (1, 3, 512, 512)


def test_forward_returns_the_intermediates(tiny_model):
    with torch.no_grad():
        out = tiny_model(lq(2))
    assert out.restored.shape == (2, 3, 64, 64)
    assert out.restored.min() >= -1 and out.restored.max() <= 1
    assert out.prompt.shape == (2, 77, TINY.saipe.prompt_dim)
    assert out.rec.shape == (2, 3, TINY.saipe.image_size, TINY.saipe.image_size)
    assert out.tau.shape == out.qf.shape == (2,)
    assert out.z_lq.shape == out.z_hq.shape == (2, TINY.latent_channels, 32, 32)


def test_lora_merged_matches_unmerged(tiny_model):
    x = lq(2)
    with torch.no_grad():
        before = tiny_model(x).decoded
        merged = copy.deepcopy(tiny_model).merge_lora()
        after = merged(x).decoded
    assert not any("lora_" in n for n, _ in merged.unet.named_parameters())
    assert merged.lora_merged
    assert_close(after, before, PIPELINE)
    # ...and the LoRA is not a no-op, so the comparison above means something.
    with torch.no_grad():
        tiny_model.unet.disable_adapters()
        plain = tiny_model(x).decoded
    assert_differs(plain, before, PIPELINE)


def test_fixed_timestep_mode_skips_the_predictor(tiny_model):
    out = tiny_model(lq(), mode="fixed:250")
    assert out.qf is None and out.logits is None and float(out.tau) == 250.0
    predicted = tiny_model(lq(), mode="predicted")
    assert not torch.equal(out.decoded, predicted.decoded)


def test_fractional_tau_is_continuous(tiny_model):
    x = lq()
    with torch.no_grad():
        a, b = tiny_model(x, mode=300.0).decoded, tiny_model(x, mode=300.001).decoded
        c = tiny_model(x, mode=310.0).decoded
    assert (a - b).abs().max() < (a - c).abs().max()


def test_inference_is_deterministic(tiny_model):
    x = lq()
    with torch.no_grad():
        assert torch.equal(tiny_model(x).restored, tiny_model(x).restored)


def test_restore_any_size_pads_and_crops(tiny_model):
    x = lq(1, 50, 37)
    out = tiny_model.restore(x)
    assert out.shape == x.shape
    # restore() on an aligned image is forward() with the prompt taken from the same image.
    y = lq(1, 64, 64)
    with torch.no_grad():
        plain = tiny_model(y).restored
        assert_close(tiny_model.restore(y, keep_colour=False), plain, PIPELINE)
        assert_close(tiny_model.restore(y), keep_mean_colour(plain, y), PIPELINE)


def test_restore_keeps_the_inputs_mean_colour(tiny_model):
    # The random tiny model's output has a cast of its own; restore() removes it by default.
    x = lq(2, 48, 40) * 0.5
    cast = (tiny_model.restore(x, keep_colour=False).mean((-2, -1)) - x.mean((-2, -1))).abs()
    assert cast.max() > 1e-2
    kept = tiny_model.restore(x).mean((-2, -1))
    assert_close(kept, x.mean((-2, -1)), LAYER, scale=1.0)  # means of values in [-1, 1]


def test_keep_mean_colour_shifts_each_channel_and_clamps():
    lq_ = torch.zeros(1, 3, 4, 4)
    out = torch.stack([torch.full((4, 4), v) for v in (0.2, -0.1, 0.0)])[None]
    out[0, 2, 0, 0] = 0.9  # channel 2's mean is 0.9 / 16
    kept = keep_mean_colour(out, lq_)
    assert_close(kept[0, :2], torch.zeros(2, 4, 4), LAYER, scale=1.0)
    assert_close(kept[0, 2].mean(), torch.tensor(0.0), LAYER, scale=1.0)
    assert_close(kept[0, 2, 0, 0], torch.tensor(0.9 - 0.9 / 16), LAYER)
    bright = keep_mean_colour(torch.tensor([1.0, 0.0]).expand(1, 3, 1, 2),
                              torch.full((1, 3, 1, 2), 0.8))
    assert_close(bright, torch.tensor([1.0, 0.3]).expand(1, 3, 1, 2), LAYER)  # 1.3 clamped


def test_unaligned_forward_is_refused(tiny_model):
    with pytest.raises(ValueError, match="multiple of 8"):
        tiny_model(lq(1, 60, 64))


def test_gradients_reach_lora_predictor_saipe_not_vae(tiny_model):
    tiny_model.train()
    out = tiny_model(lq(2), gumbel=True, generator=torch.Generator().manual_seed(0))
    (out.decoded.square().mean() + out.rec.abs().mean()).backward()
    lora = [p for n, p in tiny_model.unet.named_parameters() if "lora_" in n]
    assert lora and all(p.grad is not None for p in lora)
    assert tiny_model.predictor.timestep_head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_model.vae.parameters())
    base = [p for n, p in tiny_model.unet.named_parameters() if "lora_" not in n]
    assert all(not p.requires_grad for p in base)


def test_pad_reflect_keeps_the_top_left_grid():
    x = torch.arange(2 * 5 * 6, dtype=torch.float32).reshape(1, 2, 5, 6)
    y = pad_reflect(x, 3, 2)
    assert y.shape == (1, 2, 8, 8) and torch.equal(y[..., :5, :6], x)
    assert torch.equal(y[..., 5, :6], x[..., 3, :])  # reflection, not edge
    small = pad_reflect(torch.ones(1, 3, 1, 1), 3, 3)  # too small to reflect: replicate
    assert small.shape == (1, 3, 4, 4) and torch.equal(small, torch.ones(1, 3, 4, 4))


def test_view_sets_prompt_and_timestep_lq_the_restored_patch(tiny_model):
    # Stage 2 restores a patch but computes the prompt and tau from the crop it came from.
    big, patch = lq(1, 128, 128, seed=3), lq(1, 32, 32, seed=4)
    with torch.no_grad():
        own, viewed = tiny_model(patch), tiny_model(patch, view=big)
        whole = tiny_model(big)
    assert viewed.restored.shape == (1, 3, 32, 32)
    assert torch.equal(viewed.tau, whole.tau) and torch.equal(viewed.prompt, whole.prompt)
    assert not torch.equal(viewed.prompt, own.prompt)
    assert torch.equal(viewed.z_lq, own.z_lq)
    with pytest.raises(ValueError, match="batch and channels"):
        tiny_model(patch, view=lq(2, 64, 64))
