"""The main job: FineXtract's DreamBooth and LoRA example workflows run on a small trained world through a real
ComfyUI server, extracting the world's fine-tuning images.

1. Builds (once, then reuses from cache/demo_world/<spec digest>) a small demo world from the proving ground
   (lab/world): a 32x32 text-to-image diffusion model pretrained on procedural images, fine-tuned
   DreamBooth-style and with a kohya LoRA with conv layers (LoCon) on N0 real photos from scikit-image's sample
   images, captioned "a sks photo".
2. Starts ComfyUI headless on 127.0.0.1 and converts workflows/finextract_dreambooth_one_batch.json and
   workflows/finextract_lora_one_batch.json to API form, with the world's nodes swapped in: World Loader for the
   checkpoint
   loaders, World Text Encode for CLIPTextEncode, World Decode for VAEDecode, World Embed for SSCD Embed (SSCD is
   meaningless at 32x32). The LoRA goes through ComfyUI's own LoraLoaderModelOnly. Extraction Metrics against the
   fine-tuning images is added, so each audit report scores what was extracted.
3. Queues both over the HTTP API (N = 50 x N0 candidates, the paper's w' and k) and copies each audit report
   (report.html, summary.png, the extracted images, report.json with the SHA-256 of every world file) to OUT/<case>/.

    python -m lab.demo [--out out/demo] [--n0 3] [--steps 20]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tools.host.comfy_server import REPO_ROOT, ComfyServer, execution_error
from tools.workflows import make_workflows
from tools.workflows.workflow_api import ui_to_api

if TYPE_CHECKING:
    import numpy as np

# ---------------------------------------------------------------------------------------------- the demo world
# The proving ground's world takes 1,000 steps with 32 channels at 32x32; this one, 500 steps with 16 there, builds in
# about 2 minutes on 2 cores, so that the main job fits its 15 minutes from nothing on the slower machine kind (the
# wide one costs 1.4x per pretraining step and 1.5x per sampling step), and its fine-tunes still extract a photo above
# 0.6 in both halves: its LoRA half is a LoCon, which reaches the fine detail through the convolutions.
PRETRAINING_STEPS = 500
WORLD_CHANNELS = (16, 32, 64)
TRAINING_THREADS = 2  # part of the world's spec and of the fine-tunes' settings (they change the weights' last bits)
WORLD_LINK = "finextract_demo_world"  # the world's folder as it appears in ComfyUI's model lists
REFERENCES = "demo_fine_tuning_images"  # under ComfyUI's input folder


@dataclass(frozen=True)
class DemoWorld:
    folder: str
    caption: str
    image_names: list[str]
    images: "np.ndarray"  # (N0, 3, 32, 32) in [-1, 1], what the fine-tunes saw
    fine_tunes: dict[str, str]  # style -> path of the fine-tune file


def demo_world_spec(pretraining_steps: int, seed: int = 0):
    from .world.store import WorldSpec
    from .world.training import PretrainSettings
    from .world.unet import UNetConfig

    return WorldSpec(seed=seed, unet=UNetConfig(channels=WORLD_CHANNELS),
                     pretraining=PretrainSettings(steps=pretraining_steps, threads=TRAINING_THREADS))


# The fine-tune each half of the demo runs on: DreamBooth, and for the LoRA half kohya's LoRA with conv layers
# (LoCon), as much of what the community shares is; the attention-only LoRA stops at 40% memorisation here.
DEMO_FINE_TUNES = {"dreambooth": "dreambooth", "lora": "locon"}


def fine_tune_settings(steps: int | None) -> dict:
    """The proving ground's 'saturated' strength per half (trained until 70% of the way from the pretrained model to
    an exact memoriser of the N0 photos, under a step cap): the paper's high-lambda regime, where extraction works.
    ``steps`` lowers the cap (a quicker demo, or a test)."""
    from dataclasses import replace

    from .world.training import STRENGTHS

    saturated = {half: replace(STRENGTHS[kind]["saturated"], threads=TRAINING_THREADS)
                 for half, kind in DEMO_FINE_TUNES.items()}
    return {half: settings if steps is None else replace(settings, steps=min(steps, settings.steps))
            for half, settings in saturated.items()}


def build_demo_world(cache: str, n0: int, pretraining_steps: int, fine_tune_steps: int | None,
                     progress, world_seed: int = 0) -> DemoWorld:
    """The world and its two fine-tunes, built once (the same spec gives the same weights) and reused from
    ``cache/<spec digest>``."""
    import numpy as np
    from .world import data, store
    from .world.text import concept_caption

    spec = demo_world_spec(pretraining_steps, world_seed)
    folder = os.path.join(cache, spec.digest())
    cached = os.path.exists(os.path.join(folder, store.SPEC_FILE))
    with progress.ticking(f"demo world: reusing {folder}" if cached else
                          f"demo world: building {folder} ({pretraining_steps} pretraining steps, a few minutes)"):
        world = store.build_or_load(folder, spec)
    (paths,) = data.split_concepts(data.default_image_paths(), 1, n0)
    images = np.stack([data.load_image(p) for p in paths])
    caption = concept_caption(0)
    fine_tunes = {}
    for style, settings in fine_tune_settings(fine_tune_steps).items():
        with progress.ticking(f"{style} fine-tune on {n0} photos captioned {caption!r}"):
            fine_tunes[style] = store.build_or_load_fine_tune(world, images, caption, settings, seed=0)
    names = [os.path.splitext(os.path.basename(p))[0] + ".png" for p in paths]
    return DemoWorld(folder, caption, names, images, fine_tunes)


def install_world(demo: DemoWorld, comfy_base: str) -> dict[str, str]:
    """Links the world into ComfyUI's model folders (so the Audit Report lists and hashes its files) and writes the
    fine-tuning images as references; returns the report's file names per role."""
    import numpy as np
    from PIL import Image

    links = {os.path.join(comfy_base, "models", "diffusion_models", WORLD_LINK): demo.folder,
             os.path.join(comfy_base, "models", "loras", WORLD_LINK): os.path.dirname(demo.fine_tunes["lora"])}
    for link, target in links.items():
        if os.path.islink(link) and os.readlink(link) != target:
            os.remove(link)  # a world of another spec
        if not os.path.islink(link):
            os.symlink(target, link)
    references = os.path.join(comfy_base, "input", REFERENCES)
    shutil.rmtree(references, ignore_errors=True)
    os.makedirs(references)
    for name, image in zip(demo.image_names, demo.images):
        pixels = np.round((image.transpose(1, 2, 0) + 1) * 127.5).astype(np.uint8)  # exact: load_image gave k / 255
        Image.fromarray(pixels).save(os.path.join(references, name))
    return {"pretrained": f"{WORLD_LINK}/pretrained.safetensors",
            "dreambooth": f"{WORLD_LINK}/finetunes/{os.path.basename(demo.fine_tunes['dreambooth'])}",
            "lora": f"{WORLD_LINK}/{os.path.basename(demo.fine_tunes['lora'])}"}


def world_prompt(workflow: str, object_info: dict, demo: DemoWorld, files: dict[str, str], references: str, *,
                 n0: int, steps: int) -> dict:
    """An example workflow in API form on the demo world: the world's loader, text encoder, decoder and descriptor in
    place of the checkpoint loaders, CLIPTextEncode, VAEDecode and SSCD Embed, and metrics against the references."""
    from .world.data import RESOLUTION

    with open(os.path.join(make_workflows.WORKFLOWS_DIR, f"{workflow}.json")) as f:
        prompt = ui_to_api(json.load(f), object_info)
    fine_tune = os.path.basename(demo.fine_tunes["dreambooth"])
    report_files = {make_workflows.BASE_FILE: files["pretrained"], make_workflows.DREAMBOOTH_FILE: files["dreambooth"],
                    make_workflows.LORA_FILE: files["lora"]}
    reports = []
    for node in prompt.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CheckpointLoaderSimple":  # outputs MODEL, CLIP, VAE -> MODEL, text_encoder
            tuned = inputs["ckpt_name"] == make_workflows.DREAMBOOTH_FILE
            node.update(class_type="FineXtractWorldLoader",
                        inputs={"world": demo.folder, "fine_tune": fine_tune if tuned else ""})
        elif kind == "CLIPTextEncode":
            node.update(class_type="FineXtractWorldTextEncode",
                        inputs={"text_encoder": inputs["clip"], "text": demo.caption if inputs["text"] else ""})
        elif kind == "VAEDecode":
            node.update(class_type="FineXtractWorldDecode", inputs={"samples": inputs["samples"]})
        elif kind == "FineXtractSSCDEmbed":
            node.update(class_type="FineXtractWorldEmbed", inputs={"images": inputs["images"]})
        elif kind == "LoraLoaderModelOnly":
            inputs["lora_name"] = files["lora"]
        elif kind == "EmptyLatentImage":  # latents are 1/8 of the size asked for: 8 x 32 gives the world's 32 px
            inputs.update(width=8 * RESOLUTION, height=8 * RESOLUTION, batch_size=50 * n0)
        elif kind == "FineXtractModelGuidanceSampler":
            inputs["steps"] = steps
        elif kind == "FineXtractCliqueClusterV2":
            inputs["n0"] = n0
        elif kind == "FineXtractAuditReportV2":
            inputs.update({name: report_files.get(value, value) for name, value in inputs.items()
                           if isinstance(value, str)})
            reports.append(node)
    (report,) = reports
    prompt["demo_references"] = {"class_type": "FineXtractLoadReferenceImages",
                                 "inputs": {"folder": references, "size": RESOLUTION}}
    prompt["demo_reference_embed"] = {"class_type": "FineXtractWorldEmbed",
                                      "inputs": {"images": ["demo_references", 0]}}
    prompt["demo_metrics"] = {"class_type": "FineXtractExtractionMetrics", "inputs": {
        "references": ["demo_references", 0], "reference_embeddings": ["demo_reference_embed", 0],
        "extracted": report["inputs"]["extracted"], "extracted_embeddings": [report["inputs"]["extracted"][0], 1],
        "loose_threshold": 0.6, "strict_threshold": 0.7}}
    report["inputs"].update(references=["demo_references", 0], scores=["demo_metrics", 6],
                            reference_names=["demo_references", 1])
    return prompt


def report_folders(prompt: dict, output: str) -> list[str]:
    """Where the prompt's Audit Report nodes write, under ComfyUI's output directory."""
    return [os.path.join(output, node["inputs"]["folder_prefix"]) for node in prompt.values()
            if node["class_type"] in ("FineXtractAuditReportV2", "FineXtractAuditReport")]


class Progress:
    """Progress lines: ``[demo   42 s] message``, and a line every ``every`` seconds while something long runs."""

    def __init__(self, every: float = 15.0):
        self.started = time.monotonic()
        self.every = every

    def __call__(self, message: str) -> None:
        print(f"[demo {time.monotonic() - self.started:5.0f} s] {message}", flush=True)

    @contextlib.contextmanager
    def ticking(self, message: str):
        self(message)
        began, done = time.monotonic(), threading.Event()

        def tick() -> None:
            while not done.wait(self.every):
                self(f"  ... {message.split(' (')[0]}: {time.monotonic() - began:.0f} s")

        thread = threading.Thread(target=tick, daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "out", "demo"))
    parser.add_argument("--cache", default=os.path.join(REPO_ROOT, "cache", "demo_world"),
                        help="where demo worlds are kept, one folder per spec digest")
    parser.add_argument("--n0", type=int, default=3, help="fine-tuning photos (N0); N = 50 x N0 candidates")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps")
    parser.add_argument("--pretraining-steps", type=int, default=PRETRAINING_STEPS)
    parser.add_argument("--world-seed", type=int, default=0, help="the world's seed (its initial weights and "
                        "pretraining data); another seed is another world, to check that a result is not one world's luck")
    parser.add_argument("--fine-tune-steps", type=int, help="cap on fine-tuning steps (default: the proving "
                        "ground's 'saturated' strength)")
    opts = parser.parse_args(argv)
    out = os.path.abspath(opts.out)
    comfy_base = os.path.join(out, "comfy")
    progress = Progress()
    logging.basicConfig(level=logging.INFO, format="             %(message)s", stream=sys.stdout)

    demo = build_demo_world(os.path.abspath(opts.cache), opts.n0, opts.pretraining_steps, opts.fine_tune_steps,
                            progress, opts.world_seed)
    os.makedirs(os.path.join(comfy_base, "models", "diffusion_models"), exist_ok=True)
    os.makedirs(os.path.join(comfy_base, "models", "loras"), exist_ok=True)
    os.makedirs(os.path.join(comfy_base, "input"), exist_ok=True)
    files = install_world(demo, comfy_base)
    references = os.path.join(comfy_base, "input", REFERENCES)
    progress("starting ComfyUI on 127.0.0.1")
    with ComfyServer(comfy_base) as server:
        object_info = server.get("/object_info")
        for case in ("dreambooth", "lora"):
            workflow = f"finextract_{case}_one_batch"
            prompt = world_prompt(workflow, object_info, demo, files, references, n0=opts.n0, steps=opts.steps)
            with progress.ticking(f"{case}: workflows/{workflow}.json on the world, N = {50 * opts.n0} candidates, "
                                  f"N0 = {opts.n0}, {opts.steps} steps"):
                entry = server.run(prompt)
            error = execution_error(entry)
            if error:
                print(f"[demo] {case} failed: {error}\nComfyUI log: {server.log_path}", file=sys.stderr)
                return 1
            (report_folder,) = report_folders(prompt, os.path.join(server.base, "output"))
            target = os.path.join(out, case)
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(report_folder, target)
            with open(os.path.join(target, "report.json")) as f:
                report = json.load(f)
            scores = ", ".join(f"{row['name']} {row['score']:.2f}" for row in report["references"])
            rates = ", ".join(f"A-ESR>{t} {r:.2f}" for t, r in sorted(report["metrics"]["A-ESR"].items()))
            progress(f"{case}: AS {report['metrics']['AS']:.3f}, {rates} (best match per photo: {scores}); "
                     f"cluster sizes {report['clustering']['sizes']}; report {target}/report.html")
    progress(f"done: extracted images and audit reports in {out}/dreambooth and {out}/lora")
    return 0


if __name__ == "__main__":
    sys.exit(main())
