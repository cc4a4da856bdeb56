"""Training the world: pretraining, DreamBooth-style full fine-tuning and LoRA fine-tuning, all eps-prediction.

Every function is deterministic given its seed and settings. The settings name the CPU threads training runs with,
because the thread count changes how sums are split and so the weights' last bits (measured: 3e-6 after 30 steps).
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from ..product import pack_module
from .data import procedural_batch
from .text import TextEncoder, tokenize
from .schedule import Schedule
from .unet import Downsample, ResBlock, SpatialTransformer, Upsample, WorldUNet

LOG = logging.getLogger("finextract.world")


def torch_threads(count: int):
    """The pack's thread-count context, looked up when training starts: importing this module (to read STRENGTHS, as
    the proving ground's argument parser does) must not import the pack's core before the ComfyUI host is loaded."""
    return pack_module("finextract_core.threads").torch_threads(count)


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
    steps: int = 1000  # about 6 minutes on an idle 2-core CPU, 11 on the slower one (the proving ground's budget)
    # A step's cost grows with its images (about 15 ms each here, fwd + bwd): 32 keeps the proving ground's world and
    # the main job's within their budgets, where 64 doubled them.
    batch: int = 32
    lr: float = 1e-3
    ema: float = 0.99  # the saved weights are an exponential moving average: cleaner samples from short training
    threads: int = 2  # torch CPU threads: part of the spec, since they change the weights' last bits


def pretrain(unet: WorldUNet, text_encoder: TextEncoder, settings: PretrainSettings, schedule: Schedule,
             seed: int) -> dict:
    """Trains both modules jointly on procedural images, then loads their EMA weights; returns loss statistics."""
    with torch_threads(settings.threads):
        return _pretrain(unet, text_encoder, settings, schedule, seed)


def _pretrain(unet: WorldUNet, text_encoder: TextEncoder, settings: PretrainSettings, schedule: Schedule,
              seed: int) -> dict:
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


# -------------------------------------------------------------------------------------------------- memorisation
MEMORISATION_DRAWS = 32  # fixed (step, noise) draws per training image on which memorisation is measured
MEMORISATION_CHECK_EVERY = 25  # fine-tuning steps between two measurements when training to a target


class MemorisationProbe:
    """How far a model has gone from the pretrained model towards memorising the fine-tuning images.

    On fixed draws (steps stratified over the schedule, Gaussian noise) of the training images, the denoising loss of
    any model is compared with two references: the pretrained model's and the ideal memoriser's, the exact posterior
    mean of eps when the data are the N0 training images and nothing else (the best any model can do on them). The
    fraction (L_pretrained - L_model) / (L_pretrained - L_memoriser) is 0 for the pretrained model and 1 for a model
    that has fully memorised the set: the paper's lambda (how far p_theta' has moved towards q), measured without
    looking at any extraction method.
    """

    def __init__(self, images: torch.Tensor, context: torch.Tensor, schedule: Schedule, seed: int,
                 draws: int = MEMORISATION_DRAWS):
        generator = torch.Generator().manual_seed(seed)
        n, timesteps = images.shape[0], schedule.timesteps
        strata = (torch.arange(draws) + torch.rand(n, draws, generator=generator, dtype=torch.float64)) / draws
        self.steps = (strata * timesteps).long().clamp(max=timesteps - 1).flatten()
        self.noise = torch.randn((n * draws, *images.shape[1:]), generator=generator)
        abar = schedule.alphas_cumprod()[self.steps].view(-1, 1, 1, 1)
        clean = images.double().repeat_interleave(draws, dim=0)
        noisy = abar.sqrt() * clean + (1 - abar).sqrt() * self.noise.double()
        self.noisy, self.context = noisy.float(), context[:1]
        # The memoriser: posterior weights over the N0 images given x_t, then eps = (x_t - sqrt(abar) E[x0]) / sqrt(1-abar).
        distances = ((noisy[:, None] - abar.sqrt()[:, None] * images.double()[None]) ** 2).flatten(2).sum(-1)
        weights = torch.softmax(-distances / (2 * (1 - abar.view(-1, 1))), dim=1)
        expected_clean = torch.einsum("bn,nchw->bchw", weights, images.double())
        memoriser_eps = (noisy - abar.sqrt() * expected_clean) / (1 - abar).sqrt()
        self.memoriser_loss = float(((memoriser_eps - self.noise.double()) ** 2).mean())

    @torch.no_grad()
    def loss(self, unet: nn.Module, batch: int = 256) -> float:
        total = 0.0
        for start in range(0, len(self.steps), batch):
            noisy, steps = self.noisy[start:start + batch], self.steps[start:start + batch]
            prediction = unet(noisy, steps.float(), self.context.expand(len(steps), -1, -1))
            total += float(((prediction - self.noise[start:start + batch]) ** 2).sum())
        return total / self.noise.numel()

    def fraction(self, loss: float, pretrained_loss: float) -> float:
        return (pretrained_loss - loss) / (pretrained_loss - self.memoriser_loss)


# ---------------------------------------------------------------------------------------------------- fine-tuning
@dataclass(frozen=True)
class FineTuneSettings:
    steps: int  # the number of steps, or their cap when training to a target memorisation
    lr: float
    rank: int = 0  # LoRA rank; 0 = DreamBooth-style full fine-tune of the UNet
    target_memorisation: float | None = None  # stop at the first check where MemorisationProbe's fraction reaches it
    # Each step's batch holds every image ceil(min_batch / N0) times, each with its own noise and step (kohya's
    # per-image repeats): with N0 = 3-5 images a step of one draw each has too noisy a gradient for a LoRA's high
    # rate, and the rate that stays stable was measured at batches of 40.
    min_batch: int = 1
    cosine_decay: bool = False  # the rate decays to 0 along a cosine over ``steps``, else it is constant
    lora_layers: str = "attention"  # what a LoRA adapts: one of LORA_LAYERS
    threads: int = 2  # torch CPU threads: part of the settings, since they change the weights' last bits

    @property
    def style(self) -> str:
        return "lora" if self.rank else "dreambooth"


# Fine-tuning strength (the paper's lambda) is defined by the fine-tuned model itself, never by extraction results:
# training stops once MemorisationProbe's fraction (0 = pretrained, 1 = the ideal memoriser of the N0 images) reaches
# the target. Steps are per batch and are a cap; a fine-tune that cannot reach its target in them says so in its
# record. Rates are the highest measured to stay stable, so that targets are reached within the CPU budget.
# The LoRA (rank 8 on the attention projections, the paper's diffusers LoRA) trains on batches of at least 40 draws
# (each image repeated) with a cosine-decayed rate: one draw per image at a constant rate had too noisy a gradient
# (0.19 after 600 steps where the repeats reach 0.32, in a world before). Its rate is 1e-2 since the world's 32x32
# level has 32 channels (2e-2 diverged there after 200 steps), and its cap 800: with a 600-step cap it reached
# 0.384-0.400 on concepts 0, 2 and 3 of the default photos, with 800 concept 0 passes 0.4 after 625. With 16 channels
# at 32x32 it stopped at 0.29-0.35 on 6 of 8 pairs, and neither a full-rank adapter nor a doubled cap reached 0.4;
# most of what it missed lay at the smallest noise levels, where an image's fine detail is: the world's width at 32x32,
# not the adapter, set the limit.
MEMORISATION_TARGETS = {"light": 0.2, "partial": 0.4, "saturated": 0.7}
STRENGTHS = {
    "dreambooth": {name: FineTuneSettings(1500, 5e-4, target_memorisation=target)
                   for name, target in MEMORISATION_TARGETS.items()},
    "lora": {name: FineTuneSettings(800, 1e-2, rank=8, target_memorisation=target, min_batch=40,
                                      cosine_decay=True)
             for name, target in MEMORISATION_TARGETS.items()},
    # kohya's LoRA with conv layers (the main job's LoRA), rank 8, on batches of at least 20 draws: on the demo's 3
    # photos 0.62 in its 400 steps at 5e-3 (batches of 42 in the world pretrained on 64-image steps: 0.67, and 2e-2
    # diverged, 0.06 after 600), where the attention LoRA reaches 0.40 in 600: the convolutions hold the fine detail.
    # It reached partial memorisation (0.4) on 8 of 8 pairs in 50-250 steps in the proving ground's narrow world, and
    # on concept 0 after 125 steps in the wide one.
    "locon": {name: FineTuneSettings(400, 5e-3, rank=8, target_memorisation=target, min_batch=20,
                                       cosine_decay=True, lora_layers="locon")
              for name, target in MEMORISATION_TARGETS.items()},
}

ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
# What a LoRA adapts. "attention": every attention projection (attn1 and attn2), the paper's LoRA as diffusers trains
# it. "locon": kohya's LoRA with conv layers (LoCon, sd-scripts' conv_dim), as much of what the community shares is:
# every linear layer of the transformer blocks (attention, feed-forward, proj_in, proj_out) and every layer of the
# ResBlocks, down- and upsamplers (convolutions and time projections), at one rank; the first and last convolutions
# and the time and caption embeddings stay frozen, as kohya leaves conv_in, conv_out and the embeddings.
LORA_LAYERS = ("attention", "locon")


class LoRAAdapter(nn.Module):
    """A frozen linear or convolution layer plus (alpha / rank) * up(down(x)), up initialised to zero (starts as the
    base layer). For a convolution, down has the base's kernel, stride and padding and up is 1x1, as kohya saves it."""

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, generator: torch.Generator):
        super().__init__()
        self.base = base
        self.rank = rank
        self.alpha = float(rank)
        weight = base.weight
        self.down = nn.Parameter(torch.randn(rank, *weight.shape[1:], generator=generator) / weight[0].numel() ** 0.5)
        self.up = nn.Parameter(torch.zeros(weight.shape[0], rank, *[1] * (weight.dim() - 2)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.alpha / self.rank
        if isinstance(self.base, nn.Conv2d):
            low = F.conv2d(x, self.down, stride=self.base.stride, padding=self.base.padding)
            return self.base(x) + F.conv2d(low, self.up) * scale
        return self.base(x) + (x @ self.down.T @ self.up.T) * scale


def lora_layer_names(unet: WorldUNet, layers: str = "attention") -> list[str]:
    """Module paths of the layers a LoRA of kind ``layers`` (one of LORA_LAYERS) adapts."""
    if layers not in LORA_LAYERS:
        raise ValueError(f"unknown LoRA layers {layers!r}: use one of {', '.join(LORA_LAYERS)}")
    blocks = tuple(name + "." for name, module in unet.named_modules()
                   if isinstance(module, (SpatialTransformer, ResBlock, Downsample, Upsample)))
    names = []
    for name, module in unet.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        if layers == "attention":
            chosen = (".attn1." in name or ".attn2." in name) and name.endswith(
                tuple(f".{p}" for p in ATTENTION_PROJECTIONS))
        else:
            chosen = name.startswith(blocks)
        if chosen:
            names.append(name)
    return names


def kohya_key(module_path: str) -> str:
    """ComfyUI's name for a UNet LoRA: ``lora_unet_`` + the module path with dots as underscores."""
    return "lora_unet_" + module_path.replace(".", "_")


def fine_tune(unet: WorldUNet, text_encoder: TextEncoder, images: torch.Tensor, caption: str,
              settings: FineTuneSettings, schedule: Schedule, seed: int,
              record: dict | None = None) -> dict[str, torch.Tensor]:
    """Fine-tunes a copy of ``unet`` on ``images`` (N0, 3, 32, 32) all captioned ``caption``, no prior preservation.

    Returns the full UNet state dict (DreamBooth style) or a kohya-format LoRA state dict (rank > 0); the text
    encoder stays frozen, as in the paper's fine-tunes. ``unet`` itself is not changed. With a target memorisation,
    training stops at the first check (every MEMORISATION_CHECK_EVERY steps) that reaches it, else at ``steps``.
    ``record``, when given, receives the steps run and the memorisation measured at the end.
    """
    with torch_threads(settings.threads):
        return _fine_tune(unet, text_encoder, images, caption, settings, schedule, seed, record)


def _fine_tune(unet: WorldUNet, text_encoder: TextEncoder, images: torch.Tensor, caption: str,
               settings: FineTuneSettings, schedule: Schedule, seed: int,
               record: dict | None) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(unet).train()
    with torch.no_grad():
        context = text_encoder.encode(caption).expand(images.shape[0], -1, -1)
    adapters = {}
    if settings.rank:
        model.requires_grad_(False)
        for path in lora_layer_names(model, settings.lora_layers):
            parent, _, leaf = path.rpartition(".")
            adapter = LoRAAdapter(model.get_submodule(path), settings.rank, generator)
            setattr(model.get_submodule(parent), leaf, adapter)
            adapters[path] = adapter
        params = [p for a in adapters.values() for p in (a.down, a.up)]
    else:
        params = list(model.parameters())
    measured = settings.target_memorisation is not None or record is not None
    probe = MemorisationProbe(images, context, schedule, seed) if measured else None
    pretrained_loss = probe.loss(model) if measured else None
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    decay = (lambda step: 0.5 * (1 + np.cos(np.pi * min(step, settings.steps) / settings.steps))) \
        if settings.cosine_decay else (lambda step: 1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, decay)
    alphas_cumprod = schedule.alphas_cumprod()
    repeats = -(-settings.min_batch // images.shape[0])
    batch_images, batch_context = images.repeat(repeats, 1, 1, 1), context.repeat(repeats, 1, 1)
    steps_run = 0
    while steps_run < settings.steps:
        loss = diffusion_loss(model, batch_images, batch_context, alphas_cumprod, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        steps_run += 1
        if (settings.target_memorisation is not None and steps_run % MEMORISATION_CHECK_EVERY == 0
                and probe.fraction(probe.loss(model), pretrained_loss) >= settings.target_memorisation):
            break
    if record is not None:
        fine_tuned_loss = probe.loss(model)
        record.update(steps_run=steps_run, pretrained_loss=pretrained_loss, fine_tuned_loss=fine_tuned_loss,
                      memoriser_loss=probe.memoriser_loss,
                      memorisation=probe.fraction(fine_tuned_loss, pretrained_loss))
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
    """A copy of ``unet`` with a kohya LoRA merged into its weights: W + (alpha / rank) up @ down (a convolution's
    factors flattened to matrices, the product reshaped to its kernel)."""
    merged = copy.deepcopy(unet)
    with torch.no_grad():
        for path, module in merged.named_modules():
            key = kohya_key(path)
            if f"{key}.lora_up.weight" not in lora:
                continue
            up, down = lora[f"{key}.lora_up.weight"], lora[f"{key}.lora_down.weight"]
            delta = up.flatten(1) @ down.flatten(1)
            module.weight += (float(lora[f"{key}.alpha"]) / down.shape[0]) * delta.reshape(module.weight.shape)
    return merged
