"""Caption inversion: seconds per inversion at SD 1.x size on this CPU, and the ground-truth recovery rate over seeds.

Run from the repository root: ``.host/venv/bin/python -m benchmarks.bench_caption_inversion [--seeds 10]``.

Timing: a random-weight CLIP-L text encoder (transformers CLIPTextModel, vocabulary 49408, width 768, 12 layers, no
download) and SD-1.5-shaped attn2 to_k / to_v weights (16 cross-attention layers, 768 -> 320 / 640 / 1280). The search
is timed over a few iterations and extrapolated to 1000 (the paper: 1.5 to 2 minutes per caption on an A100), once
encoding only the ``L + 2`` positions the score reads (the core's contract) and once padded to 77 positions (what an
encoder that always runs its full context length, such as ComfyUI's, costs). Then through the pack's functional CLIP
(finextract_core/clip_text.py, what the Caption Inverter node runs) built from the same weights, as the node uses it.

Recovery rate: the ground-truth trial (fixtures/caption_trials.py) over more seeds than the test runs.
"""
from __future__ import annotations

import argparse
import time

import torch
from transformers import CLIPTextConfig, CLIPTextModel

from finextract_core.caption_inversion import (
    CaptionScorer,
    gather_cross_attention_projections,
    mean_context_rows,
    search_hard_prompt,
)
from finextract_core.clip_text import FunctionalClipText, text_encoder_access
from finextract_core.threads import torch_threads
from fixtures.caption_trials import clip_access, clip_from_input_embeddings, run_ground_truth_trial

SD15_CROSS_ATTENTION_WIDTHS = {
    "input_blocks.1.1": 320, "input_blocks.2.1": 320, "input_blocks.4.1": 640, "input_blocks.5.1": 640,
    "input_blocks.7.1": 1280, "input_blocks.8.1": 1280, "middle_block.1": 1280,
    "output_blocks.3.1": 1280, "output_blocks.4.1": 1280, "output_blocks.5.1": 1280,
    "output_blocks.6.1": 640, "output_blocks.7.1": 640, "output_blocks.8.1": 640,
    "output_blocks.9.1": 320, "output_blocks.10.1": 320, "output_blocks.11.1": 320,
}  # fmt: skip
CLIP_L_CONTEXT_LENGTH = 77


def sd15_shaped_projections(generator: torch.Generator):
    pretrained, finetuned = {}, {}
    for block, width in SD15_CROSS_ATTENTION_WIDTHS.items():
        for projection in ("to_k", "to_v"):
            key = f"diffusion_model.{block}.transformer_blocks.0.attn2.{projection}.weight"
            pretrained[key] = torch.randn(width, 768, generator=generator) * 0.03
            finetuned[key] = pretrained[key] + torch.randn(width, 768, generator=generator) * 3e-4
    return gather_cross_attention_projections(pretrained, finetuned)


def seconds_per_search_iteration(scorer, access, prompt_tokens: int, restarts: int, timed_iterations: int) -> float:
    search_hard_prompt(scorer, access, prompt_tokens=prompt_tokens, iterations=1, restarts=restarts)  # warm-up
    started = time.perf_counter()
    search_hard_prompt(scorer, access, prompt_tokens=prompt_tokens, iterations=timed_iterations, restarts=restarts)
    return (time.perf_counter() - started) / (timed_iterations + 1)


def time_sd15_sized_inversion(timed_iterations: int, prompt_tokens: int, restarts: int) -> None:
    print(f"torch threads: {torch.get_num_threads()}")
    generator = torch.Generator().manual_seed(0)
    projections = sd15_shaped_projections(generator)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        config = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                num_attention_heads=12, max_position_embeddings=CLIP_L_CONTEXT_LENGTH,
                                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)  # fmt: skip
        model = CLIPTextModel(config).eval().requires_grad_(False)
    access = clip_access(model)
    started = time.perf_counter()
    shared_directions = mean_context_rows(access, (1, prompt_tokens), samples=64)
    print(f"shared directions from 2 x 64 random prompts: {time.perf_counter() - started:.1f} s")
    started = time.perf_counter()
    scorer = CaptionScorer(projections, shared_directions=shared_directions)
    print(f"scorer from {projections.pretrained.shape[0]} x {projections.text_dim} stacks: {time.perf_counter() - started:.1f} s")

    def padded_to_context_length(embeddings: torch.Tensor) -> torch.Tensor:
        padding = access.token_embeddings[access.end_token_id].expand(
            embeddings.shape[0], CLIP_L_CONTEXT_LENGTH - embeddings.shape[1], -1
        )
        return clip_from_input_embeddings(model, torch.cat([embeddings, padding], dim=1))[:, : embeddings.shape[1]]

    padded_access = type(access)(access.token_embeddings, padded_to_context_length, access.start_token_id, access.end_token_id)
    for label, encoder in (("L + 2 positions", access), ("padded to 77", padded_access)):
        per_iteration = seconds_per_search_iteration(scorer, encoder, prompt_tokens, restarts, timed_iterations)
        print(
            f"search, {prompt_tokens} tokens, {restarts} restarts, {label}: {per_iteration:.3f} s per iteration "
            f"(timed over {timed_iterations}) -> {1000 * per_iteration:.0f} s for 1000 iterations"
        )

    functional = FunctionalClipText({f"text_model.{key}": value for key, value in model.state_dict().items()},
                                    heads=config.num_attention_heads, activation=config.hidden_act)
    functional_access = text_encoder_access([functional], access.start_token_id, access.end_token_id)
    per_iteration = seconds_per_search_iteration(scorer, functional_access, prompt_tokens, restarts, timed_iterations)
    print(
        f"search through the functional CLIP (the node's encoder), {prompt_tokens} tokens, {restarts} restarts: "
        f"{per_iteration:.3f} s per iteration (timed over {timed_iterations}) -> {1000 * per_iteration:.0f} s for "
        "1000 iterations"
    )

    candidates = access.candidate_token_ids()
    batch = candidates[:512]
    started = time.perf_counter()
    with torch.no_grad():
        scorer.score_sequence(access.encode_prompts(access.token_embeddings[batch, None]))
    per_token = (time.perf_counter() - started) / len(batch)
    print(f"single-token ranking: {per_token * 1e3:.2f} ms per token -> {per_token * len(candidates):.0f} s for all {len(candidates)}")


def ground_truth_recovery_rate(seeds: int) -> None:
    with torch_threads(1):  # the toy is tiny: one thread is faster and steadier on a shared CPU
        top5 = in_best = 0
        for seed in range(seeds):
            started = time.perf_counter()
            trial = run_ground_truth_trial(seed)
            top5 += trial.distinctive_in_top5_single_tokens
            in_best += trial.distinctive_in_best_caption
            ranks = [trial.single_token_ranking.index(t) if t in trial.single_token_ranking else ">19" for t in trial.caption]
            print(
                f"seed {seed}: caption {trial.caption} single-token ranks {ranks} best caption {trial.best_caption} "
                f"score {trial.best_caption_score:.3f} (true caption {trial.true_caption_score:.3f}) "
                f"{time.perf_counter() - started:.1f} s"
            )
        if seeds:
            print(f"distinctive token in top 5 single tokens: {top5}/{seeds}; in the best 3-token caption: {in_best}/{seeds}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--timed-iterations", type=int, default=20)
    parser.add_argument("--prompt-tokens", type=int, default=3)
    parser.add_argument("--restarts", type=int, default=4)
    arguments = parser.parse_args()
    ground_truth_recovery_rate(arguments.seeds)
    time_sd15_sized_inversion(arguments.timed_iterations, arguments.prompt_tokens, arguments.restarts)
