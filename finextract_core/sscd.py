"""SSCD copy-detection descriptors (Pizzi et al., CVPR 2022): the official weight files, read without running any
code from them, into the network rebuilt in sscd_network.py; the preprocessing presets; embedding IMAGE batches.

The official files (``https://dl.fbaipublicfiles.com/sscd-copy-detection/<name>.<format>.pt``) load with exact key
matching (sscd_layouts.py):

* ``.classy.pt`` / ``.torchvision.pt``: ``torch.load(weights_only=True)``;
* ``.safetensors``: ``safetensors.torch.load_file``;
* ``.torchscript.pt``: the archive's tensors, read by torchscript_reader.py without loading the archive. Only if that
  fails (an archive layout the reader does not know) and the caller passes ``allow_torchscript_execution=True`` is
  ``torch.jit.load`` used, and then only for its ``state_dict()``: loading an archive lets TorchScript code inside it
  run (e.g. ``__setstate__``), which is why that path is opt-in.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

import torch

from .embeddings import Embeddings
from .image_embedding import center_crop, embed_batches, normalize, resize_short_side
from .images import check_image_batch
from .sscd_layouts import detect_architecture, load_state_dict_strict, to_classy_layout
from .sscd_network import SSCDModel
from .torchscript_reader import is_torchscript_archive, read_torchscript_tensors

DOWNLOAD_FOLDER = "https://dl.fbaipublicfiles.com/sscd-copy-detection/"
PAPER_MODEL_FILE = "sscd_disc_large.torchscript.pt"  # the descriptor the paper scores with (ResNeXt101, 1024-d)
PAPER_MODEL_URL = DOWNLOAD_FOLDER + PAPER_MODEL_FILE
DOWNLOAD_PATTERN = DOWNLOAD_FOLDER + "<name>.<format>.pt"
DOWNLOAD_HINT = (
    f"download an official SSCD file from {DOWNLOAD_PATTERN} (e.g. {PAPER_MODEL_FILE}, the paper's "
    "model, or sscd_disc_mixup.classy.pt) and place it in the SSCD models folder"
)


# ---------------------------------------------------------------------------------------------------------- loading
_FORMAT_SUFFIXES = (".classy.pt", ".torchvision.pt", ".torchscript.pt", ".safetensors", ".pt", ".pth")


def model_id_from_path(path: str) -> str:
    """``.../sscd_disc_large.torchscript.pt`` -> ``sscd_disc_large`` (all formats of one model share the id)."""
    name = os.path.basename(path)
    for suffix in _FORMAT_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_sscd_state_dict(path: str, allow_torchscript_execution: bool = False) -> dict[str, torch.Tensor]:
    """Read an SSCD weight file of any official format into a Classy-layout state dict (no code is run).

    Raises FileNotFoundError for a missing file and ValueError for an unreadable one; both name the download address.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SSCD model file not found: {path}: {DOWNLOAD_HINT}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            state_dict = load_file(path, device="cpu")
        elif is_torchscript_archive(path):
            state_dict = _read_torchscript_state_dict(path, allow_torchscript_execution)
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, PermissionError):
        raise
    except Exception as error:  # noqa: BLE001 - any parse failure means the same thing to the user
        raise ValueError(
            f"could not read SSCD weights from {path} ({type(error).__name__}: {error}); the file may be incomplete "
            f"or not an SSCD model: {DOWNLOAD_HINT}"
        ) from error
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{path} does not hold a flat state dict of tensors: {DOWNLOAD_HINT}")
    return to_classy_layout(state_dict)


def _read_torchscript_state_dict(path: str, allow_torchscript_execution: bool) -> dict[str, torch.Tensor]:
    try:
        return read_torchscript_tensors(path)
    except ValueError:
        if not allow_torchscript_execution:
            raise
    # Opt-in fallback: deserialising lets the archive's TorchScript run; the scripted forward is still never called.
    return dict(torch.jit.load(path, map_location="cpu").state_dict())


def load_sscd_model(path: str, device: str | torch.device = "cpu", model_id: str | None = None,
                    allow_torchscript_execution: bool = False) -> SSCDModel:
    """Build the matching :class:`SSCDModel` for an SSCD weight file, load it strictly, and put it in eval mode.

    ``model_id`` defaults to the file name without its format suffix (``sscd_disc_large``).
    """
    state_dict = read_sscd_state_dict(path, allow_torchscript_execution)
    try:
        architecture = detect_architecture(state_dict)
    except ValueError as error:
        raise ValueError(f"{path}: {error} ({DOWNLOAD_HINT})") from None
    model = SSCDModel(architecture, model_id or model_id_from_path(path))
    load_state_dict_strict(model, state_dict)
    return model.eval().to(device)


# ---------------------------------------------------------------------------------------------------- preprocessing
@dataclass(frozen=True)
class Preprocessing:
    """Resize the short side (bilinear, antialiased), optionally centre-crop a square, then normalise."""

    name: str
    short_side: int
    center_crop: int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


PRESETS = {
    # The memorisation papers' (DCR, FineXtract) transform: Resize(256) -> CenterCrop(224) -> Normalize(0.5, 0.5).
    "paper": Preprocessing("paper", 256, 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    # The SSCD README's: small edge 288, ImageNet statistics, no crop.
    "sscd": Preprocessing("sscd", 288, None, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
DEFAULT_PRESET = "paper"


def preprocess(images: torch.Tensor, preset: str = DEFAULT_PRESET) -> torch.Tensor:
    """ComfyUI IMAGE [N, H, W, 3] in 0..1 -> SSCD input [N, 3, h, w] (float32) for the named preset."""
    check_image_batch(images)
    if preset not in PRESETS:
        raise ValueError(f"unknown SSCD preset {preset!r}: choose one of {sorted(PRESETS)}")
    config = PRESETS[preset]
    x = images.permute(0, 3, 1, 2).float()
    x = resize_short_side(x, config.short_side)
    if config.center_crop is not None:
        x = center_crop(x, config.center_crop)
    return normalize(x, config.mean, config.std).contiguous()


# -------------------------------------------------------------------------------------------------------- embedding
def embed_images(model: SSCDModel, images: torch.Tensor, preset: str = DEFAULT_PRESET, *, batch_size: int = 32,
                 device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Embeddings:
    """Embed a ComfyUI IMAGE batch [N, H, W, 3] (0..1) with an SSCD model; row i describes image i.

    ``device`` defaults to the model's; the model is moved there. ``dtype`` None means float16 autocast on CUDA and
    float32 elsewhere (the pooling head always runs in float32).
    """
    check_image_batch(images)
    if preset not in PRESETS:
        raise ValueError(f"unknown SSCD preset {preset!r}: choose one of {sorted(PRESETS)}")
    target = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(target).eval()
    vectors = embed_batches(model, images, lambda chunk: preprocess(chunk, preset), batch_size, target, dtype)
    return Embeddings(vectors, model.model_id, preset)
