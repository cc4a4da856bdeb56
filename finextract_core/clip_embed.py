"""CLIP image embeddings through open-clip-torch, as an alternative to SSCD, in the same EMBEDDINGS type.

open-clip-torch is optional: it is imported only when a CLIP embedder is built, and its absence is a clear error
there. Weights come only from a local file the user placed (``pretrained=<path>``; open_clip reads safetensors, or
``torch.load(weights_only=True)``); nothing is downloaded. With a file path open_clip does not know which pretrained
tag the file came from, so the tag's settings must be passed: ``quick_gelu=True`` for OpenAI's original weights,
and ``mean``/``std`` when they differ from the architecture's default (OpenAI statistics).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .embeddings import Embeddings
from .image_embedding import center_crop, embed_batches, normalize, resize_short_side
from .images import check_image_batch

_KNOWN_STATISTICS = {
    ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)): "openai",
    ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)): "imagenet",
    ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)): "half",
}


@dataclass(frozen=True)
class ClipPreprocessing:
    """open_clip's eval transform: short side to ``size`` (``interpolation``, antialiased), centre crop, normalise."""

    size: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def preset(self) -> str:
        statistics = _KNOWN_STATISTICS.get((self.mean, self.std), "custom")
        return f"open_clip:{self.size}px:{self.interpolation}:{statistics}"


class ClipImageEmbedder(nn.Module):
    """An open_clip image tower with its preprocessing and provenance; ``forward`` returns unit descriptors."""

    def __init__(self, visual: nn.Module, preprocessing: ClipPreprocessing, model_id: str):
        super().__init__()
        self.visual = visual
        self.preprocessing = preprocessing
        self.model_id = model_id

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual(x).float(), dim=1)


def file_sha256_prefix(path: str, length: int = 12) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]


def load_clip_embedder(architecture: str, weights_path: str | None, *, quick_gelu: bool = False,
                       mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                       device: str | torch.device = "cpu") -> ClipImageEmbedder:
    """Build open_clip ``architecture`` (e.g. ``"ViT-B-32"``) with weights from ``weights_path``.

    ``weights_path=None`` gives random weights (tests only). The model id is ``open_clip:<arch>:<sha256[:12]>`` of
    the file, so two different weight files never compare silently.
    """
    try:
        import open_clip  # optional (pyproject's "clip" extra): only CLIP Embed needs it
    except ImportError as error:
        raise ImportError("CLIP Embed needs the optional package open-clip-torch, which is not installed: install it "
                          "into ComfyUI's Python (python -m pip install \"open-clip-torch>=2.24\") and restart "
                          "ComfyUI. SSCD Embed and the rest of FineXtract work without it.") from error

    if architecture not in open_clip.list_models():
        raise ValueError(f"unknown open_clip architecture {architecture!r}; e.g. ViT-B-32, ViT-L-14, RN50")
    if weights_path is not None and not os.path.isfile(weights_path):
        raise FileNotFoundError(f"CLIP weight file not found: {weights_path}: place the open_clip weights "
                                f"(.safetensors or .bin/.pt state dict) for {architecture} in the CLIP models folder")
    model, _, _ = open_clip.create_model_and_transforms(
        architecture, pretrained=weights_path, force_quick_gelu=quick_gelu,
        image_mean=tuple(mean) if mean is not None else None, image_std=tuple(std) if std is not None else None,
        weights_only=True,
    )
    config = open_clip.get_model_preprocess_cfg(model)
    if config.get("resize_mode", "shortest") != "shortest":
        raise ValueError(f"resize mode {config['resize_mode']!r} of {architecture} is not supported (only 'shortest')")
    size = config["size"]
    preprocessing = ClipPreprocessing(
        size=size if isinstance(size, int) else int(size[0]),
        interpolation=config.get("interpolation", "bicubic"),
        mean=tuple(float(v) for v in config["mean"]),
        std=tuple(float(v) for v in config["std"]),
    )
    fingerprint = file_sha256_prefix(weights_path) if weights_path is not None else "untrained"
    embedder = ClipImageEmbedder(model.visual, preprocessing, f"open_clip:{architecture}:{fingerprint}")
    return embedder.eval().to(device)


def preprocess_for_clip(images: torch.Tensor, preprocessing: ClipPreprocessing) -> torch.Tensor:
    """ComfyUI IMAGE [N, H, W, 3] in 0..1 -> normalised [N, 3, size, size]."""
    check_image_batch(images)
    x = images.permute(0, 3, 1, 2).float()
    x = resize_short_side(x, preprocessing.size, mode=preprocessing.interpolation)
    x = center_crop(x, preprocessing.size).clamp(0.0, 1.0)  # bicubic overshoots; PIL's uint8 output is clamped too
    return normalize(x, preprocessing.mean, preprocessing.std).contiguous()


def embed_images_clip(embedder: ClipImageEmbedder, images: torch.Tensor, *, batch_size: int = 32,
                      device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Embeddings:
    """Embed a ComfyUI IMAGE batch with a CLIP image tower; same contract as :func:`sscd.embed_images`."""
    check_image_batch(images)
    target = torch.device(device) if device is not None else next(embedder.parameters()).device
    embedder.to(target).eval()
    config = embedder.preprocessing
    vectors = embed_batches(embedder, images, lambda chunk: preprocess_for_clip(chunk, config), batch_size, target,
                            dtype)
    return Embeddings(vectors, embedder.model_id, config.preset)
