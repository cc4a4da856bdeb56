"""Caption inversion at SD 1.x size on this CPU, the node's path before and after its speed-up side by side, and the
ground-truth recovery rate over seeds on both.

Run from the repository root: ``.host/venv/bin/python -m benchmarks.bench_caption_inversion [--seeds 10]
[--rounds 3] [--timed-iterations 10] [--full-iterations 1000] [--threads 2]``.

Timing: a random-weight CLIP-L text encoder (transformers' CLIPTextModel with CLIP-L's configuration: vocabulary
49,408, width 768, 12 layers; built here, nothing downloaded) read into the pack's functional CLIP as the Caption
Inverter reads a CLIP, SD-1.5-shaped attn2 to_k / to_v weights (16 cross-attention layers, 768 -> 320 / 640 / 1280),
and the node's settings: 3 words, 4 restarts, a vocabulary as large as the node's default one (the 32,875 lower-case
whole words of CLIP's vocabulary). The paths, each a real configuration of the same code:

- before: every product through ``F.linear`` (the BLAS PyTorch was built with: MKL), the start token encoded with
  every prompt (the node until this change);
- start token kept: its keys and values computed once (``text_encoder_access``), the products as before;
- oneDNN: the products through ``FrozenLinear``'s oneDNN path, the start token encoded with every prompt;
- after: both (the node now).

Each round runs the same seeded search of ``--timed-iterations`` steps on every path in turn, so that a load that
comes and goes falls on all of them; the figures are medians over rounds, and the ratio is taken within each round.
The load average is printed before and after. ``--full-iterations N`` then times whole inversions as the node runs them
(shared directions, scorer, an N-step search, the single-token ranking), after and before, wall clock.

Recovery rate: the ground-truth trial (fixtures/caption_trials.py) over ``--seeds`` seeds, before and after.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass

import torch
from transformers import CLIPTextConfig, CLIPTextModel

from finextract_core.caption_inversion import (
    CaptionScorer,
    encode_single_token_prompts,
    gather_cross_attention_projections,
    invert_caption,
    mean_context_rows,
    rank_single_tokens,
    search_hard_prompt,
)
from finextract_core.threads import torch_threads
from fixtures.caption_trials import functional_access, onednn_enabled, run_ground_truth_trial

SD15_CROSS_ATTENTION_WIDTHS = {
    "input_blocks.1.1": 320, "input_blocks.2.1": 320, "input_blocks.4.1": 640, "input_blocks.5.1": 640,
    "input_blocks.7.1": 1280, "input_blocks.8.1": 1280, "middle_block.1": 1280,
    "output_blocks.3.1": 1280, "output_blocks.4.1": 1280, "output_blocks.5.1": 1280,
    "output_blocks.6.1": 640, "output_blocks.7.1": 640, "output_blocks.8.1": 640,
    "output_blocks.9.1": 320, "output_blocks.10.1": 320, "output_blocks.11.1": 320,
}  # fmt: skip
CLIP_L = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                        pad_token_id=49407)  # fmt: skip
WHOLE_WORD_TOKENS = 32875  # lower-case whole words in CLIP's BPE vocabulary: the node's default search vocabulary
PROMPT_TOKENS, RESTARTS = 3, 4  # the node's defaults
RANKED_TOKENS = 512


@dataclass(frozen=True)
class Path:
    name: str
    onednn: bool
    keep_start_token: bool


PATHS = (Path("before", False, False), Path("start token kept", False, True), Path("oneDNN", True, False),
         Path("after", True, True))  # fmt: skip
BEFORE, AFTER = PATHS[0], PATHS[-1]


def load() -> str:
    return "load average " + " ".join(f"{value:.2f}" for value in os.getloadavg())


def sd15_shaped_projections(generator: torch.Generator):
    pretrained, finetuned = {}, {}
    for block, width in SD15_CROSS_ATTENTION_WIDTHS.items():
        for projection in ("to_k", "to_v"):
            key = f"diffusion_model.{block}.transformer_blocks.0.attn2.{projection}.weight"
            pretrained[key] = torch.randn(width, 768, generator=generator) * 0.03
            finetuned[key] = pretrained[key] + torch.randn(width, 768, generator=generator) * 3e-4
    return gather_cross_attention_projections(pretrained, finetuned)


class SearchOnPath:
    """The encoder, scorer and vocabulary of one path, built as that path builds them."""

    def __init__(self, path: Path, model: CLIPTextModel, projections, shared_directions: torch.Tensor):
        self.path = path
        self.projections = projections
        with onednn_enabled(path.onednn):
            self.access = functional_access(model, path.keep_start_token)
            self.scorer = CaptionScorer(projections, shared_directions=shared_directions)
        self.vocabulary = self.access.candidate_token_ids()[:WHOLE_WORD_TOKENS]

    def search(self, iterations: int):
        with onednn_enabled(self.path.onednn):
            return search_hard_prompt(self.scorer, self.access, prompt_tokens=PROMPT_TOKENS, iterations=iterations,
                                      restarts=RESTARTS, candidate_token_ids=self.vocabulary)

    def rank_single_tokens(self, tokens: int):
        ids = self.vocabulary[:tokens]
        with onednn_enabled(self.path.onednn):
            return rank_single_tokens(self.scorer, encode_single_token_prompts(self.access, ids), ids)

    def whole_inversion(self, iterations: int):
        with onednn_enabled(self.path.onednn):
            return invert_caption(self.projections, self.access, prompt_tokens=PROMPT_TOKENS, iterations=iterations,
                                  restarts=RESTARTS, candidate_token_ids=self.vocabulary)


def same_candidates(first, second, relative: float = 1e-4) -> bool:
    """The same prompts in the same order with the same scores to float32 rounding (the sums run in other orders)."""
    return len(first.candidates) == len(second.candidates) and all(
        a.token_ids == b.token_ids and abs(a.score - b.score) <= relative * abs(a.score)
        for a, b in zip(first.candidates, second.candidates)
    )


def time_sd15_sized_search(rounds: int, timed_iterations: int, full_iterations: int) -> None:
    print(f"torch threads: {torch.get_num_threads()}")
    projections = sd15_shaped_projections(torch.Generator().manual_seed(0))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = CLIPTextModel(CLIP_L).eval().requires_grad_(False)
    with onednn_enabled(False):  # the reference prompts' mean rows, one set for every path
        shared = mean_context_rows(functional_access(model, keep_start_token=False), (1, PROMPT_TOKENS), samples=64)
    searches = [SearchOnPath(path, model, projections, shared) for path in PATHS]
    for search in searches:
        search.search(1)  # warm-up: oneDNN and the allocator settle on the first calls
    print(f"search, {PROMPT_TOKENS} words, {RESTARTS} restarts, {WHOLE_WORD_TOKENS} tokens, {timed_iterations} "
          f"iterations per path per round, {rounds} rounds; {load()}")
    seconds = {search.path.name: [] for search in searches}
    cpu_seconds = {search.path.name: [] for search in searches}
    results = {}
    for _ in range(rounds):
        for search in searches:
            started, cpu_started = time.perf_counter(), time.process_time()
            results[search.path.name] = search.search(timed_iterations)
            seconds[search.path.name].append((time.perf_counter() - started) / (timed_iterations + 1))
            cpu_seconds[search.path.name].append((time.process_time() - cpu_started) / (timed_iterations + 1))
    print(f"  ({load()}; CPU time counts every thread, spinning included: at 1 thread it is what an idle machine's "
          "wall clock would show)")
    before = seconds[BEFORE.name]
    for search in searches:
        mine = seconds[search.path.name]
        per_iteration = statistics.median(mine)
        speed_up = statistics.median(b / m for b, m in zip(before, mine))
        same = same_candidates(results[search.path.name], results[BEFORE.name])
        print(f"  {search.path.name:>17}: {per_iteration:.3f} s per iteration -> {1000 * per_iteration:.0f} s per 1000 "
              f"(rounds: {', '.join(f'{s:.3f}' for s in mine)}; CPU "
              f"{statistics.median(cpu_seconds[search.path.name]):.3f} s); {speed_up:.2f}x before; "
              f"same candidates as before: {same}")

    ranking_seconds = {search.path.name: [] for search in searches}
    for _ in range(rounds):
        for search in searches:
            started = time.perf_counter()
            search.rank_single_tokens(RANKED_TOKENS)
            ranking_seconds[search.path.name].append((time.perf_counter() - started) / RANKED_TOKENS)
    print(f"single-token ranking ({RANKED_TOKENS} tokens per path per round, no gradient); {load()}")
    for search in searches:
        per_token = statistics.median(ranking_seconds[search.path.name])
        print(f"  {search.path.name:>17}: {1e3 * per_token:.2f} ms per token -> {per_token * WHOLE_WORD_TOKENS:.0f} s "
              f"for all {WHOLE_WORD_TOKENS}")

    for path in (AFTER, BEFORE)[: 2 if full_iterations else 0]:
        search = next(search for search in searches if search.path == path)
        started, cpu_started = time.perf_counter(), time.process_time()
        inversion = search.whole_inversion(full_iterations)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        print(f"whole inversion, {path.name}: {full_iterations} iterations in {elapsed:.0f} s ({elapsed / 60:.1f} min; "
              f"CPU {cpu:.0f} s; best caption {inversion.search.best.token_ids} score "
              f"{inversion.search.best.score:.6f}); {load()}")


def ground_truth_recovery_rate(seeds: int) -> None:
    with torch_threads(1):  # the toy is tiny: one thread is faster and steadier on a shared CPU
        trials = {}
        for path in (BEFORE, AFTER):
            top5 = in_best = 0
            started = time.perf_counter()
            with onednn_enabled(path.onednn):
                trials[path.name] = [run_ground_truth_trial(seed, keep_start_token=path.keep_start_token)
                                     for seed in range(seeds)]
            for seed, trial in enumerate(trials[path.name]):
                top5 += trial.distinctive_in_top5_single_tokens
                in_best += trial.distinctive_in_best_caption
                ranks = [trial.single_token_ranking.index(t) if t in trial.single_token_ranking else ">19"
                         for t in trial.caption]
                print(f"{path.name} seed {seed}: caption {trial.caption} single-token ranks {ranks} best caption "
                      f"{trial.best_caption} score {trial.best_caption_score:.3f} (true caption "
                      f"{trial.true_caption_score:.3f})")
            if seeds:
                print(f"{path.name}: distinctive token in top 5 single tokens: {top5}/{seeds}; in the best "
                      f"{PROMPT_TOKENS}-token caption: {in_best}/{seeds} ({time.perf_counter() - started:.0f} s)")
        agree = sum(
            (b.single_token_ranking, b.best_caption) == (a.single_token_ranking, a.best_caption)
            for b, a in zip(trials[BEFORE.name], trials[AFTER.name])
        )
        print(f"trials with the same single-token ranking and best caption before and after: {agree}/{seeds}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="0: the recovery rate only")
    parser.add_argument("--timed-iterations", type=int, default=10)
    parser.add_argument("--full-iterations", type=int, default=0, help="also time whole inversions (the node: 1000)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    arguments = parser.parse_args()
    if arguments.rounds:
        with torch_threads(arguments.threads):
            time_sd15_sized_search(arguments.rounds, arguments.timed_iterations, arguments.full_iterations)
    ground_truth_recovery_rate(arguments.seeds)
