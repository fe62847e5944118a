"""The QF-aware timestep predictor (paper Sec. 3.3)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import PREDICTOR_FRONTS, PredictorConfig

JPEG_BLOCK = 8
PIXEL_SCALE = 127.5  # [-1, 1] -> pixel units (the scale of JPEG's quantisation steps)
# JFIF's RGB -> YCbCr rows (offsets dropped: they only move the DC coefficient). The luma
# channel's DCT coefficients are the ones JPEG quantised, up to rounding to uint8.
YCBCR = ((0.299, 0.587, 0.114), (-0.168736, -0.331264, 0.5), (0.5, -0.418688, -0.081312))


class ResBlock(nn.Module):
    """conv-SiLU-conv with a (strided) projection skip; no normalisation, so that a sample's
    prediction never depends on the rest of its batch."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.skip = (nn.Identity() if c_in == c_out and stride == 1
                     else nn.Conv2d(c_in, c_out, 1, stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.conv2(F.silu(self.conv1(F.silu(x))))


def dct_basis() -> torch.Tensor:
    """The orthonormal 8x8 DCT-II basis, [64, 8, 8]: row u*8+v is JPEG's coefficient (u, v)."""
    n = torch.arange(JPEG_BLOCK, dtype=torch.float64)
    c = torch.full((JPEG_BLOCK,), math.sqrt(2 / JPEG_BLOCK), dtype=torch.float64)
    c[0] = math.sqrt(1 / JPEG_BLOCK)
    d = c[:, None] * torch.cos((2 * n[None, :] + 1) * n[:, None] * math.pi / (2 * JPEG_BLOCK))
    return torch.einsum("ux,vy->uvxy", d, d).reshape(JPEG_BLOCK ** 2, JPEG_BLOCK, JPEG_BLOCK)


def block_dct_weight(in_channels: int) -> torch.Tensor:
    """Conv weight [64 C, C, 8, 8]: colour transform (YCbCr for RGB) then the block DCT, in
    pixel units, so that a stride-8 convolution gives each JPEG block's coefficients."""
    mix = torch.tensor(YCBCR, dtype=torch.float64) if in_channels == 3 \
        else torch.eye(in_channels, dtype=torch.float64)
    w = PIXEL_SCALE * mix[:, None, :, None, None] * dct_basis()[None, :, None]
    return w.reshape(in_channels * JPEG_BLOCK ** 2, in_channels, JPEG_BLOCK, JPEG_BLOCK).float()


class BlockDCT(nn.Module):
    """Fixed, parameter-free front end that sees what JPEG did: per 8x8 block on the grid at
    the origin, the log-magnitudes `log(1 + |c|)` of its 64 DCT coefficients per colour channel
    (YCbCr for RGB). Coarse quantisation zeroes coefficients, and that shows directly in these
    features, where a learned 8x8 convolution on pixels mostly saw image content."""

    def __init__(self, in_channels: int):
        super().__init__()
        # Not persistent: rebuilt exactly from the config, so checkpoints do not carry it.
        self.register_buffer("weight", block_dct_weight(in_channels), persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        coeffs = F.conv2d(image, self.weight.to(image.dtype), stride=JPEG_BLOCK)
        return torch.log(coeffs.abs() + 1)


class TimestepPredictor(nn.Module):
    """Predicts the denoising start timestep `tau` and the JPEG quality factor from an LQ image.

    The front end (`cfg.front`) works on 8x8 blocks so each token is one JPEG block: the input
    must be the image at native resolution, with the block grid at the origin. The logits are
    `cfg.logit_scale * timestep_head(features)`; they start flat, so an untrained predictor
    gives the middle of the range, `(t_max - 1) / 2`, unless `cfg.t_init` asks for another
    start (see `decaying_logits`). QF = `qf_init + qf_scale * qf_head(features)`.
    """

    def __init__(self, cfg: PredictorConfig):
        super().__init__()
        if cfg.front not in PREDICTOR_FRONTS:
            raise ValueError(f"predictor front {cfg.front!r} must be one of {PREDICTOR_FRONTS}")
        self.cfg = cfg
        if cfg.front == "conv":
            self.front = nn.Identity()
            self.stem = nn.Conv2d(cfg.in_channels, cfg.stem_channels, JPEG_BLOCK, JPEG_BLOCK)
        else:  # a learned 1x1 convolution mixes each block's coefficients
            self.front = BlockDCT(cfg.in_channels)
            self.stem = nn.Conv2d(cfg.in_channels * JPEG_BLOCK ** 2, cfg.stem_channels, 1)
        widths = (cfg.stem_channels, *cfg.channels)
        self.blocks = nn.Sequential(*[ResBlock(widths[i], widths[i + 1], 1 if i == 0 else 2)
                                      for i in range(len(cfg.channels))])
        self.timestep_head = nn.Linear(widths[-1], cfg.t_max)
        self.qf_head = nn.Linear(widths[-1], 1)
        nn.init.zeros_(self.timestep_head.weight)
        if cfg.t_init is None:
            nn.init.zeros_(self.timestep_head.bias)
        else:
            with torch.no_grad():
                self.timestep_head.bias.copy_(decaying_logits(cfg.t_max, cfg.t_init)
                                              / cfg.logit_scale)
        nn.init.zeros_(self.qf_head.weight)
        nn.init.constant_(self.qf_head.bias, cfg.qf_init if cfg.qf_scale == 1.0 else 0.0)
        self.register_buffer("candidates", torch.arange(cfg.t_max, dtype=torch.float32),
                             persistent=False)

    def features(self, image: torch.Tensor) -> torch.Tensor:
        if image.shape[-1] < JPEG_BLOCK or image.shape[-2] < JPEG_BLOCK:
            raise ValueError(f"the timestep predictor needs images of at least 8x8 pixels, "
                             f"got {tuple(image.shape[-2:])}")
        x = F.silu(self.blocks(self.stem(self.front(image))))
        return x.mean(dim=(2, 3))  # the shared average pooling of both heads

    def qf(self, feat: torch.Tensor) -> torch.Tensor:
        """The QF head on pooled features, in QF units [B]."""
        out = self.qf_head(feat).squeeze(1)
        # The old head (qf_scale 1) holds qf_init in its bias; keep its arithmetic exact.
        return out if self.cfg.qf_scale == 1.0 else self.cfg.qf_init + self.cfg.qf_scale * out

    def logits(self, feat: torch.Tensor) -> torch.Tensor:
        out = self.timestep_head(feat)
        return out if self.cfg.logit_scale == 1.0 else out * self.cfg.logit_scale

    def forward(self, image: torch.Tensor, gumbel: bool = False,
                generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns `(tau [B], qf [B], logits [B, t_max])`.

        `gumbel=True` is Eq. 11 (training): Gumbel noise on the logits before the softmax keeps
        the choice stochastic yet differentiable. `gumbel=False` (inference) drops the noise, so
        `tau` is the deterministic expectation under softmax(logits).
        """
        feat = self.features(image)
        logits = self.logits(feat)
        tau = expected_timestep(logits, self.candidates, gumbel, generator)
        return tau, self.qf(feat), logits

    def param_groups(self, lr: float, timestep_lr_scale: float) -> list[dict]:
        """Optimizer groups: the trunk and QF head at `lr`, the timestep head at
        `lr * timestep_lr_scale` (each group's `lr_scale` is kept for schedules)."""
        head = [p for p in self.timestep_head.parameters() if p.requires_grad]
        ids = {id(p) for p in head}
        trunk = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        groups = [{"params": trunk, "lr": lr, "lr_scale": 1.0, "name": "predictor"},
                  {"params": head, "lr": lr * timestep_lr_scale, "lr_scale": timestep_lr_scale,
                   "name": "timestep_head"}]
        return [g for g in groups if g["params"]]


def expected_timestep(logits: torch.Tensor, candidates: torch.Tensor, gumbel: bool,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """`sum_i i * softmax(l + g)_i`, with `g ~ Gumbel(0, 1)` when `gumbel`."""
    if gumbel:
        u = torch.rand(logits.shape, generator=generator, device=logits.device,
                       dtype=logits.dtype)
        gumbel_noise = -torch.log((-torch.log(u.clamp(1e-20, 1.0))).clamp_min(1e-20))
        logits = logits + gumbel_noise
    return (torch.softmax(logits.float(), dim=-1) * candidates).sum(-1).to(logits.dtype)


def decaying_logits(t_max: int, mean: float) -> torch.Tensor:
    """Logits `-k * i` over candidates `0..t_max-1` whose softmax has expectation `mean`
    (`0 < mean < (t_max - 1) / 2`): a smooth geometric start, so that the timesteps around
    `mean` all get gradients, unlike a one-hot start."""
    # On the CPU whatever the default device: under torch.device("meta") (parameter counts) a
    # bisection on meta tensors could not read its comparisons.
    i = torch.arange(t_max, dtype=torch.float64, device="cpu")
    lo, hi = 0.0, 50.0  # the softmax mean falls from (t_max-1)/2 at k=0 towards 0 as k grows
    for _ in range(100):
        k = (lo + hi) / 2
        if (torch.softmax(-k * i, 0) * i).sum() > mean:
            lo = k
        else:
            hi = k
    return (-(lo + hi) / 2 * i).float()


def set_timestep_prior(predictor: TimestepPredictor, qfs, taus, width: float = 0.25,
                       offset: float = 2.0) -> tuple[float, float]:
    """Make the timestep head read the QF head: softmax(logits) becomes a Gaussian of std
    `width` in `log(offset + i)` centred on `m = alpha + beta * r`, where `r` is the QF head's
    raw output and (alpha, beta) the least-squares fit of `log(offset + tau)` to the QF points
    (`qfs`, `taus`), e.g. the timesteps whose noise level matches the JPEG's latent error
    (training/denoiser.py). The logits stay linear in the features (the head is one Linear):
    `l_i = (phi_i m - phi_i^2 / 2) / width^2` with `phi_i = log(offset + i)`, dropping terms
    that do not depend on `i`. Returns (alpha, beta)."""
    cfg = predictor.cfg
    qfs = torch.as_tensor(qfs, dtype=torch.float64)
    taus = torch.as_tensor(taus, dtype=torch.float64)
    if qfs.numel() < 2 or qfs.shape != taus.shape or not (taus >= 0).all() or width <= 0 \
            or offset <= 0:
        raise ValueError(f"a timestep prior needs >= 2 (QF, tau >= 0) pairs and width, offset "
                         f"> 0; got {qfs.numel()} QFs, {taus.numel()} taus, width={width}, "
                         f"offset={offset}")
    c0, c1 = (0.0, 1.0) if cfg.qf_scale == 1.0 else (cfg.qf_init, cfg.qf_scale)
    raw = (qfs - c0) / c1
    design = torch.stack([torch.ones_like(raw), raw], 1)
    # The expectation of exp(phi) under the Gaussian is exp(m + width^2 / 2): aim below by that.
    target = torch.log(offset + taus) - width ** 2 / 2
    alpha, beta = torch.linalg.lstsq(design, target[:, None]).solution[:, 0].tolist()
    phi = torch.log(offset + torch.arange(cfg.t_max, dtype=torch.float64))
    w_qf = predictor.qf_head.weight.detach().double()[0]
    b_qf = float(predictor.qf_head.bias.detach().double()[0])
    scale = width ** 2 * cfg.logit_scale
    with torch.no_grad():
        predictor.timestep_head.weight.copy_((phi[:, None] * beta * w_qf[None] / scale).float())
        predictor.timestep_head.bias.copy_(
            ((phi * (alpha + beta * b_qf) - phi ** 2 / 2) / scale).float())
    return alpha, beta
