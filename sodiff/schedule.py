"""SD2.1's noise schedule and the one-step math of Eq. 6, at fractional timesteps."""
from __future__ import annotations

import torch

from .config import BETA_END, BETA_START, NUM_TRAIN_TIMESTEPS


def alphas_cumprod(num_steps: int = NUM_TRAIN_TIMESTEPS, beta_start: float = BETA_START,
                   beta_end: float = BETA_END) -> torch.Tensor:
    """`alphas_cumprod` of diffusers' DDPM scheduler with `beta_schedule="scaled_linear"`.

    Computed in float64 and returned as float32, like diffusers (which builds betas in float32:
    the two agree to ~1e-7, well inside every tolerance that uses this table).
    """
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_steps,
                           dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def interp_alpha(table: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """`a(tau)`: `table` linearly interpolated at fractional `tau` (clamped to the table).

    Written with floor/gather so that it exports to ONNX as plain ops, table included.
    """
    tau = tau.to(table.dtype).clamp(0, table.shape[0] - 1)
    lo = tau.floor()
    frac = tau - lo
    lo_i = lo.long()
    hi_i = (lo_i + 1).clamp(max=table.shape[0] - 1)
    return table[lo_i] * (1 - frac) + table[hi_i] * frac


def _bcast(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return a.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def x0_from_eps(z_t: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Eq. 6: `z_0 = (z_t - sqrt(1 - a) * eps) / sqrt(a)`, `alpha` per sample [B]."""
    a = _bcast(alpha, z_t)
    return (z_t - (1 - a).sqrt() * eps) / a.sqrt()


def eps_from_x0(z_t: torch.Tensor, z_0: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Eq. 6 solved for the noise: `eps = (z_t - sqrt(a) * z_0) / sqrt(1 - a)`."""
    a = _bcast(alpha, z_t)
    return (z_t - a.sqrt() * z_0) / (1 - a).sqrt()


def add_noise(z_0: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Forward diffusion `F(z, t) = sqrt(a) z + sqrt(1 - a) noise` (the discriminator's input)."""
    a = _bcast(alpha, z_0)
    return a.sqrt() * z_0 + (1 - a).sqrt() * noise
