import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from training.dists import CHANNELS, CONV_INDICES, DISTS, WEIGHT_CHANNELS, cli
from tolerance import NETWORK, assert_close


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DISTS()


def smooth_image(h=32):
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, h), indexing="ij")
    return torch.stack([0.5 + 0.3 * torch.sin(6 * xx), 0.5 + 0.3 * torch.cos(5 * yy),
                        0.3 + 0.4 * xx * yy])[None]


def test_identical_inputs_give_zero(model):
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    d = model(x, x)
    assert d.shape == (2,)
    assert_close(d, torch.zeros(2), NETWORK, scale=1.0)  # a distance works at the scale of 1


def test_symmetric_and_positive(model):
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    dxy, dyx = model(x, y), model(y, x)
    assert (dxy > 1e-3).all()
    assert_close(dxy, dyx, NETWORK, scale=1.0)


def test_distance_grows_with_noise_full_model(model):
    img = smooth_image()
    noise = torch.randn(img.shape, generator=torch.Generator().manual_seed(0))
    d = [model(img, img + s * noise).item() for s in (0.02, 0.1, 0.3)]
    assert 0 < d[0] < d[1] < d[2]


def test_distance_grows_with_noise_pixel_stage_exactly():
    """With only stage-0 weights (the image itself), DISTS is a closed form: for noise n that is
    zero-mean and uncorrelated with x per channel, S1 = 1 and S2 = (2v + c) / (2v + s^2 vn + c),
    so the distance is strictly increasing in s, whatever the random VGG weights are."""
    m = DISTS()
    with torch.no_grad():
        m.alpha[:, 3:] = 0
        m.beta[:, 3:] = 0
    x = smooth_image().double()
    n = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    n = n - n.mean([2, 3], keepdim=True)
    xc = x - x.mean([2, 3], keepdim=True)
    n = n - (n * xc).sum([2, 3], keepdim=True) / (xc * xc).sum([2, 3], keepdim=True) * xc
    x, n = x.float(), n.float()
    b = m.beta[0, :3, 0, 0] / (m.alpha.sum() + m.beta.sum())
    v, vn = x.var([2, 3], unbiased=False)[0], n.var([2, 3], unbiased=False)[0]
    for s in (0.05, 0.1, 0.2):
        expected = (b * (1 - (2 * v + 1e-6) / (2 * v + s * s * vn + 1e-6))).sum()
        # The closed form holds for the float64 noise; rounding it to float32 breaks the
        # exact decorrelation by ~1e-7 relative, which the 1e-3 covers with room.
        torch.testing.assert_close(m(x, x + s * n)[0], expected, rtol=1e-3, atol=1e-6)
    d = [m(x, x + s * n).item() for s in (0.05, 0.1, 0.2)]
    assert d[0] < d[1] < d[2]


def test_formula_matches_the_reference_transcription(model):
    """The reference's score on our features: 1 - sum(a S1 + b S2), cov = E[xy] - E[x]E[y]."""
    g = torch.Generator().manual_seed(6)
    x, y = torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        fx, fy = [f.double() for f in model.stages(x)], [f.double() for f in model.stages(y)]
        w = model.alpha.double().sum() + model.beta.double().sum()
        alpha = torch.split(model.alpha.double() / w, CHANNELS, dim=1)
        beta = torch.split(model.beta.double() / w, CHANNELS, dim=1)
        d1 = d2 = 0
        for a, b, u, v in zip(alpha, beta, fx, fy):
            mu, mv = u.mean([2, 3], keepdim=True), v.mean([2, 3], keepdim=True)
            d1 = d1 + (a * (2 * mu * mv + 1e-6) / (mu ** 2 + mv ** 2 + 1e-6)).sum(1)
            vu, vv = ((u - mu) ** 2).mean([2, 3], True), ((v - mv) ** 2).mean([2, 3], True)
            cov = (u * v).mean([2, 3], keepdim=True) - mu * mv
            d2 = d2 + (b * (2 * cov + 1e-6) / (vu + vv + 1e-6)).sum(1)
        ref = 1 - (d1 + d2).flatten()
    assert_close(model(x, y), ref, NETWORK, dtype="float32", scale=1.0)
    shapes = [tuple(f.shape[1:]) for f in fx]
    assert shapes == [(3, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4),
                      (512, 2, 2)]


def test_gradient_reaches_input_not_parameters(model):
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(4), requires_grad=True)
    y = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    model(x, y).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in model.parameters())


def test_bad_shapes_rejected(model):
    with pytest.raises(ValueError, match="B,3,H,W"):
        model(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 16, 16))


def synthetic_files(tmp_path, safetensors_inputs=False):
    """Files with the key names/shapes of torchvision's vgg16 and DISTS_pytorch's weights.pt."""
    g = torch.Generator().manual_seed(7)
    src = DISTS()
    vgg = {}
    for i in CONV_INDICES:
        conv = src.features[str(i)]
        vgg[f"features.{i}.weight"] = torch.randn(conv.weight.shape, generator=g) * 0.05
        vgg[f"features.{i}.bias"] = torch.randn(conv.bias.shape, generator=g) * 0.01
    vgg["classifier.6.bias"] = torch.zeros(1000)  # torchvision extras are ignored
    ab = {"alpha": torch.rand(1, WEIGHT_CHANNELS, 1, 1, generator=g),
          "beta": torch.rand(1, WEIGHT_CHANNELS, 1, 1, generator=g)}
    if safetensors_inputs:
        vgg_path, ab_path = tmp_path / "vgg16.safetensors", tmp_path / "weights.safetensors"
        save_file(vgg, str(vgg_path))
        save_file(ab, str(ab_path))
    else:
        vgg_path, ab_path = tmp_path / "vgg16-397923af.pth", tmp_path / "weights.pt"
        torch.save(vgg, vgg_path)
        torch.save(ab, ab_path)
    return vgg_path, ab_path, vgg, ab


@pytest.mark.parametrize("use_safetensors", [False, True])
def test_convert_then_load_equals_direct(tmp_path, use_safetensors):
    vgg_path, ab_path, vgg, ab = synthetic_files(tmp_path, use_safetensors)
    out = tmp_path / "dists.safetensors"
    res = CliRunner().invoke(cli, ["convert", "--vgg", str(vgg_path), "--alpha-beta",
                                   str(ab_path), "--out", str(out)])
    assert res.exit_code == 0, res.output
    loaded = DISTS.from_file(out)
    direct = DISTS()
    with torch.no_grad():
        for i in CONV_INDICES:
            direct.features[str(i)].weight.copy_(vgg[f"features.{i}.weight"])
            direct.features[str(i)].bias.copy_(vgg[f"features.{i}.bias"])
        direct.alpha.copy_(ab["alpha"])
        direct.beta.copy_(ab["beta"])
    g = torch.Generator().manual_seed(8)
    x, y = torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    assert torch.equal(loaded(x, y), direct(x, y))
    assert not torch.equal(loaded(x, y), DISTS()(x, y))  # the weights really changed
    assert all(not p.requires_grad for p in loaded.parameters())


def test_convert_refuses_overwrite_and_bad_shapes(tmp_path):
    vgg_path, ab_path, vgg, ab = synthetic_files(tmp_path)
    out = tmp_path / "dists.safetensors"
    out.write_text("keep me")
    args = ["convert", "--vgg", str(vgg_path), "--alpha-beta", str(ab_path), "--out", str(out)]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code != 0 and "--force" in res.output and out.read_text() == "keep me"
    torch.save({"alpha": ab["alpha"], "beta": ab["beta"][:, :100]}, ab_path)
    res = CliRunner().invoke(cli, args + ["--force"])
    assert res.exit_code != 0 and "beta" in res.output and "Traceback" not in res.output
    assert out.read_text() == "keep me"


def test_from_file_missing_and_incomplete(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        DISTS.from_file(tmp_path / "nope.safetensors")
    msg = str(e.value)
    assert "nope.safetensors" in msg and "training.dists convert" in msg
    assert "--perceptual none" in msg
    bad = {k: v for k, v in DISTS().state_dict().items() if k != "features.28.bias"}
    bad["alpha"] = torch.zeros(1, CHANNELS[0], 1, 1)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"features\.28\.bias.*alpha"):
        DISTS.from_file(tmp_path / "bad.safetensors")
