"""SAIPE (paper Sec. 3.1): shapes, Swin windowing, FAVOR+, gradients, ONNX export."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from sodiff.config import PRESETS, TINY
from sodiff.saipe import SAIPE, AttentionPool, favor_attention, orthogonal_features
from sodiff.swin import SwinLayer, window_partition, window_reverse
from tolerance import LAYER, NETWORK, PIPELINE, assert_close, assert_differs

CFG = TINY.saipe
# The tiny preset's RSTBs have one layer each, so none is shifted: this variant also covers the
# shifted-window path (roll + mask) in the export test.
SHIFTED = dataclasses.replace(CFG, rstb_depths=(2,), up_depth=2)
COSINE = dataclasses.replace(CFG, pool_scale=10.0)
# TensorRT's accepted ONNX ops as the docs state them (tests/test_docs.py holds export/trt_ops.py,
# which the export lint uses, to the same lists).
OPS_DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def make(cfg=CFG, seed=0) -> SAIPE:
    torch.manual_seed(seed)
    return SAIPE(cfg).eval()


def images(batch: int, cfg=CFG, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g) * 2 - 1


def test_tiny_shapes_and_finite_rec():
    with torch.no_grad():
        prompt, rec = make()(images(2))
    assert prompt.shape == (2, CFG.num_queries, CFG.prompt_dim)
    assert rec.shape == (2, CFG.in_channels, CFG.image_size, CFG.image_size)
    assert torch.isfinite(rec).all() and torch.isfinite(prompt).all()


def test_untrained_rec_is_near_identity():
    x = images(1)
    with torch.no_grad():
        _, rec = make()(x)
    assert (rec - x).abs().mean() < 0.1 * x.abs().mean()


def test_prompt_method_matches_forward():
    model, x = make(), images(1)
    with torch.no_grad():
        assert torch.equal(model.prompt(x), model(x)[0])


def test_wrong_shape_is_a_clear_error():
    model = make()
    with pytest.raises(ValueError, match=r"\[B, 3, 64, 64\]"):
        model(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="resize"):
        model(torch.zeros(3, 64, 64))


def test_batch_independence():
    model, x = make(), images(2)
    with torch.no_grad():
        prompt, rec = model(x)
        for i in range(2):
            p_i, r_i = model(x[i:i + 1])
            assert_close(p_i, prompt[i:i + 1], NETWORK)
            assert_close(r_i, rec[i:i + 1], NETWORK)


def test_window_partition_roundtrip():
    x = torch.randn(2, 8, 12, 5)
    windows = window_partition(x, 4, 8, 12, 5)
    assert windows.shape == (2 * 2 * 3, 16, 5)
    assert torch.equal(windows[1], x[0, 0:4, 4:8].reshape(16, 5))  # row-major window order
    assert torch.equal(window_reverse(windows, 4, 8, 12, 5), x)


def test_shifted_window_mask_blocks_wraparound():
    # Grid 8, window 4, shift 2: after the roll, original token (0, 0) shares a window with
    # (7, 7) (opposite corners) and with (1, 1) (true neighbours). Only the neighbour may see it.
    torch.manual_seed(0)
    layer = SwinLayer(8, (8, 8), heads=2, ws=4, shift=2, mlp_ratio=2.0).eval()
    x = torch.randn(1, 64, 8)
    x2 = x.clone()
    x2[0, 0] += torch.randn(8)  # not a constant shift, which LayerNorm would erase
    with torch.no_grad():
        y, y2 = layer(x), layer(x2)
    assert_close(y2[0, 7 * 8 + 7], y[0, 7 * 8 + 7], LAYER, scale=float(y.abs().max()))
    assert_differs(y2[0, 1 * 8 + 1], y[0, 1 * 8 + 1], LAYER)
    # The same weights without the shift give a different output: the shift path is live.
    unshifted = SwinLayer(8, (8, 8), heads=2, ws=4, shift=0, mlp_ratio=2.0).eval()
    unshifted.load_state_dict(layer.state_dict())
    with torch.no_grad():
        assert_differs(unshifted(x), y, LAYER)


def test_favor_approximates_softmax_attention():
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 2, 32, 16, generator=g) * 0.5 for _ in range(2))
    v = torch.randn(2, 2, 32, 16, generator=g)
    exact = torch.softmax(q @ k.transpose(-2, -1) / 16 ** 0.5, dim=-1) @ v
    approx = favor_attention(q, k, v, orthogonal_features(4096, 16, torch.Generator()
                                                          .manual_seed(1)))
    rel = lambda a: ((a - exact).norm() / exact.norm()).item()  # noqa: E731
    assert rel(approx) < 0.08  # 0.033 with these seeds; the error shrinks like 1/sqrt(m)
    # Uniform attention is far off, so the tolerance above does discriminate.
    assert rel(v.mean(dim=-2, keepdim=True).expand_as(v)) > 0.2


def test_favor_projection_is_a_deterministic_buffer():
    a, b = make(seed=0), make(seed=5)
    key = "t_align.encoder.0.projection"
    assert key in a.state_dict()
    assert torch.equal(a.state_dict()[key], b.state_dict()[key])
    assert a.state_dict()[key].shape == (CFG.performer_features,
                                         CFG.align_dim // CFG.performer_heads)


def test_gradients_reach_every_parameter():
    model = make().train()
    prompt, rec = model(images(2))
    (rec.abs().mean() + prompt.pow(2).mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing


def test_sd21_shapes_on_meta():
    cfg = PRESETS["sd21"].saipe
    with torch.device("meta"):
        model = SAIPE(cfg)
        prompt, rec = model(torch.empty(2, 3, cfg.image_size, cfg.image_size))
    assert prompt.shape == (2, 77, 1024)
    assert rec.shape == (2, 3, 512, 512)
    assert model.e_down(torch.empty(1, 3, 512, 512, device="meta")).shape == (1, 180, 128, 128)


def trt_accepted_ops() -> set[str]:
    text = OPS_DOC.read_text()
    accepted = re.search(r"Accepted \(TensorRT 8\.5\+\):(.*?)\n\n", text, re.S).group(1)
    return set(accepted.split()) | {"LayerNormalization"}  # opset 17, TensorRT 8.6+


@pytest.mark.parametrize("cfg", [CFG, SHIFTED, COSINE], ids=["tiny", "tiny-shifted", "tiny-cosine"])
def test_onnx_export_matches_and_uses_trt_ops(cfg, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = make(cfg)
    path = tmp_path / "saipe.onnx"
    torch.onnx.export(model, (images(1, cfg),), str(path), opset_version=17, dynamo=False,
                      input_names=["image"], output_names=["prompt", "rec"],
                      dynamic_axes={n: {0: "batch"} for n in ("image", "prompt", "rec")})
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert not ops - trt_accepted_ops(), f"ops TensorRT rejects: {ops - trt_accepted_ops()}"
    if cfg.rstb_depths[0] > 1:
        assert {"Slice", "Concat"} <= ops  # torch.roll of the shifted windows
    x = images(2, cfg)  # batch 2 against an export traced at batch 1: the batch is dynamic
    with torch.no_grad():
        want = model(x)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"image": x.numpy()})
    for g, w in zip(got, want):
        assert_close(g, w, PIPELINE)


def token_spread(prompt: torch.Tensor) -> float:
    p = prompt[0]
    return float((p - p.mean(0)).norm() / p.norm())


def test_fresh_prompt_tokens_are_distinct():
    # Issue 13: queries drawn at 0.02 scale left the q projection's bias dominating, so the 77
    # tokens of one image were one token repeated (spread 2e-4), and a stage 2 training T_align
    # from there kept them nearly so. Distinct queries give distinct tokens from the start.
    with torch.no_grad():
        prompt, _ = make()(images(1))
    assert token_spread(prompt) > 0.005  # 2e-4 with the old queries


def test_cosine_pool_logits_stay_within_the_scale_and_it_learns():
    pool = AttentionPool(16, 2, 5, 9, cosine_scale=10.0)
    q, k = 1e3 * torch.randn(1, 2, 5, 8), 1e3 * torch.randn(3, 2, 9, 8)
    logits = pool.logits(q, k)
    assert logits.abs().max() <= 10.0 + 1e-4
    assert logits.abs().max() > 3.0  # not squashed either: cosines of random 8-d vectors
    pool(torch.randn(3, 9, 16)).pow(2).mean().backward()
    assert pool.log_scale.grad is not None and pool.log_scale.grad.abs().sum() > 0


def test_cosine_pool_keeps_the_weights_and_spreads_the_tokens():
    # The 2026-12-02 bundled model's dot-product pooling had logits ~0.07 wide: near-uniform
    # attention, 77 near-identical tokens (0.7% apart). The same weights with cosine logits
    # attend selectively, so the tokens differ (4.5-8.7% at scale 10, before any training).
    model, x = make(), images(1)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with torch.no_grad():
        dot = model.prompt(x)
        model.use_cosine_pool(10.0)
        cos = model.prompt(x)
    after = model.state_dict()
    assert set(after) - set(before) == {"t_align.pool.log_scale"}
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert model.cfg.pool_scale == 10.0
    assert token_spread(cos) > 2 * token_spread(dot), (token_spread(cos), token_spread(dot))
    with pytest.raises(ValueError, match="already cosine"):
        model.use_cosine_pool(10.0)


def test_cosine_pool_config_rebuilds_the_same_module():
    converted = make()
    converted.use_cosine_pool(10.0)
    rebuilt = SAIPE(COSINE).eval()
    rebuilt.load_state_dict(converted.state_dict())  # strict: same parameters
    x = images(1)
    with torch.no_grad():
        assert torch.equal(rebuilt.prompt(x), converted.prompt(x))
