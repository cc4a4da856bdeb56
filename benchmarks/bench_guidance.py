"""FineXtract vs CFG on the same model, batch, steps and seeds: seconds per sampling step and peak memory.

Case (a) DreamBooth: the fine-tuned and pretrained UNets are two files, both loaded (FineXtract needs both).
Case (b) LoRA: base + LoRA through ComfyUI's LoRA loader; FineXtract splits the shared base with conditioning hooks.
The CFG baseline is ComfyUI's own CFGGuider on the fine-tuned model (w' = 3), the FineXtract run is the pack's guider
(w' = 3, k = -0.02 for (a); w' = 5, k = 0 for (b)). Seconds per step are the slope between a short and a long run
(what a run pays once, such as merging the LoRA weights, is reported apart); peak memory is the process's peak RSS
while sampling, models included. Each (case, method) runs in a fresh worker process so its peak
RSS is its own; the workers are interleaved over the repeats and the medians reported, with their ratios.

    .host/venv/bin/python -m benchmarks.bench_guidance [--steps 8] [--batch 2] [--latent 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# SD 1.x-shaped, two levels: big enough (about 60 M parameters) that the weights, not the interpreter, set the memory.
UNET = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1, 1], channel_mult=[1, 2],
    transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1, context_dim=768,
    num_heads=8, use_linear_in_transformer=False, use_spatial_transformer=True, legacy=False, adm_in_channels=None,
    use_temporal_attention=False, use_temporal_resblock=False,
)
CASES = {"dreambooth": {"scale": 3.0, "k": -0.02}, "lora": {"scale": 5.0, "k": 0.0}}


def memory_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def reset_peak_memory() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def build_models(folder: str) -> None:
    from fixtures import tiny_models
    from tools.host.comfy_inprocess import load_host

    load_host()
    base = tiny_models.random_like(tiny_models.unet_shapes(UNET), seed=1)
    tiny_models.save_unet(os.path.join(folder, "base.safetensors"), base)
    tiny_models.save_unet(os.path.join(folder, "dreambooth.safetensors"), tiny_models.fine_tune_of(base, seed=2))
    tiny_models.save_unet(os.path.join(folder, "lora.safetensors"), tiny_models.attention_lora(base, seed=3))


def worker(case: str, method: str, folder: str, steps: int, batch: int, latent: int) -> dict:
    import torch

    from tools.host.comfy_inprocess import load_host

    host = load_host()
    import comfy.samplers
    import comfy.sd
    import comfy.utils

    before = memory_mb("VmRSS")
    # CFG on a DreamBooth needs only the fine-tuned checkpoint; everything else needs the base.
    needs_base = not (case == "dreambooth" and method == "cfg")
    base = comfy.sd.load_diffusion_model(os.path.join(folder, "base.safetensors")) if needs_base else None
    if case == "dreambooth":
        fine_tuned = comfy.sd.load_diffusion_model(os.path.join(folder, "dreambooth.safetensors"))
    else:
        lora = comfy.utils.load_torch_file(os.path.join(folder, "lora.safetensors"), safe_load=True)
        fine_tuned = comfy.sd.load_lora_for_models(base, None, lora, 1.0, 0.0)[0]
    gen = torch.Generator().manual_seed(0)
    caption = [[torch.randn(1, 77, 768, generator=gen), {}]]
    empty = [[torch.randn(1, 77, 768, generator=gen), {}]]
    if method == "cfg":
        guider = comfy.samplers.CFGGuider(fine_tuned)
        guider.set_conds(caption, empty)
        guider.set_cfg(3.0)
    else:
        guider = host.module("nodes.guider").build_guider(fine_tuned, base, caption, empty, "finextract", **CASES[case])
    latent_batch = {"samples": torch.zeros(batch, 4, latent, latent)}

    def timed_run(n: int) -> float:
        start = time.perf_counter()
        host.module("nodes.sampling").sample_with_guider(guider, latent_batch, seed=0, steps=n, sampler_name="ddim",
                                               scheduler="ddim_uniform", denoise=1.0)
        return time.perf_counter() - start

    timed_run(2)  # warm-up: first load and allocation
    reset_peak_memory()
    short, long = timed_run(2), timed_run(2 + steps)
    # The slope is the cost of a step; what a run pays once (loading, patching the LoRA) is the intercept.
    per_step = (long - short) / steps
    peak = memory_mb("VmHWM")
    return {"s_per_step": per_step, "s_per_run": short - 2 * per_step, "peak_mb": peak, "model_mb": peak - before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--latent", type=int, default=16, help="latent side (pixels / 8)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", nargs=3, metavar=("CASE", "METHOD", "FOLDER"), help=argparse.SUPPRESS)
    parser.add_argument("--build", metavar="FOLDER", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.build:
        build_models(opts.build)
        return
    if opts.worker:
        case, method, folder = opts.worker
        print(json.dumps(worker(case, method, folder, opts.steps, opts.batch, opts.latent)))
        return

    with tempfile.TemporaryDirectory() as folder:
        subprocess.run([sys.executable, "-m", "benchmarks.bench_guidance", "--build", folder], check=True,
                       capture_output=True, cwd=REPO_ROOT)
        results = {(case, method): [] for case in CASES for method in ("cfg", "finextract")}
        for _ in range(opts.repeats):
            for case, method in results:
                out = subprocess.run(
                    [sys.executable, "-m", "benchmarks.bench_guidance", "--worker", case, method, folder,
                     "--steps", str(opts.steps), "--batch", str(opts.batch), "--latent", str(opts.latent)],
                    capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), check=True,
                    cwd=REPO_ROOT)
                results[case, method].append(json.loads(out.stdout.strip().splitlines()[-1]))

    print(f"batch {opts.batch}, latent {opts.latent}x{opts.latent}, {opts.steps} ddim steps, {opts.repeats} repeats "
          f"(medians), 1 CPU thread per worker")
    print(f"{'case':<11} {'method':<11} {'s/step':>8} {'s/run once':>10} {'peak RSS MB':>12} {'models+sampling MB':>19}")
    medians = {}
    for (case, method), runs in results.items():
        medians[case, method] = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        m = medians[case, method]
        print(f"{case:<11} {method:<11} {m['s_per_step']:>8.3f} {m['s_per_run']:>10.3f} {m['peak_mb']:>12.0f} "
              f"{m['model_mb']:>19.0f}")
    for case in CASES:
        fx, cfg = medians[case, "finextract"], medians[case, "cfg"]
        print(f"{case}: FineXtract / CFG time {fx['s_per_step'] / cfg['s_per_step']:.2f}x, "
              f"peak RSS {fx['peak_mb'] / cfg['peak_mb']:.2f}x, models+sampling {fx['model_mb'] / cfg['model_mb']:.2f}x")


if __name__ == "__main__":
    main()
