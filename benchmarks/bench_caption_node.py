"""The Caption Inverter node on the real host at its default settings: wall time of whole inversions.

Run from the repository root: ``.host/venv/bin/python -m benchmarks.bench_caption_node [--iterations 1000]
[--threads 2] [--repeats 1]``.

The models: an SD 1.x checkpoint of fixtures.tiny_models (a small UNet, the full CLIP-L text encoder, random weights,
float16 as ComfyUI stores it) and a copy whose attn2 to_k / to_v weights are moved by a small random change (the
inversion's cost does not depend on what the change is). Both are loaded with CheckpointLoaderSimple and the node runs
as ComfyUI runs it (under inference mode) with its defaults: 3 words, 4 restarts, the whole-word vocabulary, the
search's candidate tokens ranked. CLIP-L at full size is what sets the cost; the small UNet only makes the scorer
cheaper to build (a second or two at SD 1.5's size, measured by bench_caption_inversion's whole inversion). The
plain benchmark (bench_caption_inversion) compares the paths before and after side by side.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from fixtures import tiny_models
from tools.host.comfy_inprocess import load_host

NODE_DEFAULTS = dict(max_words=3, restarts=4, seed=0, vocabulary="whole words",
                     single_token_ranking="search candidates", search_words="", excluded_words="")  # fmt: skip


def load() -> str:
    return "load average " + " ".join(f"{value:.2f}" for value in os.getloadavg())


def main(iterations: int, threads: int, repeats: int) -> None:
    host = load_host(threads)
    folder = tempfile.mkdtemp(prefix="bench-caption-")
    host.folder_paths.add_model_folder_path("checkpoints", folder)
    base = tiny_models.sd15_unet(seed=1)
    generator = torch.Generator().manual_seed(2)
    fine_tuned = {key: value + 1e-2 * value.abs().mean() * torch.randn(value.shape, generator=generator)
                  if key.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) else value
                  for key, value in base.items()}
    tiny_models.save_sd15_checkpoint(os.path.join(folder, "base.safetensors"), base, token_embedding_scale=6.0)
    tiny_models.save_sd15_checkpoint(os.path.join(folder, "fine_tuned.safetensors"), fine_tuned,
                                     token_embedding_scale=6.0)
    nodes = host.nodes.NODE_CLASS_MAPPINGS
    pretrained, clip = nodes["CheckpointLoaderSimple"]().load_checkpoint("base.safetensors")[:2]
    dreambooth = nodes["CheckpointLoaderSimple"]().load_checkpoint("fine_tuned.safetensors")[0]
    node = nodes["FineXtractCaptionInverter"]
    print(f"Caption Inverter on the host, torch threads {torch.get_num_threads()}, defaults {NODE_DEFAULTS}")
    for repeat in range(repeats):
        print(f"  {load()}")
        started, cpu_started = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            caption = node.execute(pretrained=pretrained, fine_tuned=dreambooth, clip=clip, iterations=iterations,
                                   **NODE_DEFAULTS).args[0]
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        # On a shared machine a one-thread run's CPU seconds are what an idle core's wall clock would be.
        print(f"  run {repeat + 1}: {iterations} iterations in {elapsed:.0f} s wall ({elapsed / 60:.2f} min, "
              f"{elapsed / max(iterations, 1):.3f} s per iteration, setup included), {cpu:.0f} s CPU "
              f"({cpu / 60:.2f} min); caption {caption!r}")
    print(f"  {load()}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=1)
    arguments = parser.parse_args()
    main(arguments.iterations, arguments.threads, arguments.repeats)
