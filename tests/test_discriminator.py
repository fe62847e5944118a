import copy

import pytest
import torch
from torch import nn

from sodiff.base import build_unet
from sodiff.config import TINY, TINY_UNET
from sodiff.schedule import add_noise, alphas_cumprod
from training.discriminator import UNetDiscriminator, noisy_input
from training.losses import discriminator_loss, generator_loss, stage2_discriminator_loss
from tolerance import ELEMENTWISE, NETWORK, assert_close, assert_differs

D_PROMPT = TINY_UNET["cross_attention_dim"]


@pytest.fixture(scope="module")
def base_unet():
    torch.manual_seed(0)
    return build_unet(TINY_UNET)


def make_disc(base_unet, trainable="all"):
    torch.manual_seed(1)
    return UNetDiscriminator(copy.deepcopy(base_unet), trainable=trainable)


def inputs(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, TINY.latent_channels, 8, 8, generator=g), torch.randn(b, 77, D_PROMPT, generator=g))


def toy_generator():
    torch.manual_seed(2)
    return nn.Conv2d(TINY.latent_channels, TINY.latent_channels, 3, padding=1)


def test_output_shape_and_dropped_layers(base_unet):
    d = make_disc(base_unet)
    z, prompt = inputs(3)
    logits = d(z, torch.tensor([0, 500, 999]), prompt)
    assert logits.shape == (3,) and torch.isfinite(logits).all()
    assert d(z, torch.tensor(10), prompt).shape == (3,)  # one t for the whole batch
    names = {n.split(".")[0] for n, _ in d.named_parameters()}
    assert "up_blocks" not in names and "conv_out" not in names and "head" in names
    # The logit depends on the timestep and on the prompt (the trunk is really used).
    assert_differs(d(z, torch.tensor(900), prompt), d(z, torch.tensor(10), prompt), NETWORK)
    assert_differs(d(z, torch.tensor(10), -prompt), d(z, torch.tensor(10), prompt), NETWORK)


def test_features_match_the_unets_own_mid_block(base_unet):
    """The trunk reproduces the UNet's forward up to its mid block (captured by a hook)."""
    unet = copy.deepcopy(base_unet)
    captured = {}
    unet.mid_block.register_forward_hook(lambda m, i, o: captured.update(mid=o))
    z, prompt = inputs(2)
    t = torch.tensor([3, 700])
    with torch.no_grad():
        unet(z, t, encoder_hidden_states=prompt)
        ours = UNetDiscriminator(unet).features(z, t, prompt)
    assert_close(ours, captured["mid"], NETWORK)


def test_noisy_input_uses_the_schedule():
    table = alphas_cumprod()
    z = torch.randn(4, TINY.latent_channels, 8, 8)
    z_t, t = noisy_input(z, table, torch.Generator().manual_seed(5))
    assert t.dtype == torch.long and ((t >= 0) & (t < 1000)).all() and len(set(t.tolist())) > 1
    g = torch.Generator().manual_seed(5)
    torch.randint(0, 1000, (4,), generator=g)
    expected = add_noise(z, torch.randn(z.shape, generator=g), table[t])
    assert_close(z_t, expected, ELEMENTWISE)


def test_generator_loss_reaches_the_generator(base_unet):
    """The CODiff pitfall: L_G's discriminator call must keep the graph to z_hat."""
    for trainable in ("all", "head"):
        d, gen = make_disc(base_unet, trainable), toy_generator()
        z_lq, prompt = inputs()
        z_hat = gen(z_lq)
        z_hat.retain_grad()
        loss = generator_loss(d.noised_logits(z_hat, prompt, torch.Generator().manual_seed(0)))
        loss.backward()
        assert z_hat.grad is not None and z_hat.grad.abs().sum() > 0, trainable
        assert gen.weight.grad is not None and gen.weight.grad.abs().sum() > 0, trainable


def test_discriminator_loss_trains_d_not_the_generator(base_unet):
    d, gen = make_disc(base_unet), toy_generator()
    z_lq, prompt = inputs(seed=1)
    z_real = torch.randn_like(z_lq)
    z_hat = gen(z_lq)
    loss, terms = stage2_discriminator_loss(d, z_hat, z_real, prompt,
                                            torch.Generator().manual_seed(0))
    loss.backward()
    assert gen.weight.grad is None  # fake latent detached
    grads = {n: p.grad for n, p in d.named_parameters()}
    assert grads["head.4.weight"].abs().sum() > 0
    assert grads["conv_in.weight"] is not None and grads["conv_in.weight"].abs().sum() > 0
    assert_close(terms["d_loss"], loss.detach(), ELEMENTWISE)


def test_head_only_freezes_trunk(base_unet):
    d = make_disc(base_unet, "head")
    trainable = {n.split(".")[0] for n, p in d.named_parameters() if p.requires_grad}
    assert trainable == {"head"}
    z, prompt = inputs()
    discriminator_loss(d(z, torch.tensor([1, 2]), prompt),
                       d(z + 1, torch.tensor([1, 2]), prompt)).backward()
    assert d.conv_in.weight.grad is None and d.head[4].weight.grad.abs().sum() > 0
    d.set_trainable("all")
    assert all(p.requires_grad for p in d.parameters())


def test_bad_arguments(base_unet):
    with pytest.raises(ValueError, match="trainable='some'"):
        UNetDiscriminator(copy.deepcopy(base_unet), trainable="some")
    with pytest.raises(ValueError, match="lacks"):
        UNetDiscriminator(nn.Conv2d(4, 4, 1))
    d = make_disc(base_unet)
    z, prompt = inputs()
    with pytest.raises(ValueError, match="prompt shape"):
        d(z, torch.tensor([1, 2]), prompt[..., :8])
    with pytest.raises(ValueError, match="t has 3 values"):
        d(z, torch.tensor([1, 2, 3]), prompt)


def test_from_generator_unet_copies_and_drops_lora(base_unet):
    from sodiff.config import TINY
    from sodiff.lora import add_lora, has_lora
    unet = copy.deepcopy(base_unet)
    add_lora(unet, TINY.lora)
    d = UNetDiscriminator.from_generator_unet(unet)
    assert has_lora(unet) and not has_lora(d)  # the generator keeps its LoRA
    assert all(p.requires_grad for p in d.parameters())
    z, prompt = inputs()
    t = torch.tensor([5, 600])
    plain = UNetDiscriminator(copy.deepcopy(base_unet))
    plain.head.load_state_dict(d.head.state_dict())
    with torch.no_grad():  # LoRA B is zero at the start: the trunk equals the base UNet's
        assert_close(d(z, t, prompt), plain(z, t, prompt), NETWORK)
