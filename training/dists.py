"""DISTS (Ding et al. 2020), the perceptual distance inside SODiff's edge-aware loss (Eq. 7).

Same network and formula as the authors' `DISTS_pytorch`, written here without torchvision:
VGG16's conv trunk (torchvision's `vgg16.features` layers 0..29) with every max-pool replaced by
an L2 pooling (3x3 Hanning blur of x^2, stride 2, then sqrt), cut into 5 stages, with the input
image itself as stage 0. Per channel of each stage, a structure term S1 (global means) and a
texture term S2 (global variances / covariance) are weighted by learnt `alpha` / `beta`.

Weights file (one safetensors, produced by `python -m training.dists convert`), keys:
  features.N.weight / features.N.bias   VGG16 conv N, N in CONV_INDICES (torchvision's names)
  alpha, beta                           [1, 1475, 1, 1] (1475 = sum of CHANNELS)
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import click
import torch
import torch.nn.functional as F
from torch import nn

from runtime.cliopts import CONTEXT_SETTINGS, version_option

# (torchvision index of the conv, in channels, out channels); stages end before each pool.
VGG16_CONVS = ((0, 3, 64), (2, 64, 64),
               (5, 64, 128), (7, 128, 128),
               (10, 128, 256), (12, 256, 256), (14, 256, 256),
               (17, 256, 512), (19, 512, 512), (21, 512, 512),
               (24, 512, 512), (26, 512, 512), (28, 512, 512))
CONV_INDICES = tuple(i for i, _, _ in VGG16_CONVS)
STAGE_STARTS = (0, 5, 10, 17, 24)  # first conv of each stage; stages 2..5 begin with an L2 pool
CHANNELS = (3, 64, 128, 256, 512, 512)  # stage 0 is the image
WEIGHT_CHANNELS = sum(CHANNELS)  # 1475
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
C1 = C2 = 1e-6  # the reference's stabilisers for S1 / S2
L2POOL_EPS = 1e-12  # inside the sqrt, as in the reference
CONVERT_HINT = ("produce it with `python -m training.dists convert --vgg vgg16-397923af.pth "
                "--alpha-beta weights.pt --out FILE` (torchvision's VGG16 weights and "
                "DISTS_pytorch's weights.pt), or train with `--perceptual none` to disable the "
                "DISTS loss")


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Every tensor of a DISTS weights file and its shape."""
    shapes: dict[str, tuple[int, ...]] = {}
    for i, cin, cout in VGG16_CONVS:
        shapes[f"features.{i}.weight"] = (cout, cin, 3, 3)
        shapes[f"features.{i}.bias"] = (cout,)
    shapes["alpha"] = shapes["beta"] = (1, WEIGHT_CHANNELS, 1, 1)
    return shapes


def check_tensors(tensors: dict[str, torch.Tensor], source: str,
                  keys: tuple[str, ...] | None = None) -> None:
    """ValueError naming every missing or mis-shaped tensor (`keys`: only check these)."""
    shapes = expected_shapes()
    missing = [k for k in (keys or shapes) if k not in tensors]
    wrong = [f"{k} {tuple(tensors[k].shape)} (expected {shapes[k]})"
             for k in (keys or shapes) if k in tensors and tuple(tensors[k].shape) != shapes[k]]
    problems = ([f"missing {', '.join(missing)}"] if missing else []) + \
        ([f"mis-shaped {', '.join(wrong)}"] if wrong else [])
    if problems:
        raise ValueError(f"{source}: not DISTS weights: " + "; ".join(problems))


class L2Pool(nn.Module):
    """sqrt(blur(x^2)) at stride 2: the reference's `L2pooling(filter_size=5)`, whose Hanning
    window hanning(5)[1:-1] = [.5, 1, .5] makes a normalised 3x3 kernel, padding 1."""

    def __init__(self, channels: int):
        super().__init__()
        a = torch.tensor([0.5, 1.0, 0.5], dtype=torch.float64)
        g = (a[:, None] * a[None, :]) / (a.sum() ** 2)
        self.register_buffer("kernel", g.float()[None, None].repeat(channels, 1, 1, 1),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.conv2d(x * x, self.kernel.to(x.dtype), stride=2, padding=1, groups=x.shape[1])
        return (out + L2POOL_EPS).sqrt()


class DISTS(nn.Module):
    """DISTS distance `forward(x, y) -> [B]` for images in [0, 1], [B,3,H,W].

    `DISTS()` has random weights (VGG's init, alpha/beta ~ N(0.1, 0.01) as in the reference):
    for tests only. Use `DISTS.from_file(path)` for the real metric. All parameters are frozen;
    gradients flow to the inputs (the reference's `require_grad=True` mode).
    """

    def __init__(self):
        super().__init__()
        self.features = nn.ModuleDict()
        for i, cin, cout in VGG16_CONVS:
            conv = nn.Conv2d(cin, cout, 3, padding=1)
            # torchvision's VGG init keeps activations O(1) through 13 layers (random-weight
            # tests need features well above the 1e-6 stabilisers).
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
            self.features[str(i)] = conv
        self.pools = nn.ModuleList(L2Pool(c) for c in CHANNELS[1:5])
        g = torch.Generator().manual_seed(0)
        self.alpha = nn.Parameter(0.1 + 0.01 * torch.randn(1, WEIGHT_CHANNELS, 1, 1, generator=g))
        self.beta = nn.Parameter(0.1 + 0.01 * torch.randn(1, WEIGHT_CHANNELS, 1, 1, generator=g))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)

    @classmethod
    def from_file(cls, path: str | Path) -> "DISTS":
        """Load a converted weights file (see the module docstring for its keys)."""
        from safetensors.torch import load_file
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"DISTS weights file {path} not found; {CONVERT_HINT}")
        tensors = load_file(str(path))
        check_tensors(tensors, str(path))
        model = cls()
        model.load_state_dict({k: v.float() for k, v in tensors.items()
                               if k in expected_shapes()})
        return model.requires_grad_(False)

    def stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The 6 feature maps DISTS compares: the image, then relu1_2 .. relu5_3."""
        feats = [x]
        h = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        for s, start in enumerate(STAGE_STARTS):
            if s:
                h = self.pools[s - 1](h)
            end = STAGE_STARTS[s + 1] if s + 1 < len(STAGE_STARTS) else 30
            for i in CONV_INDICES:
                if start <= i < end:
                    h = F.relu(self.features[str(i)](h))
            feats.append(h)
        return feats

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample distance [B]; 0 for identical inputs, about 0..1 otherwise."""
        if x.dim() != 4 or x.shape[1] != 3 or x.shape != y.shape:
            raise ValueError(f"DISTS expects two image batches [B,3,H,W] of one shape, got "
                             f"{tuple(x.shape)} and {tuple(y.shape)}")
        feats = self.stages(torch.cat([x, y]))
        w_sum = self.alpha.sum() + self.beta.sum()
        alphas = torch.split(self.alpha.float() / w_sum, CHANNELS, dim=1)
        betas = torch.split(self.beta.float() / w_sum, CHANNELS, dim=1)
        dist = x.new_zeros(x.shape[0], dtype=torch.float32)
        for f, a, b in zip(feats, alphas, betas):
            # Statistics in float32: under bf16/fp16 autocast the 1e-6 stabilisers would vanish.
            fx, fy = f.float().chunk(2)
            mx, my = fx.mean([2, 3], keepdim=True), fy.mean([2, 3], keepdim=True)
            s1 = (2 * mx * my + C1) / (mx ** 2 + my ** 2 + C1)
            dx, dy = fx - mx, fy - my
            vx, vy = (dx * dx).mean([2, 3], keepdim=True), (dy * dy).mean([2, 3], keepdim=True)
            # Centred covariance: the reference's E[xy] - E[x]E[y] is the same quantity, but
            # cancels catastrophically for large-mean features; this form makes S2 exactly 1 for
            # identical inputs.
            cov = (dx * dy).mean([2, 3], keepdim=True)
            s2 = (2 * cov + C2) / (vx + vy + C2)
            # 1 - sum(a S1 + b S2) with sum(a + b) = 1, written as sum(a (1 - S1) + b (1 - S2)),
            # which is exactly 0 when x == y instead of a rounding residue.
            dist = dist + (a * (1 - s1) + b * (1 - s2)).sum([1, 2, 3])
        return dist


# --- converter ---------------------------------------------------------------------------------

def _load_any(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A state dict from a `.safetensors` file or a torch pickle (weights only, never code)."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad input file
        raise ValueError(f"{path}: cannot read as a torch weights file ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    return {k: v.detach() for k, v in obj.items() if isinstance(v, torch.Tensor)}


def convert(vgg: str | Path, alpha_beta: str | Path) -> dict[str, torch.Tensor]:
    """The DISTS weights file's tensors (float32, contiguous) from torchvision's vgg16 state
    dict and DISTS_pytorch's `weights.pt` (either may also be a safetensors file)."""
    vgg_sd = _load_any(Path(vgg).expanduser(), "VGG16 weights")
    ab = _load_any(Path(alpha_beta).expanduser(), "DISTS alpha/beta weights")
    conv_keys = tuple(k for k in expected_shapes() if k.startswith("features."))
    check_tensors(vgg_sd, str(vgg), conv_keys)
    check_tensors(ab, str(alpha_beta), ("alpha", "beta"))
    out = {k: vgg_sd[k] for k in conv_keys} | {"alpha": ab["alpha"], "beta": ab["beta"]}
    return {k: v.float().contiguous() for k, v in out.items()}


def write_weights(tensors: dict[str, torch.Tensor], out: str | Path) -> Path:
    """Write atomically (temp file + rename) so a failed run leaves no half-written file."""
    from safetensors.torch import save_file
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".safetensors.tmp", dir=out.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt", "content": "DISTS (VGG16 + alpha/beta)"})
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


@version_option()
@click.group(context_settings=CONTEXT_SETTINGS)
def cli() -> None:
    """DISTS weights tools."""


@cli.command("convert")
@click.option("--vgg", required=True, type=click.Path(path_type=Path),
              help="torchvision's vgg16 state dict (vgg16-397923af.pth) or a safetensors copy")
@click.option("--alpha-beta", required=True, type=click.Path(path_type=Path),
              help="DISTS_pytorch's weights.pt (alpha, beta [1,1475,1,1]) or a safetensors copy")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="the single safetensors file DISTS.from_file reads")
@click.option("--force", is_flag=True, help="replace --out if it exists")
def convert_cmd(vgg: Path, alpha_beta: Path, out: Path, force: bool) -> None:
    """Pack VGG16 + DISTS alpha/beta into one safetensors file."""
    if out.exists() and not force:
        raise click.ClickException(f"{out} exists; pass --force to replace it")
    try:
        tensors = convert(vgg, alpha_beta)
        DISTS().load_state_dict(tensors)  # proves the file will load before writing it
        write_weights(tensors, out)
    except (FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote {out} ({len(tensors)} tensors)")


if __name__ == "__main__":
    cli()
