import pytest
import torch

from sodiff.config import TINY, TINY_FULL
from sodiff.predictor import TimestepPredictor, decaying_logits
from tolerance import ELEMENTWISE, LAYER, NETWORK, assert_close


@pytest.fixture
def predictor():
    torch.manual_seed(0)
    p = TimestepPredictor(TINY.predictor)
    with torch.no_grad():  # non-zero head so the logits depend on the image
        p.timestep_head.weight.normal_(0, 0.5)
    return p


def test_untrained_predictor_starts_mid_range():
    p = TimestepPredictor(TINY.predictor)
    tau, qf, logits = p(torch.randn(2, 3, 64, 48))
    assert_close(tau, torch.full((2,), (TINY.predictor.t_max - 1) / 2), NETWORK)
    assert_close(qf, torch.full((2,), TINY.predictor.qf_init), NETWORK)
    assert logits.shape == (2, TINY.predictor.t_max)


@pytest.mark.parametrize("mean", [1.5, 50.0, 300.0])
def test_decaying_logits_hit_the_requested_mean(mean):
    logits = decaying_logits(1000, mean)
    probs = torch.softmax(logits.double(), 0)
    assert float((probs * torch.arange(1000)).sum()) == pytest.approx(mean, rel=1e-4)
    assert (probs[1:] < probs[:-1]).all()  # geometric: the smallest timestep is likeliest


def test_t_init_sets_the_untrained_timestep():
    p = TimestepPredictor(TINY_FULL.predictor)
    tau, _, _ = p(torch.randn(2, 3, 64, 48))
    # The mean of a softmax over 1000 timesteps: its float32 sum rounds ~1000 times.
    assert_close(tau, torch.full((2,), TINY_FULL.predictor.t_init), 1000)


def test_inference_is_deterministic_and_in_range(predictor):
    x = torch.rand(2, 3, 72, 56) * 2 - 1
    a, _, _ = predictor(x)
    b, _, _ = predictor(x)
    assert torch.equal(a, b)
    assert ((a >= 0) & (a <= TINY.predictor.t_max - 1)).all()


def test_gumbel_is_stochastic_and_differentiable(predictor):
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    g = torch.Generator().manual_seed(0)
    tau1, _, _ = predictor(x, gumbel=True, generator=g)
    tau2, _, _ = predictor(x, gumbel=True, generator=g)
    assert not torch.equal(tau1, tau2)
    tau1.sum().backward()
    grad = predictor.timestep_head.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_logits_gradient_through_gumbel_softmax():
    from sodiff.predictor import expected_timestep

    logits = torch.zeros(1, 10, requires_grad=True)
    tau = expected_timestep(logits, torch.arange(10.0), gumbel=True,
                            generator=torch.Generator().manual_seed(3))
    tau.sum().backward()
    # d tau / d l_i = p_i (i - tau): positive for candidates above tau, negative below.
    g = logits.grad[0]
    assert g[9] > 0 and g[0] < 0


def test_qf_head_trains(predictor):
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    _, qf, _ = predictor(x)
    (qf - torch.tensor([10.0, 20.0])).abs().mean().backward()
    assert predictor.qf_head.bias.grad.abs() > 0


def test_too_small_image_is_refused(predictor):
    with pytest.raises(ValueError, match="at least 8x8"):
        predictor(torch.zeros(1, 3, 4, 64))


# --- issue 13: the block-DCT front end, old checkpoints, parameter groups, the tau prior ---

def test_configs_without_the_new_fields_rebuild_the_old_learned_stem():
    import json
    from pathlib import Path

    from sodiff.config import ModelConfig, PredictorConfig

    old = TimestepPredictor(PredictorConfig(stem_channels=16, channels=(16, 16, 32, 32)))
    assert old.cfg.front == "conv" and old.stem.weight.shape == (16, 3, 8, 8)
    assert [k for k in old.state_dict() if k.startswith("front")] == []
    saved = Path(__file__).resolve().parents[1] / "weights" / "tiny" / "sodiff.json"
    if saved.is_file():  # the bundled checkpoint's config predates `front`
        cfg = json.loads(saved.read_text())["config"]
        if "front" not in cfg["predictor"]:
            assert ModelConfig.from_dict(cfg).predictor.front == "conv"


def test_presets_choose_the_dct_front():
    from sodiff.config import get_preset

    for name in ("sd21", "tiny", "tiny-full"):
        p = get_preset(name).predictor
        assert p.front == "dct" and p.logit_scale < 1 and p.qf_scale > 1, name
    pred = TimestepPredictor(TINY.predictor)
    assert pred.stem.weight.shape == (16, 3 * 64, 1, 1)
    assert "front.weight" not in pred.state_dict()  # rebuilt from the config, never saved


def test_block_dct_is_jpeg_s_orthonormal_transform():
    from sodiff.predictor import BlockDCT, dct_basis

    basis = dct_basis().reshape(64, 64).double()
    assert_close(basis @ basis.T, torch.eye(64, dtype=torch.float64), 64)  # 64-term sums
    # A flat grey block has only a DC coefficient: 8 * (pixel - 128) for the luma channel.
    x = torch.full((1, 3, 16, 8), 0.5)
    coeffs = torch.nn.functional.conv2d(x, BlockDCT(3).weight, stride=8)
    assert coeffs.shape == (1, 192, 2, 1)
    assert_close(coeffs[0, 0], torch.full_like(coeffs[0, 0], 8 * 0.5 * 127.5), LAYER)
    assert_close(coeffs[0, 1:], torch.zeros_like(coeffs[0, 1:]), LAYER, scale=8 * 0.5 * 127.5)


def test_dct_features_see_the_quantisation():
    import numpy as np

    from sodiff.jpeg import compress
    from sodiff.predictor import BlockDCT

    rng = np.random.default_rng(0)
    image = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    feats = []
    for q in (10, 90):
        lq = torch.from_numpy(compress(image, q)[0]).permute(2, 0, 1)[None].float() / 127.5 - 1
        feats.append(BlockDCT(3)(lq).mean().item())
    assert feats[0] < feats[1] - 0.5  # coarse steps zero many coefficients: log(1 + 0) = 0


def test_timestep_head_has_its_own_slower_group_and_scaled_logits():
    pred = TimestepPredictor(TINY.predictor)
    groups = pred.param_groups(1e-3, 0.05)
    assert [g["name"] for g in groups] == ["predictor", "timestep_head"]
    head = {id(p) for p in pred.timestep_head.parameters()}
    assert {id(p) for p in groups[1]["params"]} == head
    assert not head & {id(p) for p in groups[0]["params"]}
    assert groups[1]["lr"] == pytest.approx(5e-5) and groups[0]["lr"] == 1e-3
    with torch.no_grad():
        pred.timestep_head.weight.normal_()
    feat = pred.features(torch.rand(1, 3, 32, 32) * 2 - 1)
    assert_close(pred.logits(feat), TINY.predictor.logit_scale * pred.timestep_head(feat),
                 ELEMENTWISE)


def test_qf_head_predicts_the_normalised_target():
    pred = TimestepPredictor(TINY.predictor)
    with torch.no_grad():
        pred.qf_head.bias.fill_(-1.0)  # (QF - 50) / 45 = -1: QF 5
    _, qf, _ = pred(torch.rand(1, 3, 32, 32) * 2 - 1)
    assert qf.item() == pytest.approx(5.0)


def test_timestep_prior_maps_qf_to_the_noise_level_table():
    from sodiff.predictor import set_timestep_prior

    qfs, taus = [5, 10, 20, 30, 40, 60, 80], [60.0, 40.0, 22.0, 14.0, 10.0, 6.0, 2.5]
    pred = TimestepPredictor(TINY_FULL.predictor)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    got = []
    for q in qfs:
        with torch.no_grad():
            pred.qf_head.weight.zero_()
            pred.qf_head.bias.fill_((q - 50) / 45)
        set_timestep_prior(pred, qfs, taus)
        tau, qf, logits = pred(x)
        assert torch.softmax(logits, -1).max() < 0.99  # a spread prior, not one-hot
        got.append(tau.item())
    assert all(a > b for a, b in zip(got, got[1:])), got  # lower quality, more noise
    assert got[1] - got[-2] > 20  # QF 10 against QF 60
    for g, t in zip(got, taus):
        assert abs(g - t) < 0.5 * t + 3, (got, taus)  # a log-linear fit of the table


def test_bad_predictor_fields_are_named():
    from sodiff.config import PredictorConfig

    with pytest.raises(ValueError, match="front='fft'"):
        TINY.replace(predictor=PredictorConfig(front="fft"))
    with pytest.raises(ValueError, match="logit_scale=0"):
        TINY.replace(predictor=PredictorConfig(logit_scale=0))
