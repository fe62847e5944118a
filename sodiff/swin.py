"""Swin Transformer parts of SAIPE's E_down and D_up (SwinIR style, Liang et al. 2021).

Every layer is built for one fixed token grid (SAIPE resizes its input to a fixed square), so
window masks and relative-position indices are buffers computed once at init: in an ONNX export
they are constants and fold away. Reshapes keep the batch dimension as -1 so exports stay
batch-dynamic.
"""
from __future__ import annotations

import torch
from torch import nn


# Sizes are passed as Python ints rather than read from `x.shape`: a traced `x.shape` becomes
# Shape/Gather ops in an ONNX graph, whereas ints are constants.

def window_partition(x: torch.Tensor, ws: int, h: int, w: int, c: int) -> torch.Tensor:
    """[B, h, w, c] -> [B * nW, ws * ws, c], windows in row-major order."""
    x = x.reshape(-1, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, c)


def window_reverse(windows: torch.Tensor, ws: int, h: int, w: int, c: int) -> torch.Tensor:
    """Inverse of `window_partition`: [B * nW, ws * ws, c] -> [B, h, w, c]."""
    x = windows.reshape(-1, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def relative_position_index(ws: int) -> torch.Tensor:
    """[ws*ws, ws*ws] indices into a ((2ws-1)^2)-row bias table, one per relative offset."""
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij"))
    coords = coords.flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
    return rel[..., 0] * (2 * ws - 1) + rel[..., 1]


def shifted_window_mask(h: int, w: int, ws: int, shift: int) -> torch.Tensor:
    """[nW, ws*ws, ws*ws] additive mask for the cyclically shifted grid.

    After the roll, a window can hold tokens from opposite image borders; labelling the three
    bands per axis and masking pairs with different labels stops them attending to each other.
    """
    labels = torch.zeros(1, h, w, 1)
    bands = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
    for i, hs in enumerate(bands):
        for j, wsl in enumerate(bands):
            labels[:, hs, wsl, :] = i * 3 + j
    windows = window_partition(labels, ws, h, w, 1).squeeze(-1)
    diff = windows[:, None, :] - windows[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with a learned relative position bias."""

    def __init__(self, dim: int, ws: int, heads: int):
        super().__init__()
        self.dim, self.heads, self.ws = dim, heads, ws
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, heads))
        nn.init.trunc_normal_(self.bias_table, std=0.02)
        self.register_buffer("bias_index", relative_position_index(ws).flatten(),
                             persistent=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        n, c = self.ws * self.ws, self.dim
        qkv = self.qkv(x).reshape(-1, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.bias_table[self.bias_index].reshape(n, n, self.heads).permute(2, 0, 1)
        attn = attn + bias.unsqueeze(0)
        if mask is not None:
            attn = attn.reshape(-1, mask.shape[0], self.heads, n, n) + mask[None, :, None]
            attn = attn.reshape(-1, self.heads, n, n)
        out = torch.softmax(attn, dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(-1, n, c))


class SwinLayer(nn.Module):
    """Pre-norm (shifted) window attention + MLP on a fixed [h, w] token grid."""

    def __init__(self, dim: int, grid: tuple[int, int], heads: int, ws: int, shift: int,
                 mlp_ratio: float):
        super().__init__()
        self.dim, (self.h, self.w) = dim, grid
        if min(grid) <= ws:  # one window covers the grid: shifting would change nothing
            ws, shift = min(grid), 0
        self.ws, self.shift = ws, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, ws, heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        mask = shifted_window_mask(self.h, self.w, ws, shift) if shift else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, h*w, C] tokens in row-major grid order."""
        c = self.dim
        y = self.norm1(x).reshape(-1, self.h, self.w, c)
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = self.attn(window_partition(y, self.ws, self.h, self.w, c), self.attn_mask)
        y = window_reverse(y, self.ws, self.h, self.w, c)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + y.reshape(-1, self.h * self.w, c)
        return x + self.mlp(self.norm2(x))


class RSTB(nn.Module):
    """Residual Swin Transformer block: Swin layers (odd ones shifted), a 3x3 conv, a skip."""

    def __init__(self, dim: int, grid: tuple[int, int], depth: int, heads: int, ws: int,
                 mlp_ratio: float):
        super().__init__()
        self.dim, (self.h, self.w) = dim, grid
        self.layers = nn.Sequential(*[
            SwinLayer(dim, grid, heads, ws, 0 if i % 2 == 0 else ws // 2, mlp_ratio)
            for i in range(depth)])
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, h*w, C] tokens."""
        y = tokens_to_image(self.layers(x), self.dim, self.h, self.w)
        return x + image_to_tokens(self.conv(y))


def tokens_to_image(x: torch.Tensor, c: int, h: int, w: int) -> torch.Tensor:
    """[B, h*w, c] -> [B, c, h, w]."""
    return x.transpose(1, 2).reshape(-1, c, h, w)


def image_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, h*w, C]."""
    return x.flatten(2).transpose(1, 2)
