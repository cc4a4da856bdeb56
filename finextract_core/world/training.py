"""Training the world: pretraining, DreamBooth-style full fine-tuning and LoRA fine-tuning, all eps-prediction.

Every function is deterministic given its seed (single-threaded CPU).
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .data import procedural_batch
from .text import TextEncoder, tokenize
from .schedule import Schedule
from .unet import WorldUNet

LOG = logging.getLogger("finextract.world")


def diffusion_loss(unet: WorldUNet, images: torch.Tensor, context: torch.Tensor, alphas_cumprod: torch.Tensor,
                   generator: torch.Generator) -> torch.Tensor:
    """Mean squared error of the eps prediction at uniformly drawn steps (the DDPM objective)."""
    steps = torch.randint(0, len(alphas_cumprod), (images.shape[0],), generator=generator)
    noise = torch.randn(images.shape, generator=generator)
    abar = alphas_cumprod[steps].float().view(-1, 1, 1, 1)
    noisy = abar.sqrt() * images + (1 - abar).sqrt() * noise
    return torch.mean((unet(noisy, steps.float(), context) - noise) ** 2)


def encode_captions(text_encoder: TextEncoder, captions: list[str]) -> torch.Tensor:
    return text_encoder(torch.stack([tokenize(c) for c in captions]))


@dataclass(frozen=True)
class PretrainSettings:
    steps: int = 700  # about 15 minutes on a shared 2-core CPU
    batch: int = 64
    lr: float = 1e-3
    ema: float = 0.99  # the saved weights are an exponential moving average: cleaner samples from short training


def pretrain(unet: WorldUNet, text_encoder: TextEncoder, settings: PretrainSettings, schedule: Schedule,
             seed: int) -> dict:
    """Trains both modules jointly on procedural images, then loads their EMA weights; returns loss statistics."""
    rng, generator = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    # Warm up, then cosine decay to a tenth: stable from the first step, settled at the end.
    warmup = min(200, settings.steps // 10 + 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.45 * (1 + np.cos(np.pi * min(s, settings.steps) / settings.steps))))
    averaged = [p.detach().clone() for p in params]
    alphas_cumprod, losses, started = schedule.alphas_cumprod(), [], time.perf_counter()
    unet.train(), text_encoder.train()
    for step in range(settings.steps):
        images, captions = procedural_batch(rng, settings.batch)
        loss = diffusion_loss(unet, torch.from_numpy(images), encode_captions(text_encoder, captions), alphas_cumprod,
                              generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            for average, p in zip(averaged, params):
                average.lerp_(p, 1 - settings.ema)
        losses.append(loss.item())
        if (step + 1) % 250 == 0:
            LOG.info(f"pretraining step {step + 1}/{settings.steps}: loss {np.mean(losses[-250:]):.4f} "
                f"({time.perf_counter() - started:.0f} s)")
    with torch.no_grad():
        for average, p in zip(averaged, params):
            p.copy_(average)
    unet.eval(), text_encoder.eval()
    return {"final_loss": float(np.mean(losses[-250:])), "seconds": round(time.perf_counter() - started, 1)}


# ---------------------------------------------------------------------------------------------------- fine-tuning
@dataclass(frozen=True)
class FineTuneSettings:
    steps: int
    lr: float
    rank: int = 0  # LoRA rank; 0 = DreamBooth-style full fine-tune of the UNet

    @property
    def style(self) -> str:
        return "lora" if self.rank else "dreambooth"


# Fine-tuning strength (the paper's lambda: how far the model has moved towards the fine-tuning images). Steps and
# rates are per the whole N0-image batch; "partial" is the default, where memorisation is under way but incomplete.
STRENGTHS = {
    "dreambooth": {"light": FineTuneSettings(300, 5e-5), "partial": FineTuneSettings(400, 2e-4),
                   "saturated": FineTuneSettings(1000, 5e-4)},
    "lora": {"light": FineTuneSettings(300, 5e-4, rank=8), "partial": FineTuneSettings(400, 2e-3, rank=8),
             "saturated": FineTuneSettings(1000, 5e-3, rank=8)},
}

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class LoRALinear(nn.Module):
    """A frozen linear layer plus (alpha / rank) * up(down(x)), up initialised to zero (starts as the base layer)."""

    def __init__(self, base: nn.Linear, rank: int, generator: torch.Generator):
        super().__init__()
        self.base = base
        self.rank = rank
        self.alpha = float(rank)
        self.down = nn.Parameter(torch.randn(rank, base.in_features, generator=generator) / base.in_features ** 0.5)
        self.up = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.down.T @ self.up.T) * (self.alpha / self.rank)


def attention_projection_names(unet: WorldUNet) -> list[str]:
    """Module paths of every attention projection (attn1 and attn2: to_q, to_k, to_v, to_out.0)."""
    return [name for name, module in unet.named_modules()
            if isinstance(module, nn.Linear) and any(name.endswith(f".{t}") for t in LORA_TARGETS)
            and (".attn1." in name or ".attn2." in name)]


def kohya_key(module_path: str) -> str:
    """ComfyUI's name for a UNet LoRA: ``lora_unet_`` + the module path with dots as underscores."""
    return "lora_unet_" + module_path.replace(".", "_")


def fine_tune(unet: WorldUNet, text_encoder: TextEncoder, images: torch.Tensor, caption: str,
              settings: FineTuneSettings, schedule: Schedule, seed: int) -> dict[str, torch.Tensor]:
    """Fine-tunes a copy of ``unet`` on ``images`` (N0, 3, 32, 32) all captioned ``caption``, no prior preservation.

    Returns the full UNet state dict (DreamBooth style) or a kohya-format LoRA state dict (rank > 0); the text
    encoder stays frozen, as in the paper's fine-tunes. ``unet`` itself is not changed.
    """
    generator = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(unet).train()
    with torch.no_grad():
        context = text_encoder.encode(caption).expand(images.shape[0], -1, -1)
    adapters = {}
    if settings.rank:
        model.requires_grad_(False)
        for path in attention_projection_names(model):
            parent, _, leaf = path.rpartition(".")
            adapter = LoRALinear(model.get_submodule(path), settings.rank, generator)
            setattr(model.get_submodule(parent), leaf, adapter)
            adapters[path] = adapter
        params = [p for a in adapters.values() for p in (a.down, a.up)]
    else:
        params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    alphas_cumprod = schedule.alphas_cumprod()
    for _ in range(settings.steps):
        loss = diffusion_loss(model, images, context, alphas_cumprod, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if not settings.rank:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    lora = {}
    for path, adapter in adapters.items():
        key = kohya_key(path)
        lora[f"{key}.lora_down.weight"] = adapter.down.detach().clone()
        lora[f"{key}.lora_up.weight"] = adapter.up.detach().clone()
        lora[f"{key}.alpha"] = torch.tensor(adapter.alpha)
    return lora


def merge_lora(unet: WorldUNet, lora: dict[str, torch.Tensor]) -> WorldUNet:
    """A copy of ``unet`` with a kohya LoRA merged into its weights: W + (alpha / rank) up @ down."""
    merged = copy.deepcopy(unet)
    with torch.no_grad():
        for path in attention_projection_names(merged):
            key = kohya_key(path)
            if f"{key}.lora_up.weight" not in lora:
                continue
            up, down = lora[f"{key}.lora_up.weight"], lora[f"{key}.lora_down.weight"]
            merged.get_submodule(path).weight += (float(lora[f"{key}.alpha"]) / down.shape[0]) * up @ down
    return merged
