"""Small random-weight model files that ComfyUI loads through its own loaders, built by the tests (never committed).

- An SD 1.x-shaped UNet that ComfyUI's detection accepts as SD 1.5 (model_channels 320, context 768, one level,
  no middle block: 18.7 M parameters), alone (UNETLoader) or in a full checkpoint with CLIP-L and a TAESD-shaped VAE
  (CheckpointLoaderSimple).
- A "DreamBooth" fine-tune of it (every weight moved a little), and a kohya-style LoRA on its attention projections.
- SDXL-shaped model patchers (ComfyUI's SDXL model class with a small UNet: context 2048, adm 2816) built in memory,
  since ComfyUI's detection only accepts SDXL at full size.
Every tensor comes from a seeded generator, so the same seed gives the same files.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

SD15_UNET = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1], channel_mult=[1],
    transformer_depth=[1], transformer_depth_output=[1, 1], transformer_depth_middle=-2, context_dim=768,
    num_heads=8, use_linear_in_transformer=False, use_spatial_transformer=True, legacy=False, adm_in_channels=None,
    use_temporal_attention=False, use_temporal_resblock=False,
)

SDXL_UNET = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=64, num_res_blocks=[1, 1], channel_mult=[1, 2],
    transformer_depth=[0, 1], transformer_depth_output=[0, 0, 1, 1], transformer_depth_middle=1, context_dim=2048,
    num_head_channels=32, use_linear_in_transformer=True, use_spatial_transformer=True, legacy=False,
    adm_in_channels=2816, num_classes="sequential", use_temporal_attention=False, use_temporal_resblock=False,
)


def random_like(shapes: dict[str, torch.Size], seed: int) -> dict[str, torch.Tensor]:
    """Weights scaled like a trained network's (unit-ish activations), norms at identity, biases small."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(shapes):
        shape = shapes[key]
        if key.endswith("bias"):
            out[key] = torch.randn(shape, generator=gen) * 0.02
        elif len(shape) == 1:  # norm scales
            out[key] = 1.0 + torch.randn(shape, generator=gen) * 0.02
        else:
            fan_in = max(1, int(torch.tensor(shape[1:]).prod()))
            out[key] = torch.randn(shape, generator=gen) / fan_in ** 0.5
    return out


def _shapes(module: torch.nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in module.state_dict().items()}


def unet_shapes(config: dict) -> dict[str, torch.Size]:
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    with torch.device("meta"):
        unet = UNetModel(**config, device="meta", operations=comfy.ops.disable_weight_init)
    return _shapes(unet)


def sd15_unet(seed: int) -> dict[str, torch.Tensor]:
    return random_like(unet_shapes(SD15_UNET), seed)


def fine_tune_of(base: dict[str, torch.Tensor], seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """A stand-in DreamBooth fine-tune: every weight moved by a seeded relative perturbation."""
    gen = torch.Generator().manual_seed(seed)
    return {k: v + scale * v.abs().mean() * torch.randn(v.shape, generator=gen) for k, v in sorted(base.items())}


def attention_lora(base: dict[str, torch.Tensor], seed: int, rank: int = 4, alpha: float = 4.0,
                   scale: float = 0.5) -> dict[str, torch.Tensor]:
    """A kohya-style LoRA (lora_unet_*) on every attention projection of the UNet: what LoraLoaderModelOnly reads."""
    gen = torch.Generator().manual_seed(seed)
    lora = {}
    for key in sorted(base):
        if ".attn" not in key or not key.endswith(("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")):
            continue
        out_dim, in_dim = base[key].shape
        name = "lora_unet_" + key[: -len(".weight")].replace(".", "_")
        lora[f"{name}.lora_down.weight"] = torch.randn(rank, in_dim, generator=gen) / in_dim ** 0.5
        lora[f"{name}.lora_up.weight"] = torch.randn(out_dim, rank, generator=gen) * scale / rank ** 0.5
        lora[f"{name}.alpha"] = torch.tensor(alpha)
    return lora


def merge_lora(base: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], strength: float) -> dict[str, torch.Tensor]:
    """The LoRA folded into the weights by hand (W + strength * alpha/rank * up @ down), independent of ComfyUI."""
    merged = dict(base)
    for key in base:
        name = "lora_unet_" + key[: -len(".weight")].replace(".", "_")
        if f"{name}.lora_up.weight" not in lora:
            continue
        up, down = lora[f"{name}.lora_up.weight"], lora[f"{name}.lora_down.weight"]
        merged[key] = base[key] + strength * (lora[f"{name}.alpha"] / down.shape[0]) * (up @ down)
    return merged


def save_unet(path: str, unet: dict[str, torch.Tensor]) -> str:
    save_file({k: v.contiguous() for k, v in unet.items()}, path)
    return path


def _clip_l_shapes() -> dict[str, torch.Size]:
    import comfy.sd1_clip
    from transformers import CLIPTextConfig, CLIPTextModel

    config_path = os.path.join(os.path.dirname(comfy.sd1_clip.__file__), "sd1_clip_config.json")
    with open(config_path) as f:
        config = CLIPTextConfig(**json.load(f))
    with torch.device("meta"):
        clip = CLIPTextModel(config)
    return {f"cond_stage_model.transformer.{k}": v for k, v in _shapes(clip).items()
            if not k.endswith("position_ids")}


def _taesd_shapes() -> dict[str, torch.Size]:
    from comfy.taesd.taesd import TAESD

    with torch.device("meta"):
        vae = TAESD()
    return {f"first_stage_model.{k}": v for k, v in _shapes(vae).items()
            if k.startswith(("taesd_encoder", "taesd_decoder"))}


def save_sd15_checkpoint(path: str, unet: dict[str, torch.Tensor], seed: int = 0,
                         token_embedding_scale: float = 1.0) -> str:
    """A full SD 1.5-detected checkpoint (UNet + CLIP-L + TAESD-shaped VAE) in fp16, loadable by CheckpointLoaderSimple.

    ``token_embedding_scale`` > 1 makes the random CLIP keep each token's identity in its output row, as a trained
    CLIP does (at 1, position embeddings and random attention mixing swamp it): caption inversion needs that.
    """
    tensors = {f"model.diffusion_model.{k}": v for k, v in unet.items()}
    tensors.update(random_like({**_clip_l_shapes(), **_taesd_shapes()}, seed + 1000))
    for key in tensors:
        if key.endswith("embeddings.token_embedding.weight"):
            tensors[key] = tensors[key] * token_embedding_scale
    save_file({k: v.to(torch.float16).contiguous() for k, v in tensors.items()}, path)
    return path


def sdxl_patcher(seed: int, unet: dict[str, torch.Tensor] | None = None):
    """A ComfyUI MODEL of the SDXL family (model_base.SDXL) with a small UNet; returns (patcher, its UNet weights)."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.SDXL(dict(SDXL_UNET))
    model = config.get_model({})
    weights = unet if unet is not None else random_like(unet_shapes(SDXL_UNET), seed)
    model.diffusion_model.load_state_dict(weights, strict=True)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                               offload_device=comfy.model_management.unet_offload_device())
    return patcher, weights
