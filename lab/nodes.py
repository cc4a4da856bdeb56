"""The proving-ground world as ComfyUI values: its denoiser as a MODEL, its captions as CONDITIONING, its latents
(the 32x32 images themselves) as IMAGE.

A pretrained world and every fine-tune of it are built with one model-config class, so the model-guidance guider
sees one model family. A LoRA fine-tune is not loaded here: apply it to the pretrained MODEL with
LoraLoaderModelOnly (comfy.sd.load_lora_for_models), as for any Stable Diffusion LoRA.
"""
from __future__ import annotations

import functools
import os
from dataclasses import asdict

import torch

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models_base
from comfy_api.latest import ComfyExtension, io
from safetensors import safe_open
from safetensors.torch import load_file

from .product import REPO_ROOT, pack_module
from .world import similarity, store
from .world.schedule import Schedule
from .world.unet import UNetConfig, WorldUNet

EMBEDDINGS = pack_module("nodes.types").EMBEDDINGS
IMAGE_EMBEDDER = pack_module("nodes.types").IMAGE_EMBEDDER

CATEGORY = "FineXtract/world"

# The world's text encoder (lab.world.text.TextEncoder), shared by the pretrained model and its fine-tunes.
WorldTextEncoder = io.Custom("FINEXTRACT_WORLD_TEXT")


class WorldLatentFormat(comfy.latent_formats.LatentFormat):
    latent_channels = 3  # the "latents" are the RGB pixels in [-1, 1]


@functools.cache
def world_config_class():
    """One config class for every world model: the guider compares families by class."""

    class FineXtractWorld(comfy.supported_models_base.BASE):
        latent_format = WorldLatentFormat
        unet_extra_config = {}  # SD's head settings would be passed to our UNet as unknown arguments

    return FineXtractWorld


class ComfyWorldUNet(WorldUNet):
    """WorldUNet in ComfyUI's calling convention (keyword config, device/operations, context=..., extra options)."""

    def __init__(self, schedule: dict, device=None, operations=None, **config):
        super().__init__(UNetConfig.from_dict(config), Schedule(**schedule))
        self.dtype = torch.float32  # ComfyUI casts inputs to the denoiser's dtype

    def forward(self, x, timesteps, context=None, **_comfy_options):
        return super().forward(x, timesteps, context)


def world_model(spec: store.WorldSpec, unet_weights: dict[str, torch.Tensor]) -> comfy.model_patcher.ModelPatcher:
    config = world_config_class()({**spec.unet.to_dict(), "schedule": asdict(spec.schedule)})
    config.sampling_settings = spec.schedule.comfy_sampling_settings()  # the schedule the world was trained with
    model = comfy.model_base.BaseModel(config, unet_model=ComfyWorldUNet)
    model.diffusion_model.load_state_dict(unet_weights)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def resolve(path: str) -> str:
    """An absolute path, or one relative to the repository (where out/ and cache/ live)."""
    return path if os.path.isabs(path) else os.path.join(REPO_ROOT, path)


def is_lora_file(path: str) -> bool:
    with safe_open(path, framework="pt") as handle:
        return any(k.startswith("lora_unet_") for k in handle.keys())


class WorldLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FineXtractWorldLoader",
            display_name="World Loader (FineXtract proving ground)",
            category=CATEGORY,
            description="Loads a proving-ground world (built by lab/proving_ground.py) as a MODEL: the pretrained "
                        "denoiser, or a DreamBooth-style fine-tune of it. Apply a LoRA fine-tune to the pretrained MODEL "
                        "with LoraLoaderModelOnly.",
            inputs=[
                io.String.Input("world", default="cache/world", tooltip="The world folder (holding world.json), "
                                "absolute or relative to the repository."),
                io.String.Input("fine_tune", default="", tooltip="Empty for the pretrained model, or a DreamBooth-style "
                                "fine-tune (.safetensors; a name under the world's finetunes/ or a path)."),
            ],
            outputs=[io.Model.Output(), WorldTextEncoder.Output(display_name="text_encoder")],
        )

    @classmethod
    def execute(cls, world, fine_tune) -> io.NodeOutput:
        loaded = store.load(resolve(world))
        weights = loaded.unet.state_dict()
        if fine_tune:
            path = fine_tune if os.path.isabs(fine_tune) else loaded.fine_tune_path(fine_tune.removesuffix(".safetensors"))
            if is_lora_file(path):
                raise ValueError(f"{path} is a LoRA: load the pretrained world (empty fine_tune) and apply the LoRA with "
                                 "LoraLoaderModelOnly")
            weights = load_file(path)
        return io.NodeOutput(world_model(loaded.spec, weights), loaded.text_encoder)


class WorldTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FineXtractWorldTextEncode",
            display_name="World Text Encode (FineXtract proving ground)",
            category=CATEGORY,
            description="Encodes a caption in the world's vocabulary (for example 'a sks photo', or empty) as CONDITIONING.",
            inputs=[WorldTextEncoder.Input("text_encoder"), io.String.Input("text", default="")],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, text_encoder, text) -> io.NodeOutput:
        return io.NodeOutput([[text_encoder.encode(text), {}]])


def decode_world_latents(latents: torch.Tensor) -> torch.Tensor:
    """World latents (RGB in [-1, 1], channels first) as IMAGE (values clipped to [0, 1])."""
    return ((latents.float() + 1) / 2).clamp(0, 1).movedim(1, -1)


def embed_world_images(images: torch.Tensor):
    """The world's descriptors (similarity.highpass_embeddings) of an IMAGE batch."""
    return similarity.highpass_embeddings(images.movedim(-1, 1))


class WorldVAEModel:
    """World Decode as a VAE, for the nodes that decode latents themselves (the Candidate Bank, Extracted Images)."""

    first_stage_model = torch.nn.Module()  # no weights: the bank's key fingerprints the empty state dict

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        return decode_world_latents(samples)


class WorldImageEmbedder:
    """World Embed as the Candidate Bank's embedder (nodes.types.IMAGE_EMBEDDER): no weights, so its identity is its
    name."""

    model_id = identity = similarity.HIGHPASS_MODEL_ID
    preset = similarity.PRESET

    def embed(self, images: torch.Tensor):
        return embed_world_images(images)


class WorldDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FineXtractWorldDecode",
            display_name="World Decode (FineXtract proving ground)",
            category=CATEGORY,
            description="Turns world latents (RGB in [-1, 1]) into IMAGE (values clipped to [0, 1]).",
            inputs=[io.Latent.Input("samples")],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, samples) -> io.NodeOutput:
        return io.NodeOutput(decode_world_latents(samples["samples"]))


class WorldEmbed(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FineXtractWorldEmbed",
            display_name="World Embed (FineXtract proving ground)",
            category=CATEGORY,
            description="Descriptors for 32x32 world images, in place of SSCD Embed (SSCD needs far larger images): "
                        "each image minus its Gaussian blur, centred and unit length, so a cosine similarity is the "
                        "correlation of two images' fine detail. Feeds Clique Cluster and Extraction Metrics as is.",
            inputs=[io.Image.Input("images", tooltip="Candidates, extracted images or reference images.")],
            outputs=[EMBEDDINGS.Output(display_name="embeddings")],
        )

    @classmethod
    def execute(cls, images) -> io.NodeOutput:
        return io.NodeOutput(embed_world_images(images))


class WorldVAE(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FineXtractWorldVAE",
            display_name="World VAE (FineXtract proving ground)",
            category=CATEGORY,
            description="World Decode as a VAE, for the Candidate Bank and Extracted Images, which decode latents "
                        "themselves.",
            inputs=[],
            outputs=[io.Vae.Output()],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(WorldVAEModel())


class WorldEmbedder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FineXtractWorldEmbedder",
            display_name="World Embedder (FineXtract proving ground)",
            category=CATEGORY,
            description="World Embed's descriptor as the Candidate Bank's embedder, in place of its SSCD file.",
            inputs=[],
            outputs=[IMAGE_EMBEDDER.Output(display_name="embedder")],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(WorldImageEmbedder())


NODES = [WorldLoader, WorldTextEncode, WorldDecode, WorldEmbed, WorldVAE, WorldEmbedder]


class LabExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES
