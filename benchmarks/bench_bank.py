"""Candidate bank: peak memory against N, and the time the bank adds per candidate. Prints figures; asserts nothing.

    python -m benchmarks.bench_bank [--counts 500 5000] [--overhead-candidates 12] [--steps 2] [--batch 4]

1. Peak RSS for each N, each in a fresh process: N small candidates (latents 4x8x8, 512-d embeddings, batches of 4)
   streamed through the bank exactly as the Candidate Bank node does (write each batch, then read all N embeddings
   back), with a synthetic generator in place of the models so that N = 5,000 runs in seconds. Memory should grow
   only by the N embeddings the bank returns (N x 512 x 4 bytes), not with N images or latents.
2. Overhead: the Candidate Bank node on the real host with the stand-in models (64 px, LoRA, random SSCD): time per
   candidate, and the part of it spent in the bank (open, shard writes with fsync, reading the embeddings back).
"""
import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LATENT_SHAPE, EMBEDDING_DIM = (4, 8, 8), 512
LATENT_BYTES, EMBEDDING_BYTES = 4 * 4 * 8 * 8, 4 * EMBEDDING_DIM  # float32


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def stream_synthetic(count: int, folder: str, batch: int = 4) -> None:
    """One process: the node's loop with a synthetic generator; prints peak RSS before and after."""
    import numpy as np
    import torch

    from finextract_core.bank import CandidateBank, candidate_noise
    from finextract_core.embeddings import Embeddings

    torch.set_num_threads(1)
    shape = LATENT_SHAPE
    projection = torch.randn(int(np.prod(shape)), EMBEDDING_DIM, generator=torch.Generator().manual_seed(0))
    bank = CandidateBank.open(folder, {"seed": 0, "embedder": "synthetic", "preset": "paper"})
    before = peak_rss_mib()
    todo = bank.missing(range(count))
    for start in range(0, len(todo), batch):
        indices = todo[start:start + batch]
        latents = candidate_noise(0, indices, shape)
        vectors = torch.nn.functional.normalize(latents.flatten(1) @ projection, dim=1)
        bank.write(indices, latents, Embeddings(vectors.numpy(), "synthetic", "paper"))
    embeddings = bank.embeddings(range(count))
    print(f"{count} {before:.1f} {peak_rss_mib():.1f} {len(embeddings)}")


def memory_against_n(counts: list[int]) -> None:
    print("Peak RSS (fresh process each; synthetic generator, batches of 4):")
    print(f"  {'N':>6}  {'after imports':>13}  {'peak':>9}  {'growth':>8}  {'N embeddings':>12}")
    peaks = []
    for count in counts:
        with tempfile.TemporaryDirectory() as folder:
            out = subprocess.run([sys.executable, "-m", "benchmarks.bench_bank", "--stream", str(count), folder],
                                 check=True, capture_output=True, text=True, cwd=REPO_ROOT).stdout.split()
        _, before, peak, _ = out
        peaks.append(float(peak))
        embeddings_mib = count * EMBEDDING_BYTES / 2 ** 20
        print(f"  {count:>6}  {float(before):>9.1f} MiB  {float(peak):>5.1f} MiB  {float(peak) - float(before):>4.1f} MiB"
              f"  {embeddings_mib:>8.1f} MiB")
    if len(counts) > 1:
        # The slope between the smallest and the largest N: what one more candidate costs, fixed costs cancelled.
        slope = (peaks[-1] - peaks[0]) * 2 ** 20 / (counts[-1] - counts[0])
        print(f"  peak RSS per extra candidate: {slope / 1024:.2f} KiB (its embedding, the only part kept in memory: "
              f"{EMBEDDING_BYTES / 1024:.2f} KiB; its latent stays on disk: {LATENT_BYTES / 1024:.2f} KiB)")


def overhead(candidates: int, steps: int, batch: int) -> None:
    from fixtures.bank_helpers import write_test_sscd
    from fixtures.stand_in_models import write_stand_in_models
    from tools.host.comfy_inprocess import load_host

    host = load_host()
    bank_module = host.module("finextract_core.bank")
    work = tempfile.mkdtemp(prefix="bench-bank-")
    write_stand_in_models(os.path.join(work, "models"))
    for sub in ("checkpoints", "loras"):
        host.folder_paths.add_model_folder_path(sub, os.path.join(work, "models", sub))
    host.folder_paths.add_model_folder_path("sscd", os.path.join(work, "sscd"))
    host.folder_paths.add_model_folder_path("finextract_banks", work)  # as extra_model_paths.yaml would allow it
    sscd_name = write_test_sscd(os.path.join(work, "sscd"))
    nodes = host.nodes.NODE_CLASS_MAPPINGS
    model, clip, vae = nodes["CheckpointLoaderSimple"]().load_checkpoint("base.safetensors")[:3]
    lora = nodes["LoraLoaderModelOnly"]().load_lora_model_only(model, "style.safetensors", 1.0)[0]
    encode = nodes["CLIPTextEncode"]()
    inputs = dict(fine_tuned=lora, pretrained=model, positive=encode.encode(clip, "sks style")[0],
                  negative=encode.encode(clip, "")[0], mode="finextract", guidance_scale=5.0, k=0.0,
                  latent_image=nodes["EmptyLatentImage"]().generate(64, 64, 1)[0], steps=steps, sampler_name="ddim",
                  scheduler="ddim_uniform", vae=vae, sscd_model=sscd_name, preset="paper", num_candidates=candidates,
                  first_candidate=0, batch_size=batch)
    node = nodes["FineXtractCandidateBank"]
    node.execute(**inputs, seed=99, bank_folder=os.path.join(work, "warm-up"))  # first-call costs out of the way
    # Time spent inside the bank (opening and scanning, writing shards, reading the embeddings back) is what a run
    # without the bank would not spend; the rest (sampling, decoding, embedding) is the same either way.
    in_bank = [0.0]
    bank_class = bank_module.CandidateBank
    for name in ("open", "write", "embeddings"):
        original = getattr(bank_class, name)

        def timed_call(*args, _original=original, **kwargs):
            began = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                in_bank[0] += time.perf_counter() - began
        # open is a classmethod: getattr gave it bound to the class already
        setattr(bank_class, name, staticmethod(timed_call) if name == "open" else timed_call)
    totals, banks = [], []
    for repeat in range(2):
        in_bank[0] = 0.0
        began = time.perf_counter()
        node.execute(**inputs, seed=repeat, bank_folder=os.path.join(work, f"run-{repeat}"))
        totals.append(time.perf_counter() - began)
        banks.append(in_bank[0])
    best = min(range(2), key=lambda r: totals[r])
    total, bank_time = totals[best] / candidates, banks[best] / candidates
    print(f"Overhead ({candidates} candidates, {steps} steps, 64 px, batch {batch}, faster of 2 runs):")
    print(f"  with the bank           {total * 1000:8.1f} ms per candidate")
    print(f"  without (bank time out) {(total - bank_time) * 1000:8.1f} ms per candidate")
    print(f"  overhead                {100 * bank_time / (total - bank_time):+8.1f} %")


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--stream":
        stream_synthetic(int(sys.argv[2]), sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[500, 5000])
    parser.add_argument("--overhead-candidates", type=int, default=12)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4, help="candidates per sampling batch in the overhead run")
    args = parser.parse_args()
    memory_against_n(args.counts)
    overhead(args.overhead_candidates, args.steps, args.batch)


if __name__ == "__main__":
    main()
