"""The tests' stand-ins for the example workflows' model files: random-weight SD 1.x-shaped models (scripts/tiny_models.py)
written into a ComfyUI models/ folder under the names the tests use, an SSCD file, and small API-format graphs over them.
Built by the tests and benchmarks, never committed.
"""

from __future__ import annotations

import json
import os

import make_workflows
from workflow_api import ui_to_api

# Bump when the demo models change, so cached ones are rebuilt.
DEMO_MODELS_VERSION = "1"
DEMO_WORKFLOW_FILES_VERSION = "1"
DEMO_SSCD = "demo_sscd.safetensors"
# The example workflows' model files -> the test models'.
DEMO_FILES = {
    make_workflows.BASE_FILE: "base.safetensors",
    make_workflows.DREAMBOOTH_FILE: "dreambooth.safetensors",
    make_workflows.LORA_FILE: "style.safetensors",
    make_workflows.SSCD_FILE: DEMO_SSCD,
}


def attack_prompt(fine_tuned: list, prefix: str, *, mode: str = "finextract", guidance_scale: float = 3.0,
                  k: float = -0.02, pretrained: list | None = None, batch: int = 2, steps: int = 4, seed: int = 7,
                  size: int = 64) -> dict:
    """API-format graph on the demo models: base checkpoint, a fine-tuned MODEL ('dreambooth' UNet or the base through
    the 'lora' loader), caption and empty prompt, ModelGuidanceSampler, VAEDecode, SaveImage."""
    return {
        "base": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "base.safetensors"}},
        "dreambooth": {"class_type": "UNETLoader",
                       "inputs": {"unet_name": "dreambooth.safetensors", "weight_dtype": "default"}},
        "lora": {"class_type": "LoraLoaderModelOnly",
                 "inputs": {"model": ["base", 0], "lora_name": "style.safetensors", "strength_model": 1.0}},
        "caption": {"class_type": "CLIPTextEncode", "inputs": {"text": "sks style", "clip": ["base", 1]}},
        "empty": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["base", 1]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": batch}},
        "sample": {"class_type": "FineXtractModelGuidanceSampler", "inputs": {
            "fine_tuned": fine_tuned, "pretrained": pretrained or ["base", 0], "positive": ["caption", 0],
            "negative": ["empty", 0], "mode": mode, "guidance_scale": guidance_scale, "k": k,
            "latent_image": ["latent", 0], "seed": seed, "steps": steps, "sampler_name": "ddim",
            "scheduler": "ddim_uniform", "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["base", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": prefix}},
    }


def write_demo_models(models: str) -> None:
    """The demo models, written into a ComfyUI models/ folder; skipped when this version is already there."""
    stamp = os.path.join(models, ".demo-models-version")
    if os.path.exists(stamp) and open(stamp).read() == DEMO_MODELS_VERSION:
        return
    from comfy_inprocess import load_host  # ComfyUI's own modules give the layer shapes
    import tiny_models

    load_host()
    unet = tiny_models.sd15_unet(seed=1)
    for sub in ("checkpoints", "diffusion_models", "loras"):
        os.makedirs(os.path.join(models, sub), exist_ok=True)
    tiny_models.save_sd15_checkpoint(os.path.join(models, "checkpoints", "base.safetensors"), unet)
    tiny_models.save_unet(os.path.join(models, "diffusion_models", "dreambooth.safetensors"),
                          tiny_models.fine_tune_of(unet, seed=2))
    tiny_models.save_unet(os.path.join(models, "loras", "style.safetensors"), tiny_models.attention_lora(unet, seed=3))
    with open(stamp, "w") as f:
        f.write(DEMO_MODELS_VERSION)


def write_workflow_demo_models(models: str) -> None:
    """The demo models plus what the example workflows also load: the DreamBooth fine-tune as a full checkpoint
    (the base's text encoder and VAE, so both loaders give the same CLIP) and an SSCD file."""
    write_demo_models(models)
    stamp = os.path.join(models, ".workflow-demo-files-version")
    if os.path.exists(stamp) and open(stamp).read() == DEMO_WORKFLOW_FILES_VERSION:
        return
    from comfy_inprocess import load_host  # ComfyUI's own modules give the layer shapes
    import tiny_models
    from safetensors.torch import load_file, save_file

    load_host()
    unet = load_file(os.path.join(models, "diffusion_models", "dreambooth.safetensors"))
    tiny_models.save_sd15_checkpoint(os.path.join(models, "checkpoints", "dreambooth.safetensors"), unet)
    os.makedirs(os.path.join(models, "sscd"), exist_ok=True)
    save_file(centred_random_sscd(), os.path.join(models, "sscd", DEMO_SSCD))
    with open(stamp, "w") as f:
        f.write(DEMO_WORKFLOW_FILES_VERSION)


def centred_random_sscd(seed: int = 0) -> dict:
    """State dict of a ResNet-50 SSCD with seeded random weights whose projection is centred on the mean feature of
    random smooth images: a random trunk maps every image to nearly the same pooled feature (all ReLU outputs are
    positive), and centring leaves how an image differs from a typical one, so unrelated images come out roughly
    uncorrelated, as with the trained model."""
    import torch
    from finextract_core import sscd

    torch.manual_seed(seed)
    model = sscd.SSCDModel(sscd.RESNET50, "demo_sscd").eval()
    with torch.no_grad():
        typical = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(seed + 100))
        typical = torch.nn.functional.interpolate(typical, size=(64, 64), mode="bicubic").clamp(0, 1)
        pooled = model.embeddings[0](model.backbone(sscd.preprocess(typical.permute(0, 2, 3, 1), "paper")))
        projection = model.embeddings[1]
        projection.bias.copy_(-projection.weight @ pooled.mean(dim=0))
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def demo_prompt(workflow: str, object_info: dict, *, n0: int, candidates: int, steps: int, size: int) -> dict:
    """An example workflow in API form, with the demo files and a small run (size, candidates, steps, N0)."""
    with open(os.path.join(make_workflows.WORKFLOWS_DIR, f"{workflow}.json")) as f:
        prompt = ui_to_api(json.load(f), object_info)
    small_run = {
        "EmptyLatentImage": {"width": size, "height": size, "batch_size": candidates},
        "FineXtractModelGuidanceSampler": {"steps": steps},
        "FineXtractCliqueCluster": {"n0": n0},
    }
    for node in prompt.values():
        inputs = node["inputs"]
        inputs.update({name: DEMO_FILES[value] for name, value in inputs.items()
                       if isinstance(value, str) and value in DEMO_FILES})
        inputs.update(small_run.get(node["class_type"], {}))
    return prompt
