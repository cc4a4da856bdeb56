"""FineXtract vs CFG on the same model, batch, steps and seeds: seconds per sampling step and peak memory.

Case (a) DreamBooth: the fine-tuned and pretrained UNets are two models, both loaded (FineXtract needs both).
Case (b) LoRA: base + an attention LoRA (rank 4) through ComfyUI's LoRA loader; FineXtract splits the shared base
either with the side branch (one forward of the whole batch, the LoRA added to the fine-tuned rows) or with
ComfyUI's conditioning hooks (two forwards, the LoRA swapped in and out).
The CFG baseline is ComfyUI's own CFGGuider on the fine-tuned model (w' = 3), the FineXtract run is the pack's guider
(w' = 3, k = -0.02 for (a); w' = 5, k = 0 for (b)).

Time: one process per case holds the case's models and runs its methods interleaved over the repeats (each repeat
runs each method for 2 and for 2 + steps steps), so a change in a shared machine's load reaches every method alike;
seconds per step are the slope (what a run pays once, such as merging the LoRA weights, is the intercept), medians
over the repeats, in wall seconds and in the CPU seconds the process itself spent.
Memory: one fresh process per (case, method), so its peak is its own: the peak of models + sampling, that is the
process's peak RSS during a 2-step run less its RSS before the models were built (on CUDA: peak allocated memory).

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

    def timed(self, function) -> tuple[float, float]:
        """(wall, CPU) seconds of ``function()``; on CUDA, the GPU's work included."""
        if self.cuda:
            self.torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        function()
        if self.cuda:
            self.torch.cuda.synchronize()
        return time.perf_counter() - wall, time.process_time() - cpu


def conditioning(torch, context_dim: int, adm: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    extra = {"pooled_output": torch.randn(1, 1280, generator=gen)} if adm else {}
    return [[torch.randn(1, 77, context_dim, generator=gen), extra]]


def build_case(case: str, methods: list[str], opts):
    """The models of ``case`` and what each of ``methods`` runs; returns (run(method, steps), meter)."""
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
    # CFG on a DreamBooth needs only the fine-tuned model, the floor only one model; the rest needs the base.
    base = None if case == "dreambooth" and methods == ["cfg"] else tiny_models.full_size_patcher(config, 1, dtype)
    if case == "lora":
        lora = tiny_models.attention_lora(base.model.diffusion_model.state_dict(), seed=3)
        fine_tuned = comfy.sd.load_lora_for_models(base, None, lora, 1.0, 0.0)[0]
    elif methods != [FLOOR[1]]:
        fine_tuned = tiny_models.full_size_patcher(config, 1, dtype, fine_tune_seed=2)
    guiders = {}
    for method in methods:
        if method == "cfg":
            guiders[method] = comfy.samplers.CFGGuider(fine_tuned)
            guiders[method].set_conds(caption, empty)
            guiders[method].set_cfg(3.0)
        elif method != FLOOR[1]:
            guiders[method] = host.module("nodes.guider").build_guider(
                fine_tuned, base, caption, empty, "finextract", **CASES[case],
                allow_side_branch=not method.endswith("hooks"))
    latent = {"samples": torch.zeros(opts.batch, 4, opts.latent, opts.latent)}
    sample = host.module("nodes.sampling").sample_with_guider

    def run(method: str, steps: int):
        if method == FLOOR[1]:
            return forward_floor(torch, base, caption, opts, device, meter)
        return meter.timed(lambda: sample(guiders[method], latent, seed=0, steps=steps, sampler_name="ddim",
                                          scheduler="ddim_uniform", denoise=1.0))

    return run, meter


def forward_floor(torch, patcher, caption, opts, device, meter) -> dict:
    """Seconds of two UNet forwards of batch B against one of 2B: at sizes where a forward's cost does not grow with
    its batch (weights read and reordered per call), two models cannot cost what one forward of both costs."""
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
            return meter.timed(lambda: model.apply_model(x, sigma, **kwargs))

    (first, first_cpu), (second, second_cpu) = forward(opts.batch), forward(opts.batch)
    one, one_cpu = forward(2 * opts.batch)
    return {"two_forwards": first + second, "two_forwards_cpu": first_cpu + second_cpu, "one_forward": one,
            "one_forward_cpu": one_cpu}


def memory_worker(case: str, method: str, opts) -> dict:
    """Peak memory of one method in a process of its own: models + a 2-step run after a warm-up run."""
    run, meter = build_case(case, [method], opts)
    run(method, 1)  # warm-up: first load and allocation
    meter.reset_peak()
    run(method, 2)
    peak = meter.peak()
    return {"peak_mb": peak, "model_mb": peak - meter.before}


def timing_worker(case: str, methods: list[str], opts) -> dict:
    """Seconds per step of every method of ``case`` in one process, interleaved over the repeats."""
    run, _ = build_case(case, methods, opts)
    for method in methods:
        run(method, 1)  # warm-up: first load and allocation
    rounds = {method: [] for method in methods}
    for _ in range(opts.repeats):
        for method in methods:
            if method == FLOOR[1]:
                rounds[method].append(run(method, 0))
                continue
            (short, short_cpu), (long, long_cpu) = run(method, 2), run(method, 2 + opts.steps)
            per_step = (long - short) / opts.steps
            rounds[method].append({"s_per_step": per_step, "cpu_s_per_step": (long_cpu - short_cpu) / opts.steps,
                                   "s_per_run": short - 2 * per_step})
    return {method: {key: statistics.median(r[key] for r in results) for key in results[0]}
            for method, results in rounds.items()}


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
    parser.add_argument("--memory-worker", nargs=2, metavar=("CASE", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--timing-worker", nargs="+", metavar="CASE METHOD", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.memory_worker:
        print(json.dumps(memory_worker(*opts.memory_worker, opts)))
        return
    if opts.timing_worker:
        print(json.dumps(timing_worker(opts.timing_worker[0], opts.timing_worker[1:], opts)))
        return

    runs = [run for run in RUNS if opts.only in (None, run[0])]
    forwarded = ["--size", opts.size, "--steps", str(opts.steps), "--batch", str(opts.batch), "--latent",
                 str(opts.latent), "--threads", str(opts.threads), "--repeats", str(opts.repeats)]
    forwarded += ["--dtype", opts.dtype] if opts.dtype else []

    def worker(*args) -> dict:
        out = subprocess.run([sys.executable, "-m", "benchmarks.bench_guidance", *args, *forwarded],
                             capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(opts.threads)),
                             cwd=REPO_ROOT)
        if out.returncode != 0:
            sys.exit(f"worker {args} failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    figures = {run: worker("--memory-worker", *run) for run in runs}
    timed = {case: [method for c, method in runs if c == case] for case in dict.fromkeys(c for c, _ in runs)}
    if opts.floor or opts.only == "floor":
        timed.setdefault(FLOOR[0], []).append(FLOOR[1])
    for case, methods in timed.items():
        for method, timing in worker("--timing-worker", case, *methods).items():
            figures.setdefault((case, method), {}).update(timing)

    dtype = opts.dtype or SIZES[opts.size][1]
    print(f"size {opts.size} ({dtype}), batch {opts.batch} (CFG and FineXtract evaluate {2 * opts.batch} rows per step), "
          f"latent {opts.latent}x{opts.latent}, {opts.steps} ddim steps, {opts.repeats} interleaved repeats (medians), "
          f"{opts.threads} torch thread(s) per worker, device {os.environ.get('FINEXTRACT_DEVICE', 'cpu')}")
    print(f"{'case':<11} {'method':<27} {'s/step':>8} {'CPU s/step':>10} {'s/run once':>10} {'peak MB':>9} "
          f"{'models+sampling MB':>19}")
    for (case, method), m in figures.items():
        if (case, method) != FLOOR:
            print(f"{case:<11} {method:<27} {m['s_per_step']:>8.3f} {m['cpu_s_per_step']:>10.3f} {m['s_per_run']:>10.3f} "
                  f"{m['peak_mb']:>9.0f} {m['model_mb']:>19.0f}")
    for (case, method), fx in figures.items():
        if method == "cfg" or (case, method) == FLOOR:
            continue
        cfg = figures[case, "cfg"]
        print(f"{case} {method} / CFG: time per step {fx['s_per_step'] / cfg['s_per_step']:.2f}x (CPU time "
              f"{fx['cpu_s_per_step'] / cfg['cpu_s_per_step']:.2f}x), peak {fx['peak_mb'] / cfg['peak_mb']:.2f}x, "
              f"models+sampling {fx['model_mb'] / cfg['model_mb']:.2f}x")
    if FLOOR in figures:
        m = figures[FLOOR]
        print(f"UNet forwards: 2 of batch {opts.batch} {m['two_forwards']:.3f} s (CPU {m['two_forwards_cpu']:.3f}), "
              f"1 of batch {2 * opts.batch} {m['one_forward']:.3f} s (CPU {m['one_forward_cpu']:.3f}): "
              f"{m['two_forwards'] / m['one_forward']:.2f}x (CPU {m['two_forwards_cpu'] / m['one_forward_cpu']:.2f}x), "
              "the floor for two different models against CFG's one forward")


if __name__ == "__main__":
    main()
