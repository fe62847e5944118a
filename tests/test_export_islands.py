"""Float32 islands of fp16 graphs: which modules the tracking flags, that the half copy keeps
them (and the declared ones) float32, and the exported TensorRT-bound graph's dtypes."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from export.islands import Island, ModuleActivations, flagged_islands, outermost
from export.parity import FP16_MAX
from export.specs import component_specs
from export.wrappers import CastIO, build_wrappers, for_export, half_copy
from tolerance import LAYER, assert_close


class _Loud(nn.Module):
    """A block whose inside overflows float16 (x * 3e5) but whose output (a norm) does not."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        with torch.no_grad():
            self.up.weight.copy_(torch.eye(4) * 3.0e5)
            self.up.bias.zero_()

    def forward(self, x):
        return self.norm(self.up(x))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.loud = _Loud()
        self.last = nn.Linear(4, 4)

    def forward(self, x):
        return self.last(self.loud(self.first(x)))


def _tracked(net, x):
    with ModuleActivations(net) as acts, torch.no_grad():
        net(x)
    return acts


def test_tracking_flags_the_smallest_module_whose_output_fits_fp16():
    torch.manual_seed(0)
    net, x = _Net(), torch.randn(3, 4)
    acts = _tracked(net, x)
    assert acts.op_max["loud.up"] > FP16_MAX and acts.out_max["loud"] < 10
    islands, whole = flagged_islands(acts.op_max, acts.out_max)
    assert [i.module for i in islands] == ["loud"] and not whole  # not loud.up: its output
    #                                                              overflows when cast back


def test_no_island_is_possible_when_the_output_itself_overflows():
    net = nn.Sequential(nn.Linear(4, 4))
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(4) * 1e6)
    acts = _tracked(net, torch.ones(1, 4))
    islands, whole = flagged_islands(acts.op_max, acts.out_max)
    assert islands == [] and whole


def test_flagged_island_makes_the_half_copy_finite_and_close():
    torch.manual_seed(0)
    net, x = _Net(), torch.randn(3, 4)
    islands, _ = flagged_islands(*(lambda a: (a.op_max, a.out_max))(_tracked(net, x)))
    plain = half_copy(net)
    with torch.no_grad():
        assert not torch.isfinite(plain(x.half())).all()  # without the island: inf/nan
        kept = half_copy(net, tuple(islands))
        got, ref = kept(x.half()), net(x)
    assert kept.loud.inner.up.weight.dtype == torch.float32
    assert kept.first.weight.dtype == torch.float16 and got.dtype == torch.float16
    assert_close(got, ref, LAYER)  # float16's eps: the island keeps it finite and close


def test_outermost_drops_nested_islands():
    found = outermost([Island("unet.time_embedding.linear_1", "a"),
                       Island("unet.time_embedding", "b"), Island("x", "c")])
    assert [i.module for i in found] == ["unet.time_embedding", "x"]


def test_declared_islands_of_the_unet_and_predictor(tiny_model):
    w = build_wrappers(tiny_model, ("unet", "predictor"), None)
    h = half_copy(w["unet"])
    assert next(h.unet.time_embedding.inner.parameters()).dtype == torch.float32
    assert next(h.unet.conv_in.parameters()).dtype == torch.float16
    p = half_copy(w["predictor"])
    assert p.predictor.timestep_head.inner.weight.dtype == torch.float32
    # The time embedding gets float32 sinusoids: tau = 999.3 and 999.5 differ in float32 but
    # are the same float16 number, so a float16 path could not tell them apart.
    t = torch.tensor([999.3, 999.5])
    emb = h.unet.get_time_embed(torch.zeros(2, 1, 8, 8, dtype=torch.float16), t)
    assert emb.dtype == torch.float32 and not torch.equal(emb[0], emb[1])


@pytest.mark.parametrize("baked", [False, True])
def test_unet_fp16_with_islands_is_within_the_fp16_tolerance(tiny_model, baked):
    """Near tau = 999, where the sinusoids need float32: the half UNet with its islands stays
    within the fp16 tolerance of float32 PyTorch."""
    cfg = tiny_model.cfg
    specs = component_specs(saipe_size=cfg.saipe.image_size, num_queries=cfg.saipe.num_queries,
                            prompt_dim=cfg.saipe.prompt_dim, latent_channels=cfg.latent_channels,
                            baked_timestep=baked)
    w = build_wrappers(tiny_model, ("unet",), 987.25 if baked else None)["unet"]
    torch.manual_seed(1)
    z = torch.randn(2, cfg.latent_channels, 16, 16)
    prompt = torch.randn(2, cfg.saipe.num_queries, cfg.saipe.prompt_dim)
    args = (z, prompt) if baked else (z, torch.tensor([987.25, 998.75]), prompt)
    half = for_export(w, specs["unet"], "fp16")
    assert isinstance(half, CastIO)
    with torch.no_grad():
        ref = w(*args)
        got = half(*(a.half() if a.dim() > 1 else a for a in args)).float()
    tol = specs["unet"].fp16_tolerance
    # The export's own parity rule (export/specs.py) passes on this input.
    torch.testing.assert_close(got, ref, rtol=0, atol=tol.limit(float(ref.abs().max())))
