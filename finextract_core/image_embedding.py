"""What the image embedders here (SSCD and CLIP) share: torchvision's eval transforms on IMAGE tensors, the compute
dtype, and batched inference into unit rows.

The transforms work on [N, C, H, W] float tensors and equal torchvision's ``Resize(size)``, ``CenterCrop(size)`` and
``Normalize`` (tests/core/test_sscd.py and test_clip_embed.py check them against torchvision), without a PIL round trip.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def resize_short_side(images: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """torchvision ``Resize(size)`` on [N, C, H, W]: short side to ``size``, long side truncated like torchvision."""
    height, width = images.shape[-2:]
    if min(height, width) == size:
        return images
    if height <= width:
        new_size = (size, int(size * width / height))
    else:
        new_size = (int(size * height / width), size)
    return F.interpolate(images, size=new_size, mode=mode, align_corners=False, antialias=True)


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision ``CenterCrop(size)`` offsets (round half to even of (H - size) / 2) on [N, C, H, W]."""
    height, width = images.shape[-2:]
    if height < size or width < size:
        raise ValueError(f"cannot centre-crop {size}x{size} from {height}x{width}")
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return images[..., top: top + size, left: left + size]


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


def resolve_compute_dtype(device: torch.device, dtype: torch.dtype | None) -> torch.dtype:
    """float16 by default on CUDA, float32 elsewhere; half precision is refused off CUDA (slow or unsupported)."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"unsupported compute dtype {dtype}: use float32, float16 or bfloat16")
    if dtype != torch.float32 and device.type != "cuda":
        raise ValueError(f"{dtype} is only used on CUDA devices; use float32 on {device.type}")
    return dtype


def embed_batches(model: nn.Module, images: torch.Tensor, prepare, batch_size: int, device: torch.device,
                  dtype: torch.dtype | None) -> np.ndarray:
    """Run ``model(prepare(chunk))`` over ``images`` in chunks; returns float32 unit rows as a numpy array.

    Shared by the SSCD and CLIP embedders: ``prepare`` maps an IMAGE chunk to the model's input tensor.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    compute_dtype = resolve_compute_dtype(device, dtype)
    rows = []
    with torch.inference_mode():
        for start in range(0, images.shape[0], batch_size):
            inputs = prepare(images[start: start + batch_size].to(device))  # resizing stays in float32
            with torch.autocast(device_type=device.type, dtype=compute_dtype,
                                enabled=compute_dtype != torch.float32):
                descriptors = model(inputs).float()
            rows.append(F.normalize(descriptors, dim=1).cpu())
    return torch.cat(rows).numpy()
