"""The demo world's workflow builder for finextract-audit (``--workflow-builder lab.audit_world:WorldBuilder``): the
world's loader, text encoder, VAE and descriptor in place of the SD family's checkpoint loader, CLIP, VAE and SSCD,
as lab/demo.py swaps them into the example workflows. A base is a world folder (world.json, pretrained.safetensors)
under --bases; its fine-tunes are DreamBooth-style UNet files and kohya-named LoRAs."""

from __future__ import annotations

import os

from .product import REPO_ROOT, pack_module
from .world.data import RESOLUTION
from .world.store import SPEC_FILE, WEIGHTS_FILE

workflow = pack_module("finextract_core.audit.workflow")
read_header = pack_module("finextract_core.evidence_header").read_header
UNET_PREFIX = "unet."  # the world's file holds its UNet under this prefix, beside its text encoder


class WorldBuilder:
    name = "world"
    resolution = RESOLUTION
    latent_size = 8 * RESOLUTION  # EmptyLatentImage makes latents 1/8 of the size asked for
    custom_node_folders = (("finextract_lab", os.path.join(REPO_ROOT, "lab")),)

    def bases(self, folder: str) -> list:
        found = []
        for root, dirs, files in os.walk(folder, followlinks=True):
            dirs.sort()
            if SPEC_FILE in files and WEIGHTS_FILE in files:
                path = os.path.join(root, WEIGHTS_FILE)
                found.append(workflow.Base(path, os.path.relpath(path, folder).replace(os.sep, "/"), "world", root))
        return found

    def fit(self, model, family, base) -> str | None:
        """A UNet fits when its tensors are the world's UNet tensors, name for name and shape for shape. A LoRA's
        keys are counted on the server (the audit's LoRA fit)."""
        if model.is_lora:
            return None
        if model.kind != "unet":
            return f"a {model.kind} is not a world fine-tune"
        unet = {key[len(UNET_PREFIX):]: shape for key, shape in read_header(base.path).shapes.items()
                if key.startswith(UNET_PREFIX)}
        if read_header(model.path).shapes != unet:
            return f"its tensors are not those of {base.name}'s UNet"
        return None

    def model_graph(self, model, base, caption: str):
        base_id = workflow.BASE
        nodes = {base_id: {"class_type": "FineXtractWorldLoader", "inputs": {"world": base.folder, "fine_tune": ""}}}
        files = {"pretrained_file": base.name, "fine_tuned_file": workflow.NO_FILE, "lora_file": workflow.NO_FILE}
        if model.is_lora:
            nodes["fine_tuned"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
                "model": [base_id, 0], "lora_name": model.name, "strength_model": 1.0}}
            files["lora_file"] = model.name
        else:
            nodes["fine_tuned"] = {"class_type": "FineXtractWorldLoader", "inputs": {
                "world": base.folder, "fine_tune": model.path}}
            files["fine_tuned_file"] = model.name
        nodes["positive"] = {"class_type": "FineXtractWorldTextEncode", "inputs": {
            "text_encoder": [base_id, 1], "text": caption}}
        nodes["negative"] = {"class_type": "FineXtractWorldTextEncode", "inputs": {
            "text_encoder": [base_id, 1], "text": ""}}
        nodes["world_vae"] = {"class_type": "FineXtractWorldVAE", "inputs": {}}
        nodes["world_embedder"] = {"class_type": "FineXtractWorldEmbedder", "inputs": {}}
        return workflow.ModelGraph(nodes, ["fine_tuned", 0], [base_id, 0], ["positive", 0], ["negative", 0],
                                   ["world_vae", 0], embedder=["world_embedder", 0], report_files=files)

    def reference_nodes(self, images: list) -> dict:
        return {workflow.REFERENCE_EMBEDDINGS: {"class_type": "FineXtractWorldEmbed", "inputs": {"images": images}}}
