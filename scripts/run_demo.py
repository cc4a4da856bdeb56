"""The main job: a FineXtract run on the built-in demo models, through a real ComfyUI server started here.

Builds (once, then reuses) small SD 1.x-shaped demo models: a base checkpoint, a DreamBooth-style fine-tuned UNet
and a LoRA. Starts ComfyUI headless on 127.0.0.1, queues the DreamBooth and the LoRA attack over the HTTP API
(N = 50 x N0 candidates each, with the paper's defaults), and leaves the images in OUT/images/<case>/.

    python scripts/run_demo.py [--out out/demo] [--n0 1] [--steps 10]

The demo models have random weights: the run shows the pipeline working end to end, not a real extraction.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from comfy_server import REPO_ROOT, ComfyServer, execution_error, saved_images  # noqa: E402

# Bump when the demo models change, so cached ones are rebuilt.
DEMO_MODELS_VERSION = "1"
CASES = {
    "dreambooth": {"fine_tuned": ["dreambooth", 0], "guidance_scale": 3.0, "k": -0.02},
    "lora": {"fine_tuned": ["lora", 0], "guidance_scale": 5.0, "k": 0.0},
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "out", "demo"))
    parser.add_argument("--n0", type=int, default=1, help="training images to extract; N = 50 x N0 candidates")
    parser.add_argument("--steps", type=int, default=10)
    opts = parser.parse_args()
    out = os.path.abspath(opts.out)
    comfy_base = os.path.join(out, "comfy")
    started = time.monotonic()

    def progress(message: str) -> None:
        print(f"[demo {time.monotonic() - started:5.0f} s] {message}", flush=True)

    progress("building or reusing the demo models")
    write_demo_models(os.path.join(comfy_base, "models"))
    progress("starting ComfyUI on 127.0.0.1")
    with ComfyServer(comfy_base) as server:
        for case, settings in CASES.items():
            n = 50 * opts.n0
            progress(f"{case}: sampling N = {n} candidates with FineXtract (w' = {settings['guidance_scale']}, "
                     f"k = {settings['k']})")
            prompt = attack_prompt(settings["fine_tuned"], f"demo_{case}", guidance_scale=settings["guidance_scale"],
                                   k=settings["k"], batch=n, steps=opts.steps)
            last = [time.monotonic()]

            def tick() -> None:
                if time.monotonic() - last[0] > 10:
                    last[0] = time.monotonic()
                    progress(f"{case}: still sampling")

            entry = server.run(prompt, on_progress=tick)
            error = execution_error(entry)
            if error:
                print(f"[demo] {case} failed: {error}\nComfyUI log: {server.log_path}", file=sys.stderr)
                return 1
            target = os.path.join(out, "images", case)
            shutil.rmtree(target, ignore_errors=True)
            os.makedirs(target)
            for path in saved_images(entry, server.base):
                shutil.move(path, os.path.join(target, os.path.basename(path)))
            progress(f"{case}: {len(os.listdir(target))} candidates in {target}")
    progress(f"done: results in {out}/images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
