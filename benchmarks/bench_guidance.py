"""FineXtract vs CFG on the same model, batch, steps and seeds: seconds per sampling step and peak memory.

Case (a) DreamBooth: the fine-tuned and pretrained UNets are two models, both loaded (FineXtract needs both).
Case (b) LoRA: base + an attention LoRA (rank 4) through ComfyUI's LoRA loader; FineXtract splits the shared base
either with the side branch (one forward of the whole batch, the LoRA added to the fine-tuned rows) or with
ComfyUI's conditioning hooks (two forwards, the LoRA swapped in and out).
The CFG baseline is ComfyUI's own CFGGuider on the fine-tuned model (w' = 3), the FineXtract run is the pack's guider
(w' = 3, k = -0.02 for (a); w' = 5, k = 0 for (b)). Seconds per step are the slope between a short and a long run
(what a run pays once, such as merging the LoRA weights, is reported apart). Memory is the peak of models + sampling:
the process's peak RSS while sampling less its RSS before the models were built (on CUDA: peak allocated GPU memory).
Each (case, method) runs in a fresh worker process so its peak is its own; the workers are interleaved over the
repeats and the medians reported, with their ratios to CFG.

Sizes (random weights built in memory by ComfyUI's own loader, never written to disk):
  small  the 60 M-parameter SD 1.x-shaped UNet (two levels), fp32
  sd15   the full SD 1.5 UNet (860 M parameters), fp32
  sdxl   the full SDXL UNet (2.6 G parameters), bf16 (about 5 GiB per copy; DreamBooth holds two)
``--floor`` adds what two forwards of batch B cost against one of 2B on the bare UNet: the least that any exact way
of evaluating two different models (DreamBooth) can pay over CFG on this machine.

    .host/venv/bin/python -m benchmarks.bench_guidance [--size small|sd15|sdxl] [--steps 8] [--batch 2]
        [--latent 16] [--repeats 3] [--floor] [--only dreambooth|lora|floor] [--dtype fp32|fp16|bf16] [--threads 1]
FINEXTRACT_DEVICE=cuda runs it on the GPU (see benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# SD 1.x-shaped, two levels: big enough (about 60 M parameters) that the weights, not the interpreter, set the memory.
SMALL_UNET = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1, 1], channel_mult=[1, 2],
    transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1, context_dim=768,
    num_heads=8, use_linear_in_transformer=False, use_spatial_transformer=True, legacy=False, adm_in_channels=None,
    use_temporal_attention=False, use_temporal_resblock=False,
)
SIZES = {"small": ("SMALL_UNET", "fp32"), "sd15": ("SD15_FULL_UNET", "fp32"), "sdxl": ("SDXL_FULL_UNET", "bf16")}
CASES = {"dreambooth": {"scale": 3.0, "k": -0.02}, "lora": {"scale": 5.0, "k": 0.0}}
RUNS = [("dreambooth", "cfg"), ("dreambooth", "finextract"),
        ("lora", "cfg"), ("lora", "finextract side branch"), ("lora", "finextract hooks")]
FLOOR = ("dreambooth", "2 forwards of B vs 1 of 2B")


def memory_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def reset_peak_memory() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


class MemoryMeter:
    """Peak memory of models + sampling: host RSS on the CPU, allocated GPU memory on CUDA."""

    def __init__(self, torch, device):
        self.torch, self.cuda = torch, device.type == "cuda"
        self.before = self.now()

    def now(self) -> float:
        return self.torch.cuda.memory_allocated() / 2 ** 20 if self.cuda else memory_mb("VmRSS")

    def reset_peak(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()
        else:
            reset_peak_memory()

    def peak(self) -> float:
        return self.torch.cuda.max_memory_allocated() / 2 ** 20 if self.cuda else memory_mb("VmHWM")


def conditioning(torch, context_dim: int, adm: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    extra = {"pooled_output": torch.randn(1, 1280, generator=gen)} if adm else {}
    return [[torch.randn(1, 77, context_dim, generator=gen), extra]]


def worker(case: str, method: str, opts) -> dict:
    import torch

    from tools.host.comfy_inprocess import load_host

    host = load_host(threads=opts.threads)
    import comfy.model_management
    import comfy.samplers
    import comfy.sd

    from fixtures import tiny_models

    device = comfy.model_management.get_torch_device()
    meter = MemoryMeter(torch, device)
    config_name, default_dtype = SIZES[opts.size]
    config = SMALL_UNET if config_name == "SMALL_UNET" else getattr(tiny_models, config_name)
    dtype = getattr(torch, {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[opts.dtype or default_dtype])
    adm = config.get("adm_in_channels") is not None
    caption = conditioning(torch, config["context_dim"], adm, 0)
    empty = conditioning(torch, config["context_dim"], adm, 1)
    if method == FLOOR[1]:
        return forward_floor(torch, tiny_models.full_size_patcher(config, 1, dtype), caption, opts, device, meter)
    # CFG on a DreamBooth needs only the fine-tuned model; everything else needs the base.
    needs_base = not (case == "dreambooth" and method == "cfg")
    base = tiny_models.full_size_patcher(config, 1, dtype) if needs_base else None
    if case == "dreambooth":
        fine_tuned = tiny_models.full_size_patcher(config, 1, dtype, fine_tune_seed=2)
    else:
        lora = tiny_models.attention_lora(base.model.diffusion_model.state_dict(), seed=3)
        fine_tuned = comfy.sd.load_lora_for_models(base, None, lora, 1.0, 0.0)[0]
    latent_batch = {"samples": torch.zeros(opts.batch, 4, opts.latent, opts.latent)}
    if method == "cfg":
        guider = comfy.samplers.CFGGuider(fine_tuned)
        guider.set_conds(caption, empty)
        guider.set_cfg(3.0)
    else:
        guider = host.module("nodes.guider").build_guider(
            fine_tuned, base, caption, empty, "finextract", **CASES[case], allow_side_branch=not method.endswith("hooks"))

    def timed_run(n: int) -> tuple[float, float]:
        """(wall, CPU) seconds of an n-step run."""
        if meter.cuda:
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        host.module("nodes.sampling").sample_with_guider(guider, latent_batch, seed=0, steps=n, sampler_name="ddim",
                                                         scheduler="ddim_uniform", denoise=1.0)
        if meter.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - wall, time.process_time() - cpu

    timed_run(2)  # warm-up: first load and allocation
    meter.reset_peak()
    (short, short_cpu), (long, long_cpu) = timed_run(2), timed_run(2 + opts.steps)
    # The slope is the cost of a step; what a run pays once (loading, patching the LoRA) is the intercept. CPU seconds
    # are what the worker itself spent: on a shared machine they do not grow with the time others take from it.
    per_step = (long - short) / opts.steps
    peak = meter.peak()
    return {"s_per_step": per_step, "cpu_s_per_step": (long_cpu - short_cpu) / opts.steps,
            "s_per_run": short - 2 * per_step, "peak_mb": peak, "model_mb": peak - meter.before}


def forward_floor(torch, patcher, caption, opts, device, meter) -> dict:
    """Seconds of one UNet forward of batch B (twice) against one of 2B: at sizes where a forward's cost does not grow
    with its batch (weights read and reordered per call), two models cannot cost what one forward of both costs."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher])
    model = patcher.model

    def forward(batch: int) -> tuple[float, float]:
        x = torch.randn(batch, 4, opts.latent, opts.latent, device=device)
        sigma = torch.full((batch,), 5.0, device=device)
        kwargs = {"c_crossattn": caption[0][0].repeat(batch, 1, 1).to(device)}
        if "pooled_output" in caption[0][1]:
            kwargs["y"] = torch.zeros(batch, model.adm_channels, device=device)
        with torch.inference_mode():
            if meter.cuda:
                torch.cuda.synchronize()
            wall, cpu = time.perf_counter(), time.process_time()
            model.apply_model(x, sigma, **kwargs)
            if meter.cuda:
                torch.cuda.synchronize()
        return time.perf_counter() - wall, time.process_time() - cpu

    forward(2 * opts.batch)  # warm-up
    two = []
    for _ in range(2):
        (first, first_cpu), (second, second_cpu) = forward(opts.batch), forward(opts.batch)
        two.append((first + second, first_cpu + second_cpu))
    one = [forward(2 * opts.batch) for _ in range(2)]
    return {"two_forwards": min(w for w, _ in two), "two_forwards_cpu": min(c for _, c in two),
            "one_forward": min(w for w, _ in one), "one_forward_cpu": min(c for _, c in one)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--latent", type=int, default=16, help="latent side (pixels / 8)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="weights' dtype (default: the size's)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--floor", action="store_true", help="also time two forwards of B against one of 2B")
    parser.add_argument("--only", choices=[*sorted(CASES), "floor"], help="run one case only, or only the floor")
    parser.add_argument("--worker", nargs=2, metavar=("CASE", "METHOD"), help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.worker:
        print(json.dumps(worker(*opts.worker, opts)))
        return

    runs = [run for run in RUNS if opts.only in (None, run[0])] + ([FLOOR] if opts.floor or opts.only == "floor" else [])
    results = {run: [] for run in runs}
    forwarded = ["--size", opts.size, "--steps", str(opts.steps), "--batch", str(opts.batch),
                 "--latent", str(opts.latent), "--threads", str(opts.threads)] + (["--dtype", opts.dtype] if opts.dtype else [])
    for _ in range(opts.repeats):
        for case, method in runs:
            out = subprocess.run([sys.executable, "-m", "benchmarks.bench_guidance", "--worker", case, method, *forwarded],
                                 capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(opts.threads)),
                                 cwd=REPO_ROOT)
            if out.returncode != 0:
                sys.exit(f"worker {case} / {method} failed:\n{out.stderr[-3000:]}")
            results[case, method].append(json.loads(out.stdout.strip().splitlines()[-1]))

    dtype = opts.dtype or SIZES[opts.size][1]
    print(f"size {opts.size} ({dtype}), batch {opts.batch} (CFG and FineXtract evaluate {2 * opts.batch} rows per step), "
          f"latent {opts.latent}x{opts.latent}, {opts.steps} ddim steps, {opts.repeats} repeats (medians), "
          f"{opts.threads} torch thread(s) per worker, device {os.environ.get('FINEXTRACT_DEVICE', 'cpu')}")
    print(f"{'case':<11} {'method':<27} {'s/step':>8} {'CPU s/step':>10} {'s/run once':>10} {'peak MB':>9} "
          f"{'models+sampling MB':>19}")
    medians = {run: {key: statistics.median(r[key] for r in results[run]) for key in results[run][0]}
               for run in results}
    for (case, method), m in medians.items():
        if (case, method) != FLOOR:
            print(f"{case:<11} {method:<27} {m['s_per_step']:>8.3f} {m['cpu_s_per_step']:>10.3f} {m['s_per_run']:>10.3f} "
                  f"{m['peak_mb']:>9.0f} {m['model_mb']:>19.0f}")
    for (case, method), fx in medians.items():
        if method == "cfg" or (case, method) == FLOOR:
            continue
        cfg = medians[case, "cfg"]
        print(f"{case} {method} / CFG: time per step {fx['s_per_step'] / cfg['s_per_step']:.2f}x (CPU time "
              f"{fx['cpu_s_per_step'] / cfg['cpu_s_per_step']:.2f}x), peak {fx['peak_mb'] / cfg['peak_mb']:.2f}x, "
              f"models+sampling {fx['model_mb'] / cfg['model_mb']:.2f}x")
    if FLOOR in medians:
        m = medians[FLOOR]
        print(f"UNet forwards: 2 of batch {opts.batch} {m['two_forwards']:.3f} s (CPU {m['two_forwards_cpu']:.3f}), "
              f"1 of batch {2 * opts.batch} {m['one_forward']:.3f} s (CPU {m['one_forward_cpu']:.3f}): "
              f"{m['two_forwards'] / m['one_forward']:.2f}x (CPU {m['two_forwards_cpu'] / m['one_forward_cpu']:.2f}x), "
              "the floor for two different models against CFG's one forward")


if __name__ == "__main__":
    main()
