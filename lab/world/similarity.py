"""Image descriptors for the 32x32 world, in the pack's EMBEDDINGS form (so clustering and metrics take them as is).

SSCD needs far larger images and its weights cannot be fetched here, so the world uses:

``highpass`` (the main descriptor): the image minus its Gaussian blur (sigma 1.5 px), per RGB channel, centred and
    scaled to unit length. The cosine of two descriptors is the correlation of their fine detail (edges, texture), which
    two unrelated images rarely share. Plain pixels at 32x32 are dominated by the overall colour layout: two random
    gradients already correlate strongly.
``pixel`` (a sanity check): the image itself, centred and unit length (Pearson correlation of the pixels).

Chance floors (what unrelated images score) are measured by the proving ground and reported beside every figure.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..product import pack_module

Embeddings = pack_module("finextract_core.embeddings").Embeddings

HIGHPASS_SIGMA = 1.5
HIGHPASS_MODEL_ID = f"world_highpass_sigma{HIGHPASS_SIGMA:g}"
PRESET = "world32"


def _gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = int(np.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
    kernel = (kernel / kernel.sum()).to(images.dtype)
    channels = images.shape[1]
    padded = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    blurred = F.conv2d(padded, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1).contiguous(), groups=channels)
    return F.conv2d(blurred, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1).contiguous(), groups=channels)


def _unit_rows(features: torch.Tensor) -> np.ndarray:
    flat = features.flatten(1).double()
    flat = flat - flat.mean(dim=1, keepdim=True)
    norms = flat.norm(dim=1, keepdim=True)
    if bool((norms < 1e-8).any()):
        raise ValueError("an image is perfectly flat (no detail at all): it has no descriptor")
    return (flat / norms).numpy()


def highpass_embeddings(images: torch.Tensor) -> Embeddings:
    """Descriptors of images (N, 3, H, W) with values in [0, 1] (ComfyUI's range; any affine range gives the same)."""
    images = torch.as_tensor(images, dtype=torch.float64)
    detail = images - _gaussian_blur(images, HIGHPASS_SIGMA)
    return Embeddings(_unit_rows(detail), HIGHPASS_MODEL_ID, PRESET)


def pixel_embeddings(images: torch.Tensor) -> Embeddings:
    """Centred, unit-length raw pixels of images (N, 3, H, W)."""
    return Embeddings(_unit_rows(torch.as_tensor(images, dtype=torch.float64)), "world_pixel", PRESET)
