"""The QF-aware timestep predictor (paper Sec. 3.3)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import PredictorConfig


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


class TimestepPredictor(nn.Module):
    """Predicts the denoising start timestep `tau` and the JPEG quality factor from an LQ image.

    The stem is an 8x8 stride-8 convolution so each token is one JPEG block: the input must be
    the image at native resolution, with the block grid at the origin. Timestep logits start at
    zero, so an untrained predictor gives the middle of the range, `(t_max - 1) / 2`, unless
    `cfg.t_init` asks for another start (see `decaying_logits`).
    """

    def __init__(self, cfg: PredictorConfig):
        super().__init__()
        self.cfg = cfg
        self.stem = nn.Conv2d(cfg.in_channels, cfg.stem_channels, 8, 8)
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
                self.timestep_head.bias.copy_(decaying_logits(cfg.t_max, cfg.t_init))
        nn.init.zeros_(self.qf_head.weight)
        nn.init.constant_(self.qf_head.bias, cfg.qf_init)
        self.register_buffer("candidates", torch.arange(cfg.t_max, dtype=torch.float32),
                             persistent=False)

    def features(self, image: torch.Tensor) -> torch.Tensor:
        if image.shape[-1] < 8 or image.shape[-2] < 8:
            raise ValueError(f"the timestep predictor needs images of at least 8x8 pixels, "
                             f"got {tuple(image.shape[-2:])}")
        x = F.silu(self.blocks(self.stem(image)))
        return x.mean(dim=(2, 3))  # the shared average pooling of both heads

    def forward(self, image: torch.Tensor, gumbel: bool = False,
                generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns `(tau [B], qf [B], logits [B, t_max])`.

        `gumbel=True` is Eq. 11 (training): Gumbel noise on the logits before the softmax keeps
        the choice stochastic yet differentiable. `gumbel=False` (inference) drops the noise, so
        `tau` is the deterministic expectation under softmax(logits).
        """
        feat = self.features(image)
        logits = self.timestep_head(feat)
        tau = expected_timestep(logits, self.candidates, gumbel, generator)
        return tau, self.qf_head(feat).squeeze(1), logits


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
    i = torch.arange(t_max, dtype=torch.float64)
    lo, hi = 0.0, 50.0  # the softmax mean falls from (t_max-1)/2 at k=0 towards 0 as k grows
    for _ in range(100):
        k = (lo + hi) / 2
        if (torch.softmax(-k * i, 0) * i).sum() > mean:
            lo = k
        else:
            hi = k
    return (-(lo + hi) / 2 * i).float()
