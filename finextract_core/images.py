"""ComfyUI IMAGE batches (float [N, H, W, 3] in 0..1) to and from PIL pictures and PNG bytes, and image folders.

One conversion for everything that writes or reads pixels (the audit report, the metrics grid, Load Reference
Images): a pixel value v in 0..1 becomes round(255 v), and a byte b comes back as b / 255, so a PNG written here and
read back gives the same tensor to 8 bits.
"""
from __future__ import annotations

import io
import os

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def check_image_batch(images: torch.Tensor) -> None:
    """Raise ValueError unless ``images`` is a ComfyUI IMAGE: float [N, H, W, 3] with N >= 1."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] < 1:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected an IMAGE batch of shape [N, H, W, 3], got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"expected float images in 0..1, got dtype {images.dtype}")


def to_pil(image: torch.Tensor) -> Image.Image:
    """One IMAGE [H, W, 3] (values outside 0..1 are clipped) as an 8-bit RGB picture."""
    return Image.fromarray((image.clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8))


def from_pil(picture: Image.Image) -> torch.Tensor:
    """An RGB picture as one IMAGE [H, W, 3] of float32 in 0..1."""
    return torch.from_numpy(np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0)


def png_bytes(picture: Image.Image) -> bytes:
    """The picture as PNG. PIL writes no time chunk, so the same pixels always give the same bytes."""
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def image_names(folder: str) -> list[str]:
    """The image files in ``folder`` that load_image_folder reads, sorted by name."""
    return sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES))


def load_image_folder(folder: str, size: int) -> tuple[torch.Tensor, list[str]]:
    """Every image in ``folder`` (sorted by name), EXIF-rotated and centre-cropped to a ``size`` square, as an IMAGE
    batch, with the file names."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"reference folder '{folder}' does not exist: give the full path of a folder of images")
    names = image_names(folder)
    if not names:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in '{folder}': put the reference images there, "
                         "or give the folder that holds them")
    batch = []
    for name in names:
        try:
            with Image.open(os.path.join(folder, name)) as image:
                square = ImageOps.fit(ImageOps.exif_transpose(image).convert("RGB"), (size, size), Image.BICUBIC)
        except OSError as error:
            raise ValueError(f"cannot read '{name}' in '{folder}' ({error}): remove or replace the file") from error
        batch.append(from_pil(square))
    return torch.stack(batch), names
