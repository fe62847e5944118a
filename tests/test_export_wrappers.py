"""Export wrappers, FP16-safety tracking and sample helpers on the tiny preset (no ONNX)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from export.parity import FP16_MAX, ActivationTracker, fp16_safety
from export.samples import (QF_TABLE_QUALITIES, calibrate_tau, crop_to_multiple, fit,
                            predict_tau, qf_table, synthetic_images)
from export.specs import component_specs
from export.wrappers import FixedUNetWrapper, UNetWrapper, build_wrappers, for_export, half_copy
from sodiff.config import TINY
from sodiff.model import SODiff
from tolerance import LAYER, NETWORK, assert_close, assert_differs


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = SODiff(TINY).eval()
    with torch.no_grad():
        for name, p in m.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # a LoRA that changes the output
        m.predictor.timestep_head.weight.normal_(0, 0.5)
    return m


def inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, TINY.latent_channels, 8, 12, generator=g), torch.tensor([37.25, 811.5][:batch]),
            torch.randn(batch, 77, 64, generator=g))


def merged_copy(model):
    return copy.deepcopy(model).merge_lora()


def test_unet_wrapper_is_denoise_with_the_lora_merged(model):
    z, tau, prompt = inputs()
    with torch.no_grad():
        want = model.denoise(z, tau, prompt)
        got = UNetWrapper(merged_copy(model).unet, model.alphas_cumprod)(z, tau, prompt)
        base = copy.deepcopy(model)
        for name, p in base.unet.named_parameters():
            if "lora_B" in name:
                p.data.zero_()
        without_lora = base.denoise(z, tau, prompt)
    assert_close(got, want, NETWORK)
    assert_differs(without_lora, want, NETWORK)  # the LoRA matters in this model


def _drop_lora(unet):
    from peft.tuners.lora import LoraLayer

    for name, module in [(n, m) for n, m in unet.named_modules() if isinstance(m, LoraLayer)]:
        parent, _, child = name.rpartition(".")
        setattr(unet.get_submodule(parent) if parent else unet, child, module.get_base_layer())


@pytest.mark.parametrize("defect", ["lora_not_merged", "conv_in_scaled", "conv_out_scaled",
                                    "timestep_off_by_one"])
def test_the_unet_bound_catches_real_defects(model, defect):
    """The policy's bound sits >= 10x below what a real defect changes: the LoRA left out of
    the merged weights, one weight scaled by 1 + 1e-3, or the timestep one step off."""
    z, tau, prompt = inputs()
    unet = copy.deepcopy(model).unet if defect == "lora_not_merged" else merged_copy(model).unet
    if defect == "lora_not_merged":  # what a merge that dropped the adapters would export
        _drop_lora(unet)
    if defect.endswith("_scaled"):
        with torch.no_grad():
            getattr(unet, defect.removesuffix("_scaled")).weight.mul_(1 + 1e-3)
    t = tau + 1 if defect == "timestep_off_by_one" else tau
    with torch.no_grad():
        want = model.denoise(z, tau, prompt)
        got = UNetWrapper(unet, model.alphas_cumprod)(z, t, prompt)
    assert_differs(got, want, NETWORK, msg=defect)
    with pytest.raises(AssertionError):
        assert_close(got, want, NETWORK)


def test_fixed_wrapper_bakes_tau(model):
    z, _, prompt = inputs()
    tau = 321.75
    with torch.no_grad():
        want = model.denoise(z, torch.full((2,), tau), prompt)
        got = FixedUNetWrapper(merged_copy(model).unet, model.alphas_cumprod, tau)(z, prompt)
        other = model.denoise(z, torch.full((2,), 600.0), prompt)
    assert_close(got, want, NETWORK)
    assert_differs(other, want, NETWORK)  # tau really changes the result


def test_half_copy_keeps_the_schedule_in_float32(model):
    w = UNetWrapper(merged_copy(model).unet, model.alphas_cumprod)
    h = half_copy(w)
    assert h.alphas_cumprod.dtype == torch.float32
    assert torch.equal(h.alphas_cumprod, w.alphas_cumprod)
    assert next(h.unet.parameters()).dtype == torch.float16
    assert next(w.unet.parameters()).dtype == torch.float32  # the original is untouched


def test_fp16_io_wrappers(model):
    specs = component_specs(saipe_size=64, num_queries=77, prompt_dim=64, latent_channels=4,
                            baked_timestep=False)
    w = build_wrappers(merged_copy(model), ("unet", "predictor"), None)
    z, tau, prompt = inputs()
    m = for_export(w["unet"], specs["unet"], "fp16")
    out = m(z.half(), tau, prompt.half())
    assert out.dtype == torch.float16
    with torch.no_grad():
        ref = w["unet"](z, tau, prompt)
    assert_close(out, ref, LAYER)  # in float16: its eps, not float32's
    p = for_export(w["predictor"], specs["predictor"], "fp16")
    t, qf = p(torch.rand(1, 3, 32, 32).half())
    assert t.dtype == torch.float32 and qf.dtype == torch.float32  # scalars stay float32


class _Spiky(nn.Module):
    def forward(self, x):
        return torch.tanh(torch.exp(x) * 3.0e4)  # the output is small, the inside is not


def test_activation_tracker_sees_inside_modules():
    tracker = ActivationTracker()
    with tracker, torch.no_grad():
        y = _Spiky()(torch.tensor([1.0]))
    assert y.abs().max() <= 1
    assert tracker.max_abs == pytest.approx(np.e * 3.0e4, rel=1e-5)
    safety = fp16_safety("vae_decoder", tracker.max_abs)
    assert safety["at_risk"] and safety["fp16_max"] == FP16_MAX
    assert "vae_decoder" in safety["advice"] and "--precision vae_decoder=fp32" in \
        safety["advice"]
    assert not fp16_safety("unet", 812.5)["at_risk"]


def test_crop_and_fit():
    img = np.arange(20 * 13 * 3, dtype=np.uint8).reshape(20, 13, 3)
    c = crop_to_multiple(img, 8)
    assert c.shape == (16, 8, 3) and np.array_equal(c, img[:16, :8])  # top-left anchored
    x = torch.arange(2 * 3 * 5 * 6, dtype=torch.float32).reshape(2, 3, 5, 6)
    assert torch.equal(fit(x, (4, 4)), x[..., :4, :4])
    grown = fit(x, (8, 8))
    assert grown.shape == (2, 3, 8, 8) and torch.equal(grown[..., :5, :6], x)


def test_calibrated_tau_and_qf_table(model):
    _, images = synthetic_images(0)
    taus = [predict_tau(model.predictor, im) for im in images]
    assert len(set(np.round(taus, 3))) > 1, "the fixture's predictor should vary per image"
    assert calibrate_tau(model.predictor, images) == pytest.approx(float(np.median(taus)))
    table = qf_table(model.predictor, images[:2], "skimage")
    assert table["qf"] == list(QF_TABLE_QUALITIES) and len(table["tau"]) == 11
    assert all(0 <= t <= 999 for t in table["tau"]) and table["images"] == 2
