"""The latent discriminator of stage 2 (paper Eqs. 8-9): a diffusion UNet's encoder as a trunk.

The paper (after D3SR) uses SDXL; here any diffusers `UNet2DConditionModel` serves, by default a
deep copy of the base UNet (before LoRA is added). The discriminator sees a latent noised to a
random timestep `t` (`noisy_input`, the paper's F(z, t)), runs the UNet's conv_in, time embedding,
down blocks and mid block with the prompt as cross-attention context, and a small conv head turns
the mid-block features into one logit per sample. The up blocks and conv_out are dropped.

Added conditioning that some UNets carry (SDXL's `text_time` embedding, class embeddings) is not
used: the discriminator is conditioned on `t` and the prompt only, and those layers are dropped.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from sodiff.schedule import add_noise, alphas_cumprod as sd21_alphas_cumprod

TRAINABLE = ("head", "all")  # "head": trunk frozen, only the head learns; "all": everything learns
HEAD_WIDTH_DIVISOR = 4  # the head's hidden conv has mid-block channels / 4 (at least 32)


def noisy_input(z: torch.Tensor, alphas_cumprod: torch.Tensor,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """F(z, t): `t` uniform integer in [0, T) per sample, `z_t = sqrt(a_t) z + sqrt(1-a_t) n`.

    Differentiable in `z` (the generator's loss needs that). `generator`, if given, must live on
    `z`'s device; it drives both `t` and the noise.
    """
    b = z.shape[0]
    t = torch.randint(0, alphas_cumprod.shape[0], (b,), generator=generator, device=z.device)
    noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
    return add_noise(z, noise, alphas_cumprod.to(z.device)[t]), t


class UNetDiscriminator(nn.Module):
    """`forward(latent, t, prompt) -> logits [B]` (real > 0, fake < 0 after training).

    unet: a diffusers UNet2DConditionModel; its encoder half is taken over (pass a copy).
    trainable: "all" (default; the whole discriminator learns, as in D3SR/CODiff's latent
        discriminators) or "head" (the pretrained trunk stays frozen and only the head learns:
        less memory for optimiser state, weaker discriminator). Gradients reach the *input* in
        both modes, which is what the generator's loss L_G needs.
    alphas_cumprod: the noise schedule for `noisy_input` (default SD2.1's, 1000 steps).
    """

    def __init__(self, unet: nn.Module, trainable: str = "all",
                 alphas_cumprod: torch.Tensor | None = None):
        super().__init__()
        validate(unet, trainable)
        self.trainable = trainable
        self.in_channels = int(unet.config.in_channels)
        self.cross_attention_dim = int(unet.config.cross_attention_dim)
        self.conv_in = unet.conv_in
        self.time_proj = unet.time_proj
        self.time_embedding = unet.time_embedding
        self.down_blocks = unet.down_blocks
        self.mid_block = unet.mid_block
        self.head = build_head(int(unet.config.block_out_channels[-1]),
                               int(unet.config.norm_num_groups))
        table = alphas_cumprod if alphas_cumprod is not None else sd21_alphas_cumprod()
        self.register_buffer("alphas_cumprod", table.float().clone(), persistent=False)
        self.set_trainable(trainable)

    @classmethod
    def from_generator_unet(cls, unet: nn.Module, trainable: str = "all",
                            alphas_cumprod: torch.Tensor | None = None) -> "UNetDiscriminator":
        """Build on a deep copy of the generator's UNet, any LoRA merged into plain layers (at
        the start of stage 2 the LoRA is still zero, so this is the base UNet)."""
        from sodiff.lora import has_lora, merge_lora
        trunk = copy.deepcopy(unet)
        if has_lora(trunk):
            merge_lora(trunk)
        return cls(trunk, trainable, alphas_cumprod)

    def set_trainable(self, trainable: str) -> None:
        """Switch between training the whole discriminator ("all") and its head only."""
        if trainable not in TRAINABLE:
            raise ValueError(f"trainable={trainable!r} must be one of {TRAINABLE}")
        self.trainable = trainable
        self.requires_grad_(trainable == "all")
        self.head.requires_grad_(True)

    def features(self, latent: torch.Tensor, t: torch.Tensor, prompt: torch.Tensor
                 ) -> torch.Tensor:
        """The mid-block feature map of `latent` at timestep `t` (as in the UNet's forward)."""
        dtype = self.conv_in.weight.dtype
        t = t.to(latent.device).reshape(-1).expand(latent.shape[0])
        emb = self.time_embedding(self.time_proj(t).to(dtype))
        h = self.conv_in(latent.to(dtype))
        ctx = prompt.to(dtype)
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=ctx)
            else:
                h, _ = block(hidden_states=h, temb=emb)
        if getattr(self.mid_block, "has_cross_attention", False):
            return self.mid_block(h, emb, encoder_hidden_states=ctx)
        return self.mid_block(h, emb)

    def forward(self, latent: torch.Tensor, t: torch.Tensor, prompt: torch.Tensor
                ) -> torch.Tensor:
        """One logit per sample, [B] (float32)."""
        self._check(latent, t, prompt)
        return self.head(self.features(latent, t, prompt)).float().mean([1, 2, 3])

    def noised_logits(self, z: torch.Tensor, prompt: torch.Tensor,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """D(F(z, t)) for a fresh random `t` per sample: the term inside Eqs. 8-9."""
        z_t, t = noisy_input(z, self.alphas_cumprod, generator)
        return self(z_t, t, prompt)

    def _check(self, latent: torch.Tensor, t: torch.Tensor, prompt: torch.Tensor) -> None:
        b = latent.shape[0]
        if latent.dim() != 4 or latent.shape[1] != self.in_channels:
            raise ValueError(f"latent shape {tuple(latent.shape)}: expected [B,{self.in_channels}"
                             f",h,w]")
        if t.numel() not in (1, b):
            raise ValueError(f"t has {t.numel()} values for a batch of {b}")
        if prompt.dim() != 3 or prompt.shape[0] != b or prompt.shape[2] != \
                self.cross_attention_dim:
            raise ValueError(f"prompt shape {tuple(prompt.shape)}: expected [{b},tokens,"
                             f"{self.cross_attention_dim}]")


def build_head(channels: int, groups: int) -> nn.Sequential:
    """GroupNorm-SiLU-conv3x3-SiLU-conv1x1 to one channel; the caller averages over space."""
    hidden = max(channels // HEAD_WIDTH_DIVISOR, 32)
    return nn.Sequential(nn.GroupNorm(groups, channels), nn.SiLU(),
                         nn.Conv2d(channels, hidden, 3, padding=1), nn.SiLU(),
                         nn.Conv2d(hidden, 1, 1))


def validate(unet: nn.Module, trainable: str) -> None:
    """ValueError naming what makes `unet`/`trainable` unusable as a discriminator."""
    problems = []
    if trainable not in TRAINABLE:
        problems.append(f"trainable={trainable!r} must be one of {TRAINABLE}")
    missing = [n for n in ("config", "conv_in", "time_proj", "time_embedding", "down_blocks",
                           "mid_block") if getattr(unet, n, None) is None]
    if missing:
        problems.append(f"{type(unet).__name__} lacks {', '.join(missing)} (expected a diffusers "
                        f"UNet2DConditionModel with a mid block)")
    elif getattr(unet, "encoder_hid_proj", None) is not None:
        problems.append("UNets with an encoder_hid_proj (projected text conditioning) are not "
                        "supported: the prompt goes straight into cross-attention")
    elif unet.config.block_out_channels[-1] % unet.config.norm_num_groups:
        problems.append(f"mid-block channels {unet.config.block_out_channels[-1]} are not "
                        f"divisible by norm_num_groups={unet.config.norm_num_groups}")
    if problems:
        raise ValueError("discriminator: " + "; ".join(problems))
