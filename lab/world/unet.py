"""A small eps-prediction UNet with cross-attention, laid out like Stable Diffusion's so its layers have SD's names.

Attention layers are ``<block>.transformer_blocks.0.attn1`` (self) and ``attn2`` (cross, keys and values from the
text encoder), each with ``to_q``, ``to_k``, ``to_v`` and ``to_out.0``. ComfyUI's LoRA loader therefore addresses them
with kohya keys such as ``lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_q``.

Inputs follow the DDPM convention ComfyUI uses for EPS models: ``x`` is sqrt(abar) x0 + sqrt(1 - abar) eps,
``timesteps`` is the (possibly fractional) training step in [0, 1000), ``context`` is the caption's token sequence.
To stay cheap on a CPU the 32x32 image is folded into 16x16 with 4x the channels (pixel unshuffle) and the network
works at 16x16 and 8x8, unfolding only at the end.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
import torch.nn.functional as F

from .schedule import Schedule

# Variance assumed for the pixels (in [-1, 1]) by the skip term below; only its rough size matters.
DATA_VARIANCE = 0.25


@dataclass(frozen=True)
class UNetConfig:
    image_channels: int = 3
    channels: tuple[int, ...] = (24, 48)  # at 16x16 and 8x8; sized so a default proving-ground run fits a 2-core CPU
    context_dim: int = 64
    heads: int = 4
    time_dim: int = 128

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "UNetConfig":
        values = dict(values)
        values["channels"] = tuple(values["channels"])
        return cls(**values)


def timestep_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    angles = timesteps.float()[:, None] * frequencies[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class ResBlock(nn.Module):
    def __init__(self, channels_in: int, channels_out: int, time_dim: int):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(8, channels_in), nn.SiLU(), nn.Conv2d(channels_in, channels_out, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, channels_out))
        self.out_layers = nn.Sequential(nn.GroupNorm(8, channels_out), nn.SiLU(), nn.Conv2d(channels_out, channels_out, 3, padding=1))
        self.skip_connection = nn.Identity() if channels_in == channels_out else nn.Conv2d(channels_in, channels_out, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Attention(nn.Module):
    """SD's CrossAttention: ``to_q`` on the image tokens, ``to_k``/``to_v`` on ``context`` (the image tokens for attn1)."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        b, n, d = q.shape
        q, k, v = (t.reshape(b, -1, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, d))


class TransformerBlock(nn.Module):
    """SD's block: self-attention (attn1, left out at 16x16 where it costs most), cross-attention (attn2), MLP."""

    def __init__(self, dim: int, context_dim: int, heads: int, self_attention: bool):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1 = Attention(dim, dim, heads) if self_attention else None
        self.attn2 = Attention(dim, context_dim, heads)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if self.attn1 is not None:
            x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    def __init__(self, channels: int, context_dim: int, heads: int, self_attention: bool = True):
        super().__init__()
        self.norm = nn.GroupNorm(8, channels)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(channels, context_dim, heads, self_attention)])
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        return x + self.proj_out(tokens).transpose(1, 2).reshape(b, c, h, w)


class WorldUNet(nn.Module):
    """eps(x_t, t, context) for 32x32 images: ResBlock + SpatialTransformer at 16x16 and 8x8, with skip links.

    The prediction is skip(t) * x_t + network(x_t, t, context), where skip(t) x_t is E[eps | x_t] for Gaussian pixels
    of variance DATA_VARIANCE (a fixed function of the schedule, no weights). The network learns only what that
    misses; without it, a few hundred CPU training steps do not even learn that eps is nearly x_t at high noise.
    """

    def __init__(self, config: UNetConfig, schedule: Schedule):
        super().__init__()
        self.config = config
        self.register_buffer("alphas_cumprod", schedule.alphas_cumprod().float(), persistent=False)
        c16, c8 = config.channels
        td, cd, heads = config.time_dim, config.context_dim, config.heads
        self.time_embed = nn.Sequential(nn.Linear(td, td), nn.SiLU(), nn.Linear(td, td))
        self.context_embed = nn.Linear(cd, td)  # pooled caption, added to the time embedding (global conditioning)
        self.input_blocks = nn.ModuleList([
            nn.ModuleList([nn.Conv2d(4 * config.image_channels, c16, 3, padding=1)]),
            nn.ModuleList([ResBlock(c16, c16, td), SpatialTransformer(c16, cd, heads, self_attention=False)]),
            nn.ModuleList([nn.Conv2d(c16, c8, 3, stride=2, padding=1)]),
            nn.ModuleList([ResBlock(c8, c8, td), SpatialTransformer(c8, cd, heads)]),
        ])
        self.middle_block = nn.ModuleList([ResBlock(c8, c8, td), SpatialTransformer(c8, cd, heads)])
        self.output_blocks = nn.ModuleList([
            nn.ModuleList([ResBlock(2 * c8, c8, td), SpatialTransformer(c8, cd, heads),
                           nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c8, c16, 3, padding=1))]),
            nn.ModuleList([ResBlock(2 * c16, c16, td), SpatialTransformer(c16, cd, heads, self_attention=False)]),
        ])
        self.out_norm = nn.Sequential(nn.GroupNorm(8, c16), nn.SiLU())
        # The output also sees the (folded) input directly, as SD's last block sees its first conv: near-pure noise,
        # where eps is almost x itself, is then one linear map away instead of a path through every block.
        self.out = nn.Sequential(nn.Conv2d(c16 + 4 * config.image_channels, 4 * config.image_channels, 3, padding=1),
                                 nn.PixelShuffle(2))

    @staticmethod
    def _run(layers: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for layer in layers:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, SpatialTransformer):
                h = layer(h, context)
            else:
                h = layer(h)
        return h

    def skip(self, timesteps: torch.Tensor) -> torch.Tensor:
        """E[eps | x_t] / x_t for Gaussian data, at (possibly fractional) steps, interpolating the schedule."""
        position = timesteps.float().clamp(0, len(self.alphas_cumprod) - 1)
        low = position.floor().long()
        high = (low + 1).clamp(max=len(self.alphas_cumprod) - 1)
        abar = torch.lerp(self.alphas_cumprod[low], self.alphas_cumprod[high], position - low)
        return ((1 - abar).sqrt() / (1 - (1 - DATA_VARIANCE) * abar)).view(-1, 1, 1, 1)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        timesteps = timesteps.reshape(-1).expand(x.shape[0]) if timesteps.numel() == 1 else timesteps.reshape(-1)
        emb = self.time_embed(timestep_embedding(timesteps, self.config.time_dim)) + self.context_embed(context.mean(dim=1))
        folded = F.pixel_unshuffle(x, 2)
        h, skips = folded, []
        for blocks in self.input_blocks:
            h = self._run(blocks, h, emb, context)
            if isinstance(blocks[0], ResBlock):
                skips.append(h)
        h = self._run(self.middle_block, h, emb, context)
        for blocks in self.output_blocks:
            h = self._run(blocks, torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.skip(timesteps) * x + self.out(torch.cat([self.out_norm(h), folded], dim=1))
