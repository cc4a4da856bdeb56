"""A small eps-prediction UNet with self- and cross-attention at every resolution, laid out like Stable Diffusion's so
its layers have SD's names.

Levels at 32x32, 16x16 and 8x8 (``UNetConfig.channels``), each with one ResBlock and one SpatialTransformer on the way
down and on the way up, and a middle block at 8x8, as SD's UNet has at its 64x64, 32x32 and 16x16 latents. Attention
layers are ``<block>.transformer_blocks.0.attn1`` (self) and ``attn2`` (cross, keys and values from the text
encoder), each with ``to_q``, ``to_k``, ``to_v`` and ``to_out.0``, so ComfyUI's LoRA loader addresses them with kohya
keys such as ``lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_q``. Attention at the full resolution
matters: it is where an adapter on the attention projections (the paper's LoRA) reaches the fine detail of an image.

Inputs follow the DDPM convention ComfyUI uses for EPS models: ``x`` is sqrt(abar) x0 + sqrt(1 - abar) eps,
``timesteps`` is the (possibly fractional) training step in [0, 1000), ``context`` is the caption's token sequence.
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
    # Channels at 32x32, 16x16, 8x8. The full resolution is as wide as the next, so that its attention (two heads) has
    # room for an image's fine detail, where most of the memorisation gap lies: an attention-only LoRA closes 0.38 of
    # the way to the memoriser in 600 steps against 0.27 with 16 channels (500 pretraining steps each), and a higher
    # rank did not help the narrow world.
    channels: tuple[int, ...] = (32, 32, 64)
    context_dim: int = 64
    head_channels: int = 16  # channels per attention head (SD 2.x's num_head_channels)
    # Self-attention per level reads its keys and values from a k x k average-pooled copy of its tokens (1: all of
    # them), as token downsampling (ToDo, Smith et al. 2024) does at SD's highest resolutions. Pooled is the world
    # whose memorisation was measured; full attention at 32x32 costs 1.42x per training step (side by side).
    key_pooling: tuple[int, ...] = (4, 1, 1)
    time_dim: int = 128

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "UNetConfig":
        values = dict(values)
        values["channels"], values["key_pooling"] = tuple(values["channels"]), tuple(values["key_pooling"])
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
    """SD's BasicTransformerBlock: self-attention (attn1), cross-attention (attn2), MLP (ff), each pre-norm residual.

    ``key_pooling`` > 1: attn1's keys and values come from the normalised tokens average-pooled k x k on their grid.
    """

    def __init__(self, dim: int, context_dim: int, heads: int, key_pooling: int):
        super().__init__()
        self.key_pooling = key_pooling
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1 = Attention(dim, dim, heads)
        self.attn2 = Attention(dim, context_dim, heads)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def _keys(self, normed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The tokens attn1 reads its keys and values from: ``normed`` (B, H*W, C) itself, or pooled on its grid."""
        if self.key_pooling == 1:
            return normed
        b, _, d = normed.shape
        pooled = F.avg_pool2d(normed.transpose(1, 2).reshape(b, d, *grid), self.key_pooling)
        return pooled.flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        normed = self.norm1(x)
        x = x + self.attn1(normed, self._keys(normed, grid))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    def __init__(self, channels: int, context_dim: int, head_channels: int, key_pooling: int):
        super().__init__()
        self.norm = nn.GroupNorm(8, channels)
        self.proj_in = nn.Linear(channels, channels)
        heads = max(1, channels // head_channels)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(channels, context_dim, heads, key_pooling)])
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))
        for block in self.transformer_blocks:
            tokens = block(tokens, context, (h, w))
        return x + self.proj_out(tokens).transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest 2x, then a conv that already narrows to the next level's width (cheaper at the higher resolution)."""

    def __init__(self, channels_in: int, channels_out: int):
        super().__init__()
        self.conv = nn.Conv2d(channels_in, channels_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class WorldUNet(nn.Module):
    """eps(x_t, t, context) for 32x32 images: ResBlock + SpatialTransformer per level down and up, with skip links.

    The prediction is skip(t) * x_t + network(x_t, t, context), where skip(t) x_t is E[eps | x_t] for Gaussian pixels
    of variance DATA_VARIANCE (a fixed function of the schedule, no weights). The network learns only what that
    misses; without it, a few hundred CPU training steps do not even learn that eps is nearly x_t at high noise.
    """

    def __init__(self, config: UNetConfig, schedule: Schedule):
        super().__init__()
        self.config = config
        self.register_buffer("alphas_cumprod", schedule.alphas_cumprod().float(), persistent=False)
        channels, td, cd, hc = config.channels, config.time_dim, config.context_dim, config.head_channels
        pooling = config.key_pooling
        self.time_embed = nn.Sequential(nn.Linear(td, td), nn.SiLU(), nn.Linear(td, td))
        self.context_embed = nn.Linear(cd, td)  # pooled caption, added to the time embedding (global conditioning)
        # SD's numbering: input_blocks.0 is the first conv, then per level [ResBlock, SpatialTransformer] and, between
        # levels, [Downsample]; output_blocks per level from the lowest [ResBlock, SpatialTransformer(, Upsample)].
        first_conv = nn.Conv2d(config.image_channels, channels[0], 3, padding=1)
        self.input_blocks = nn.ModuleList([nn.ModuleList([first_conv])])
        previous = channels[0]
        for level, width in enumerate(channels):
            if level:
                self.input_blocks.append(nn.ModuleList([Downsample(previous)]))
            self.input_blocks.append(nn.ModuleList([ResBlock(previous, width, td),
                                                    SpatialTransformer(width, cd, hc, pooling[level])]))
            previous = width
        self.middle_block = nn.ModuleList([ResBlock(previous, previous, td),
                                           SpatialTransformer(previous, cd, hc, pooling[-1]),
                                           ResBlock(previous, previous, td)])
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(channels))):
            width = channels[level]
            blocks = [ResBlock(previous + width, width, td), SpatialTransformer(width, cd, hc, pooling[level])]
            if level:
                blocks.append(Upsample(width, channels[level - 1]))
                width = channels[level - 1]
            self.output_blocks.append(nn.ModuleList(blocks))
            previous = width
        self.out = nn.Sequential(nn.GroupNorm(8, previous), nn.SiLU())
        # The last conv also sees the input itself, as SD's last block sees its first conv: near-pure noise, where eps
        # is almost x, is then one linear map away instead of a path through every block.
        self.out_conv = nn.Conv2d(previous + config.image_channels, config.image_channels, 3, padding=1)

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
        h, skips = x, []
        for blocks in self.input_blocks:
            h = self._run(blocks, h, emb, context)
            if isinstance(blocks[0], ResBlock):
                skips.append(h)
        h = self._run(self.middle_block, h, emb, context)
        for blocks in self.output_blocks:
            h = self._run(blocks, torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.skip(timesteps) * x + self.out_conv(torch.cat([self.out(h), x], dim=1))
