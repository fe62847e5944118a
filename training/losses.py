"""Training losses: stage 1 (Eqs. 3-5) and stage 2 (Eqs. 7-12).

Images are in [-1, 1] everywhere in the model; DISTS wants [0, 1], so the edge-aware loss maps
them first. Every `*_loss` returns `(total, terms)` where `terms` holds detached 0-dim tensors
(call `.item()` when logging; disabled terms are reported as 0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .discriminator import UNetDiscriminator

SOBEL_EPS = 1e-6  # inside the sqrt: keeps the gradient finite on flat regions
# Largest |Sobel| response to inputs in [0, 1] is below 4 * sqrt(2) (|gx|, |gy| <= 4 each):
# dividing by it keeps the magnitude in [0, 1], the range DISTS is defined on.
SOBEL_SCALE = 4 * math.sqrt(2)
_SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))


@dataclass(frozen=True)
class Stage2Weights:
    mse: float = 1.0   # L_MSE(decoded, hq) (Eq. 7)
    ea: float = 1.0    # L_EA, edge-aware DISTS (Eq. 7)
    gan: float = 1e-2  # alpha in Eq. 12: the generator's adversarial loss L_G (Eq. 8)
    qf: float = 1e-3   # beta in Eq. 12: L1 on the predicted quality factor (Eq. 10)
    # Not in the paper: the squared mean error of each channel of each crop. MSE weighs a
    # colour cast by its tiny share of the squared error; this term weighs it by itself.
    color: float = 0.0


def validate_weights(w: Stage2Weights) -> None:
    """ValueError naming any negative or non-finite weight."""
    bad = [f"{k}={v}" for k, v in vars(w).items() if not math.isfinite(v) or v < 0]
    if bad:
        raise ValueError(f"stage-2 loss weights must be finite and >= 0: {', '.join(bad)}")


def sobel(x: torch.Tensor) -> torch.Tensor:
    """Per-channel Sobel gradient magnitude, [B,C,H,W] -> [B,C,H,W] float32.

    3x3 Sobel in x and y, replicate padding (no false edges at the border),
    `sqrt(gx^2 + gy^2 + eps) / (4 sqrt 2)`: for inputs in [0, 1] the output is in [0, 1]
    (a flat region gives ~2e-4, an ideal 0-to-1 step 1/sqrt 2 on both sides of the edge).
    """
    c = x.shape[1]
    kx = torch.tensor(_SOBEL_X, device=x.device)
    k = torch.stack([kx, kx.t()])[:, None].repeat(c, 1, 1, 1)  # [2C,1,3,3]: x, y per channel
    # float32 even under autocast: eps = 1e-6 and small gradients do not survive fp16.
    with torch.autocast(x.device.type, enabled=False):
        g = F.conv2d(F.pad(x.float(), (1, 1, 1, 1), mode="replicate"), k, groups=c)
        gx, gy = g[:, 0::2], g[:, 1::2]
        return (gx * gx + gy * gy + SOBEL_EPS).sqrt() / SOBEL_SCALE


def edge_aware_dists(dists: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """L_EA (Eq. 7) = DISTS(S(x), S(y)) + DISTS(x, y), batch mean, for images in [-1, 1].

    Not clamped: out-of-range decoder outputs still get a gradient back into range.
    """
    x01, y01 = (x + 1) / 2, (y + 1) / 2
    return dists(sobel(x01), sobel(y01)).mean() + dists(x01, y01).mean()


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Eq. 8: -log sigmoid(D(fake)) = softplus(-logit), batch mean."""
    return F.softplus(-fake_logits).mean()


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Eq. 9: -log(1 - sigmoid(D(fake))) - log sigmoid(D(real)), batch means."""
    return F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()


def stage2_generator_loss(out, hq: torch.Tensor, qf_gt: torch.Tensor | None,
                          dists: torch.nn.Module | None, disc: UNetDiscriminator | None,
                          weights: Stage2Weights = Stage2Weights(),
                          generator: torch.Generator | None = None
                          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. 12 for a `sodiff.model.SODiffOutput`: w.mse MSE + w.ea L_EA + w.gan L_G + w.qf L_qf,
    plus w.color times the mean over crops and channels of the squared mean error.

    `hq` in [-1, 1] like `out.decoded`; `qf_gt` [B] (None, or `out.qf` None for a fixed timestep:
    no QF term). `dists=None` turns L_EA off, `disc=None` turns L_G off. The discriminator call
    is *not* under no_grad and its input is not detached: L_G's gradient must reach `out.z_hq`
    (called as is, the discriminator's own parameters get gradients too: training/stage2.py
    freezes them for this call, which stays correct under gradient accumulation).
    """
    validate_weights(weights)
    if out.decoded.shape != hq.shape:
        raise ValueError(f"decoded {tuple(out.decoded.shape)} and hq {tuple(hq.shape)} differ")
    zero = out.decoded.new_zeros(())
    mse = F.mse_loss(out.decoded.float(), hq.float())
    ea = edge_aware_dists(dists, out.decoded.float(), hq.float()) if dists is not None else zero
    gan = zero
    if disc is not None:
        gan = generator_loss(disc.noised_logits(out.z_hq, out.prompt, generator))
    qf = zero
    if out.qf is not None and qf_gt is not None:
        qf = F.l1_loss(out.qf.float(), qf_gt.to(out.qf.device).float().reshape(out.qf.shape))
    color = (out.decoded.float() - hq.float()).mean(dim=(2, 3)).pow(2).mean()
    total = weights.mse * mse + weights.ea * ea + weights.gan * gan + weights.qf * qf \
        + weights.color * color
    terms = {"mse": mse, "ea": ea, "gan": gan, "qf": qf, "color": color, "total": total}
    return total, {k: v.detach() for k, v in terms.items()}


def stage2_discriminator_loss(disc: UNetDiscriminator, z_fake: torch.Tensor,
                              z_real: torch.Tensor, prompt: torch.Tensor,
                              generator: torch.Generator | None = None
                              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. 9 on latents: the fake latent and the prompt are detached, so L_D trains the
    discriminator only and never reaches the generator. `z_real` = E(hq) * s."""
    prompt = prompt.detach()
    fake = disc.noised_logits(z_fake.detach(), prompt, generator)
    real = disc.noised_logits(z_real.detach(), prompt, generator)
    loss = discriminator_loss(real, fake)
    terms = {"d_loss": loss, "d_real": real.mean(), "d_fake": fake.mean()}
    return loss, {k: v.detach() for k, v in terms.items()}


def stage1_loss(prompt: torch.Tensor, rec: torch.Tensor, hq: torch.Tensor,
                text_emb: torch.Tensor | None, lambda_align: float = 0.5
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. 5: L1(rec, hq) + lambda_align * MSE(prompt, text_emb); `text_emb=None` turns the
    alignment off. `hq` must be at SAIPE's size (the trainer resizes it like the input)."""
    if rec.shape != hq.shape:
        raise ValueError(f"rec {tuple(rec.shape)} and hq {tuple(hq.shape)} differ; resize hq to "
                         f"SAIPE's input size")
    if not math.isfinite(lambda_align) or lambda_align < 0:
        raise ValueError(f"lambda_align={lambda_align} must be finite and >= 0")
    rec_l1 = F.l1_loss(rec.float(), hq.float())
    align = rec_l1.new_zeros(())
    if text_emb is not None:
        if text_emb.shape != prompt.shape:
            raise ValueError(f"prompt {tuple(prompt.shape)} and text embedding "
                             f"{tuple(text_emb.shape)} differ")
        align = F.mse_loss(prompt.float(), text_emb.to(prompt.device).float())
    total = rec_l1 + lambda_align * align
    terms = {"rec": rec_l1, "align": align, "total": total}
    return total, {k: v.detach() for k, v in terms.items()}
