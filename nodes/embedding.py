"""Image batches -> EMBEDDINGS: SSCD (the paper's copy detector) from models/sscd/, or a CLIP image tower through
open-clip-torch from models/open_clip/, for users who prefer CLIP similarity. Both embedders are loaded onto the
device by ComfyUI's model management, like any other model."""

from __future__ import annotations

import os

import comfy.model_management
import comfy.model_patcher
import folder_paths
from comfy_api.latest import io

from ..finextract_core import clip_embed, sscd
from .types import EMBEDDINGS

CATEGORY = "FineXtract/similarity"
SSCD_FOLDER = "sscd"
CLIP_FOLDER = "open_clip"
WEIGHT_EXTENSIONS = {".pt", ".pth", ".bin", ".safetensors"}
NO_FILE = "(no SSCD file in models/sscd)"
NO_CLIP_FILE = "(no CLIP file in models/open_clip)"


def register_model_folder(name: str) -> None:
    """models/<name>/ as a model folder (extra_model_paths.yaml can add more under the key <name>)."""
    folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name), is_default=True)
    folder_paths.folder_names_and_paths[name][1].update(WEIGHT_EXTENSIONS)


def missing_file_message(name: str) -> str:
    folders = ", ".join(folder_paths.get_folder_paths(SSCD_FOLDER))
    return (f"SSCD weights '{name}' not found. Put an SSCD file in {folders} (the paper uses sscd_disc_large; download "
            f"{sscd.PAPER_MODEL_URL}, or sscd_disc_mixup.torchscript.pt from the same address) and press 'r' to "
            "refresh the list.")


def missing_clip_message(name: str) -> str:
    folders = ", ".join(folder_paths.get_folder_paths(CLIP_FOLDER))
    return f"CLIP weights '{name}' not found: put open_clip weights in {folders} and press 'r' to refresh the list."


def validate_model_file(folder: str, name: str | None, message) -> bool | str:
    """For a node's validate_inputs: True, or ``message(name)`` for a name the folder's list does not show. Taking the
    input in validate_inputs keeps ComfyUI's own "Value not in list" (current versions check combo values, 0.3.75
    does not) from replacing the advice on where the file goes. None (a value from a link) is checked when the node
    runs."""
    if name is None or name in folder_paths.get_filename_list(folder):
        return True
    return message(name)


def require_images(images, input_name: str) -> None:
    """Refuse an IMAGE input that holds no image, before any model is loaded."""
    if images.shape[0] == 0:
        raise ValueError(f"'{input_name}' is an empty image batch (0 images). Check the node that feeds it (an empty "
                         "folder, or a selection that kept nothing) and connect at least one image.")


register_model_folder(SSCD_FOLDER)
register_model_folder(CLIP_FOLDER)


class _LastModel:
    """Keeps the last model loaded, keyed by file identity and settings, so re-running a workflow does not reload
    100-200 MB each time. The model is held in a ComfyUI ModelPatcher: model management loads it onto the device for
    an embedding, counts its memory, and offloads it when another model (the UNets) needs the room, as it does for
    any model; a replaced patcher leaves model management with its last reference."""

    def __init__(self, load):
        self.load = load
        self.key = None
        self.patcher = None

    def get(self, path: str, *settings) -> comfy.model_patcher.ModelPatcher:
        stat = os.stat(path)
        key = (path, stat.st_size, stat.st_mtime_ns, *settings)
        if self.key != key:
            self.patcher = None  # the old model's memory is free before the new one loads
            self.patcher = comfy.model_patcher.ModelPatcher(
                self.load(path, *settings), load_device=comfy.model_management.get_torch_device(),
                offload_device=comfy.model_management.unet_offload_device())
            self.key = key
        return self.patcher


_sscd_models = _LastModel(lambda path: sscd.load_sscd_model(path, device="cpu"))
_clip_models = _LastModel(lambda path, architecture, quick_gelu: clip_embed.load_clip_embedder(
    architecture, path, quick_gelu=quick_gelu, device="cpu"))


def load_sscd(sscd_model: str) -> comfy.model_patcher.ModelPatcher:
    """The patcher of the SSCD model (``.model``) of a file name from the models/sscd list (cached), or a message
    saying where to put one."""
    path = folder_paths.get_full_path(SSCD_FOLDER, sscd_model) if sscd_model != NO_FILE else None
    if path is None:
        raise FileNotFoundError(missing_file_message(sscd_model))
    return _sscd_models.get(path)


def embed_managed(patcher: comfy.model_patcher.ModelPatcher, embed):
    """Runs ``embed(model, device)`` once model management has loaded the embedder onto its device (freeing memory
    for it first if needed); it stays loaded until another model needs the room. Loaded whole: embedders are small,
    and the core's embedding puts the whole model on one device, which would undo a partial load."""
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    return embed(patcher.model, patcher.load_device)


class SSCDEmbed(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FineXtractSSCDEmbed",
            display_name="SSCD Embed (FineXtract)",
            category=CATEGORY,
            description="Copy-detection descriptors (SSCD) of an image batch, for clustering candidates and for "
                        "comparing extracted images with references.",
            inputs=[
                io.Image.Input("images", tooltip="Candidates, extracted images or reference images."),
                io.Combo.Input("sscd_model", options=folder_paths.get_filename_list(SSCD_FOLDER) or [NO_FILE],
                               tooltip=f"SSCD weights in models/sscd/ (.torchscript.pt, .classy.pt, .torchvision.pt or "
                               f".safetensors). The paper uses sscd_disc_large: {sscd.PAPER_MODEL_URL}"),
                io.Combo.Input("preset", options=sorted(sscd.PRESETS), default=sscd.DEFAULT_PRESET,
                               tooltip="paper: Resize 256, CenterCrop 224, mean/std 0.5 (reproduces the paper's "
                               "numbers). sscd: short side 288, ImageNet mean/std, no crop (the SSCD authors')."),
                io.Int.Input("batch_size", default=32, min=1, max=1024, tooltip="Images per forward pass."),
            ],
            outputs=[EMBEDDINGS.Output(display_name="embeddings")],
        )

    @classmethod
    def validate_inputs(cls, sscd_model) -> bool | str:
        return validate_model_file(SSCD_FOLDER, sscd_model, missing_file_message)

    @classmethod
    def execute(cls, images, sscd_model, preset, batch_size) -> io.NodeOutput:
        require_images(images, "images")
        return io.NodeOutput(embed_managed(load_sscd(sscd_model), lambda model, device: sscd.embed_images(
            model, images, preset, batch_size=batch_size, device=device)))


class OpenCLIPEmbed(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FineXtractOpenCLIPEmbed",
            display_name="CLIP Embed (FineXtract)",
            category=CATEGORY,
            description="CLIP image embeddings through open-clip-torch, an alternative to SSCD with the same "
                        "EMBEDDINGS output (embeddings of different models are never compared with each other).",
            inputs=[
                io.Image.Input("images", tooltip="Candidates, extracted images or reference images."),
                io.Combo.Input("clip_weights", options=folder_paths.get_filename_list(CLIP_FOLDER) or [NO_CLIP_FILE],
                               tooltip="open_clip weights in models/open_clip/ (.safetensors, or a .bin/.pt state "
                               "dict), for example open_clip_pytorch_model.bin of "
                               "laion/CLIP-ViT-B-32-laion2B-s34B-b79K."),
                io.String.Input("architecture", default="ViT-B-32",
                                tooltip="The open_clip architecture of those weights (ViT-B-32, ViT-L-14, RN50, ...)."),
                io.Boolean.Input("quick_gelu", default=False,
                                 tooltip="On for OpenAI's original CLIP weights, off for LAION/DataComp ones."),
                io.Int.Input("batch_size", default=32, min=1, max=1024, tooltip="Images per forward pass."),
            ],
            outputs=[EMBEDDINGS.Output(display_name="embeddings")],
        )

    @classmethod
    def validate_inputs(cls, clip_weights) -> bool | str:
        return validate_model_file(CLIP_FOLDER, clip_weights, missing_clip_message)

    @classmethod
    def execute(cls, images, clip_weights, architecture, quick_gelu, batch_size) -> io.NodeOutput:
        require_images(images, "images")
        path = folder_paths.get_full_path(CLIP_FOLDER, clip_weights) if clip_weights != NO_CLIP_FILE else None
        if path is None:
            raise FileNotFoundError(missing_clip_message(clip_weights))
        return io.NodeOutput(embed_managed(_clip_models.get(path, architecture, quick_gelu), lambda model, device: (
            clip_embed.embed_images_clip(model, images, batch_size=batch_size, device=device))))


NODES = [SSCDEmbed, OpenCLIPEmbed]
