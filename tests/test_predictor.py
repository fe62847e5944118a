import pytest
import torch

from sodiff.config import TINY, TINY_FULL
from sodiff.predictor import TimestepPredictor, decaying_logits


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
    assert torch.allclose(tau, torch.full((2,), (TINY.predictor.t_max - 1) / 2))
    assert torch.allclose(qf, torch.full((2,), TINY.predictor.qf_init))
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
    assert torch.allclose(tau, torch.full((2,), TINY_FULL.predictor.t_init), rtol=1e-4)


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
