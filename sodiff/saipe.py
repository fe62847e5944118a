"""SAIPE, the semantic-aligned image prompt extractor (paper Sec. 3.1).

`E_down` (SwinIR-style encoder) turns the LQ image into features `F_mid`; `D_up` decodes them to a
reconstruction `rec` (stage-1 loss L1(rec, hq)); `T_align` (input MLP, Performer encoder,
multi-scale convolutions, attention pooling with learnable queries) maps them to a prompt that
stands in for the text embedding (stage-1 loss MSE(prompt, e_text)).

Export notes: everything is built for the fixed input side `cfg.image_size`, so grids, masks and
indices are static; the FAVOR+ random projection is a persistent buffer (no random op in the
graph); reshapes keep the batch as -1.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from .config import POOL_SCALE_MAX, SAIPEConfig
from .swin import RSTB, image_to_tokens, tokens_to_image

FAVOR_SEED = 20250  # base seed of the FAVOR+ projections; layer i uses FAVOR_SEED + i
FAVOR_EPS = 1e-4    # keeps random features strictly positive (Performer's kernel_epsilon)
PERFORMER_FF_RATIO = 4  # the Transformer default; SAIPEConfig.mlp_ratio is Swin's
UP_CHANNELS = 64    # SwinIR's num_feat: upsampling runs at this width (or embed_dim if smaller)


def orthogonal_features(m: int, d: int, generator: torch.Generator) -> torch.Tensor:
    """[m, d] Gaussian random features, orthogonal within each block of d rows.

    Orthogonal rows lower the variance of the softmax-kernel estimate; scaling each row by the
    norm of a Gaussian vector keeps the rows' marginal distribution that of i.i.d. N(0, I).
    """
    blocks = []
    for _ in range(math.ceil(m / d)):
        q, r = torch.linalg.qr(torch.randn(d, d, generator=generator, device="cpu"))
        # LAPACK's QR sign convention makes Q non-uniform, which measurably biases the kernel
        # estimate at large m; fixing signs by R's diagonal makes Q Haar-distributed.
        blocks.append((q * torch.sign(torch.diagonal(r))).T)
    w = torch.cat(blocks)[:m]
    norms = torch.randn(m, d, generator=generator, device="cpu").norm(dim=1)
    return w * norms[:, None]


def softmax_kernel(x: torch.Tensor, projection: torch.Tensor, is_query: bool) -> torch.Tensor:
    """Positive random features phi(x) with E[phi(q) . phi(k)] = exp(q . k / sqrt(d)).

    The max subtracted before exp only rescales: per query row it cancels in that row's
    normaliser, and for keys one constant per (sample, head) cancels everywhere. It includes the
    -|x|^2/2 term so the largest feature is exactly 1 and FAVOR_EPS stays small beside it; it is
    taken per sample rather than over the batch so that samples stay independent.
    """
    m, d = projection.shape  # a buffer's shape, constant in an export (x's is traced)
    x = x * d ** -0.25
    logits = x @ projection.transpose(0, 1) - (x * x).sum(-1, keepdim=True) / 2
    stab = logits.amax(dim=-1 if is_query else (-2, -1), keepdim=True).detach()
    return (torch.exp(logits - stab) + FAVOR_EPS) * m ** -0.5


def favor_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    projection: torch.Tensor) -> torch.Tensor:
    """FAVOR+ linear attention approximating softmax(q k^T / sqrt(d)) v in O(L) memory.

    q, k: [..., L, d]; v: [..., L, dv]; projection: [m, d].
    """
    qp = softmax_kernel(q, projection, is_query=True)
    kp = softmax_kernel(k, projection, is_query=False)
    kv = kp.transpose(-2, -1) @ v                     # [..., m, dv]
    denom = qp @ kp.sum(dim=-2).unsqueeze(-1)         # [..., L, 1]
    return (qp @ kv) / denom


class PerformerLayer(nn.Module):
    """Pre-norm Transformer layer with FAVOR+ self-attention."""

    def __init__(self, dim: int, heads: int, features: int, tokens: int, seed: int):
        super().__init__()
        self.dim, self.heads, self.tokens = dim, heads, tokens
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = dim * PERFORMER_FF_RATIO
        self.ff = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        # Drawn once from a fixed seed and saved in state_dict, so a checkpoint reproduces the
        # exact kernel; created on the ambient default device (meta under `torch.device`).
        w = orthogonal_features(features, dim // heads, torch.Generator().manual_seed(seed))
        self.register_buffer("projection", w.to(torch.empty(0).device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = self.tokens, self.dim
        qkv = self.qkv(self.norm1(x)).reshape(-1, n, 3, self.heads, c // self.heads)
        qkv = qkv.permute(2, 0, 3, 1, 4)
        out = favor_attention(qkv[0], qkv[1], qkv[2], self.projection)
        x = x + self.proj(out.transpose(1, 2).reshape(-1, n, c))
        return x + self.ff(self.norm2(x))


class AttentionPool(nn.Module):
    """Multi-head attention from `num_queries` learnable queries to a token sequence.

    `cosine_scale` None: scaled dot-product logits (checkpoints before SAIPEConfig.pool_scale).
    A number: cosine logits (unit q and k per head) times a learnable per-head scale that starts
    there, so the attention can be selective from the first step whatever the weights' norms.
    """

    def __init__(self, dim: int, heads: int, num_queries: int, tokens: int,
                 cosine_scale: float | None = None):
        super().__init__()
        self.heads, self.tokens = heads, tokens
        # Unit scale: at 0.02 the q projection's bias outweighed the queries, so every query
        # attended alike and the prompt was one token repeated (relative spread 2e-4).
        self.queries = nn.Parameter(torch.randn(num_queries, dim))
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.log_scale = None
        if cosine_scale is not None:
            self.make_cosine(cosine_scale)

    def make_cosine(self, scale: float) -> None:
        """Switch to cosine logits with a learnable per-head scale starting at `scale`."""
        self.log_scale = nn.Parameter(torch.full((self.heads, 1, 1), math.log(scale)))

    def logits(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        if self.log_scale is None:
            return (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        scale = self.log_scale.clamp(max=math.log(POOL_SCALE_MAX)).exp()
        q, k = nn.functional.normalize(q, dim=-1), nn.functional.normalize(k, dim=-1)
        return (scale * q) @ k.transpose(-2, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nq, c = self.queries.shape
        dh = c // self.heads
        # The queries do not depend on the sample: [1, heads, nq, dh] broadcasts over the batch
        # in the matmul, so no batch-sized expand is needed.
        q = self.q(self.queries).reshape(1, nq, self.heads, dh).transpose(1, 2)
        kv = self.kv(x).reshape(-1, self.tokens, 2, self.heads, dh).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(self.logits(q, kv[0]), dim=-1)
        out = (attn @ kv[1]).transpose(1, 2).reshape(-1, nq, c)
        return self.proj(out)


class TAlign(nn.Module):
    """Image guidance embedder: F_mid [B, C, g, g] -> prompt [B, num_queries, prompt_dim]."""

    def __init__(self, cfg: SAIPEConfig):
        super().__init__()
        p, dim = cfg.align_patch, cfg.align_dim
        self.dim = dim
        self.grid = cfg.image_size // cfg.downsample // p
        tokens = self.grid * self.grid
        self.unfold = nn.PixelUnshuffle(p)
        self.input_mlp = nn.Sequential(nn.Linear(cfg.embed_dim * p * p, dim), nn.GELU(),
                                       nn.Linear(dim, dim))
        self.encoder = nn.Sequential(*[
            PerformerLayer(dim, cfg.performer_heads, cfg.performer_features, tokens,
                           FAVOR_SEED + i) for i in range(cfg.performer_layers)])
        self.encoder_norm = nn.LayerNorm(dim)  # pre-norm layers leave the stream unnormalised
        self.multiscale = nn.ModuleList([nn.Conv2d(dim, dim, k, 1, k // 2, groups=dim)
                                         for k in cfg.conv_kernels])
        self.pointwise = nn.Conv2d(dim, dim, 1)
        self.pool = AttentionPool(dim, cfg.pool_heads, cfg.num_queries, tokens,
                                  cfg.pool_scale)
        self.out_norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, cfg.prompt_dim)

    def forward(self, f_mid: torch.Tensor) -> torch.Tensor:
        x = self.input_mlp(image_to_tokens(self.unfold(f_mid)))
        x = tokens_to_image(self.encoder_norm(self.encoder(x)), self.dim, self.grid, self.grid)
        # Depthwise convs at several kernel sizes mix local context of several extents into
        # each key/value token, which the (position-free) Performer does not provide.
        x = self.pointwise(sum(conv(x) for conv in self.multiscale))
        return self.out(self.out_norm(self.pool(image_to_tokens(x))))


class EDown(nn.Module):
    """Shared encoder: image [B, in, S, S] -> F_mid [B, embed_dim, S/d, S/d]."""

    def __init__(self, cfg: SAIPEConfig):
        super().__init__()
        c, d = cfg.embed_dim, cfg.downsample
        self.dim = c
        self.grid = cfg.image_size // d
        self.stem = nn.Sequential(nn.PixelUnshuffle(d), nn.Conv2d(cfg.in_channels * d * d, c,
                                                                  3, 1, 1))
        self.blocks = nn.Sequential(*[
            RSTB(c, (self.grid, self.grid), depth, cfg.num_heads, cfg.window_size,
                 cfg.mlp_ratio) for depth in cfg.rstb_depths])
        self.norm = nn.LayerNorm(c)
        self.conv_after = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        shallow = self.stem(image)
        deep = self.norm(self.blocks(image_to_tokens(shallow)))
        return shallow + self.conv_after(tokens_to_image(deep, self.dim, self.grid, self.grid))


class DUp(nn.Module):
    """Reconstruction decoder: F_mid -> residual image [B, in, S, S] (added to the input)."""

    def __init__(self, cfg: SAIPEConfig):
        super().__init__()
        c = cfg.embed_dim
        up = min(UP_CHANNELS, c)
        self.dim = c
        self.grid = cfg.image_size // cfg.downsample
        self.block = RSTB(c, (self.grid, self.grid), cfg.up_depth, cfg.num_heads,
                          cfg.window_size, cfg.mlp_ratio)
        self.norm = nn.LayerNorm(c)
        self.conv_after = nn.Conv2d(c, c, 3, 1, 1)
        stages = [nn.Conv2d(c, up, 3, 1, 1), nn.LeakyReLU(0.2)]
        for _ in range(int(math.log2(cfg.downsample))):
            stages += [nn.Conv2d(up, 4 * up, 3, 1, 1), nn.PixelShuffle(2)]
        self.upsample = nn.Sequential(*stages)
        self.conv_last = nn.Conv2d(up, cfg.in_channels, 3, 1, 1)
        # A small (not zero) last layer: rec starts close to the input image, yet gradients
        # still reach every earlier D_up weight from the first step.
        with torch.no_grad():
            self.conv_last.weight.mul_(0.1)
            self.conv_last.bias.zero_()

    def forward(self, f_mid: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.block(image_to_tokens(f_mid)))
        x = f_mid + self.conv_after(tokens_to_image(x, self.dim, self.grid, self.grid))
        return self.conv_last(self.upsample(x))


class SAIPE(nn.Module):
    """Semantic-aligned image prompt extractor: image -> (prompt, rec).

    `image` is [B, in_channels, S, S] in [-1, 1] with S = cfg.image_size (resize first);
    `prompt` is [B, num_queries, prompt_dim] (stands in for the text embedding) and `rec` the
    de-artifacted image, predicted as a residual on the input.
    """

    def __init__(self, cfg: SAIPEConfig):
        super().__init__()
        self.cfg = cfg
        self.e_down = EDown(cfg)
        self.d_up = DUp(cfg)
        self.t_align = TAlign(cfg)

    def _check(self, image: torch.Tensor) -> None:
        if torch.jit.is_tracing():  # export: the graph's fixed input shape does this check
            return
        c, s = self.cfg.in_channels, self.cfg.image_size
        if image.dim() != 4 or tuple(image.shape[1:]) != (c, s, s):
            raise ValueError(f"SAIPE expects images of shape [B, {c}, {s}, {s}] (resize to "
                             f"{s}x{s} first), got {tuple(image.shape)}")

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(image)
        f_mid = self.e_down(image)
        return self.t_align(f_mid), image + self.d_up(f_mid)

    def use_cosine_pool(self, scale: float) -> None:
        """Give T_align's pooling cosine logits (SAIPEConfig.pool_scale), keeping its weights."""
        if self.cfg.pool_scale is not None:
            raise ValueError(f"SAIPE's pooling is already cosine (pool_scale="
                             f"{self.cfg.pool_scale})")
        self.t_align.pool.make_cosine(scale)
        self.cfg = dataclasses.replace(self.cfg, pool_scale=float(scale))

    def prompt(self, image: torch.Tensor) -> torch.Tensor:
        """The prompt alone (stage 2 and inference): skips D_up."""
        self._check(image)
        return self.t_align(self.e_down(image))
