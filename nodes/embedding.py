"""SSCDEmbed: candidate and reference images -> SSCD descriptors, with the weights the user put in models/sscd/."""

from __future__ import annotations

import os

import comfy.model_management
import folder_paths
from comfy_api.latest import io

from ..finextract_core import sscd
from .types import Embeddings

CATEGORY = "FineXtract/similarity"
SSCD_FOLDER = "sscd"
SSCD_EXTENSIONS = {".pt", ".pth", ".safetensors"}
NO_FILE = "(no SSCD file in models/sscd)"
DOWNLOAD = "https://dl.fbaipublicfiles.com/sscd-copy-detection/sscd_disc_large.torchscript.pt"


def register_sscd_folder() -> None:
    """models/sscd/ as a model folder (extra_model_paths.yaml can add more under the key 'sscd')."""
    folder_paths.add_model_folder_path(SSCD_FOLDER, os.path.join(folder_paths.models_dir, SSCD_FOLDER), is_default=True)
    folder_paths.folder_names_and_paths[SSCD_FOLDER][1].update(SSCD_EXTENSIONS)


def missing_file_message(name: str) -> str:
    folders = ", ".join(folder_paths.get_folder_paths(SSCD_FOLDER))
    return (f"SSCD weights '{name}' not found. Put an SSCD file in {folders} (the paper uses sscd_disc_large; download "
            f"{DOWNLOAD}, or sscd_disc_mixup.torchscript.pt from the same address) and press 'r' to refresh the list.")


register_sscd_folder()


class _ModelCache:
    """Keeps the last SSCD model, keyed by file identity, so re-running a workflow does not reload 100-200 MB."""

    key = None
    model = None

    @classmethod
    def get(cls, path: str) -> sscd.SSCDModel:
        stat = os.stat(path)
        key = (path, stat.st_size, stat.st_mtime_ns)
        if cls.key != key:
            cls.model = sscd.load_sscd_model(path, device="cpu")
            cls.key = key
        return cls.model


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
                               f".safetensors). The paper uses sscd_disc_large: {DOWNLOAD}"),
                io.Combo.Input("preset", options=sorted(sscd.PRESETS), default=sscd.DEFAULT_PRESET,
                               tooltip="paper: Resize 256, CenterCrop 224, mean/std 0.5 (reproduces the paper's "
                               "numbers). sscd: short side 288, ImageNet mean/std, no crop (the SSCD authors')."),
                io.Int.Input("batch_size", default=32, min=1, max=1024, tooltip="Images per forward pass."),
            ],
            outputs=[Embeddings.Output(display_name="embeddings")],
        )

    @classmethod
    def execute(cls, images, sscd_model, preset, batch_size) -> io.NodeOutput:
        path = folder_paths.get_full_path(SSCD_FOLDER, sscd_model) if sscd_model != NO_FILE else None
        if path is None:
            raise FileNotFoundError(missing_file_message(sscd_model))
        model = _ModelCache.get(path)
        device = comfy.model_management.get_torch_device()
        try:
            embeddings = sscd.embed_images(model, images, preset, batch_size=batch_size, device=device)
        finally:
            model.to(comfy.model_management.unet_offload_device())
        return io.NodeOutput(embeddings)


NODES = [SSCDEmbed]
