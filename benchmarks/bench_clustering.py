"""Clustering: recovery and time of every method side by side, on realistic candidate sets and on clean planted ones.
Prints figures and the load average; asserts nothing about time.

1. Realistic sets (fixtures/realistic_candidates.py: memorised images as tight groups of 3 and more copies among
   generic samples and loose style modes), N = 50 x N0, several seeds: how many memorised images have a copy among
   the N0 extracted images ("recovered"), how many among the first M clusters, M = the number of memorised images
   ("first": memorised images ranked first), mean and slowest seconds. Optionally the same for the ranked method with
   other powers of tightness in its score (--powers) and on harder sets whose copy and style ranges overlap (--hard).
2. Clean planted sets (fixtures/planted_embeddings.py: N0 groups of 45 similar vectors, 10% unrelated): our methods
   next to a plain re-implementation of the paper's procedure (networkx.find_cliques, remove the largest clique,
   +0.01 steps, a per-threshold time cap, a timed-out threshold is skipped).

    python -m benchmarks.bench_clustering [--seeds 10] [--powers 1 2 4 8] [--hard] [--planted 5 10 30 138]
"""
import argparse
import os
import time

import networkx as nx
import numpy as np

from finextract_core.clustering import METHODS, SIMILARITY_SCALE, cluster_candidates, ranking
from fixtures.planted_embeddings import planted, recovered
from fixtures.realistic_candidates import realistic_candidates

REALISTIC = [(10, 3), (138, 50)]  # (N0, memorised images): the two settings, N = 50 x N0
HARD_LEVELS = {"copy_levels": (0.65, 0.95), "style_levels": (0.35, 0.55)}  # copies down to ~0.6, styles up to ~0.6


def load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg()) + f" ({os.cpu_count()} CPUs)"


def realistic_rows(n0: int, n_memorised: int, seeds: int, methods, levels: dict, label: str) -> None:
    sets = [realistic_candidates(50 * n0, n_memorised, seed=seed, **levels) for seed in range(seeds)]
    for name, power, shown in methods:
        ranking.TIGHTNESS_POWER = power
        found = first = 0
        seconds = []
        for candidates in sets:
            began = time.perf_counter()
            result = cluster_candidates(candidates.vectors, n0, name)
            seconds.append(time.perf_counter() - began)
            found += candidates.found(result.centres)
            first += candidates.found(result.centres[:n_memorised])
        print(f"{label:<9} {n0:>4} {50 * n0:>5} {n_memorised:>4}  {shown:<22} {found / (seeds * n_memorised):>9.3f} "
              f"{first / (seeds * n_memorised):>6.3f} {np.mean(seconds):>7.2f} {max(seconds):>7.2f}", flush=True)


def naive_paper_procedure(vectors, n_clusters, per_threshold_cap, total_cap):
    """The paper's loop as published, with its time-outs; returns (seconds, outcome text)."""
    began = time.perf_counter()
    sims = vectors @ vectors.T
    upper = sims[np.triu_indices(len(sims), 1)]
    threshold = float(np.percentile(upper, 25))
    timed_out = 0
    while threshold <= 1.0:
        if time.perf_counter() - began > total_cap:
            return None, f"> {total_cap:.0f} s cap ({timed_out} thresholds timed out at {per_threshold_cap:.0f} s)"
        graph = nx.Graph()
        graph.add_nodes_from(range(len(vectors)))
        rows, cols = np.nonzero(np.triu(sims >= threshold, 1))
        graph.add_edges_from(zip(rows.tolist(), cols.tolist()))
        threshold_began = time.perf_counter()
        cliques, expired = [], False
        while graph.number_of_nodes() and not expired:
            largest = []
            for clique in nx.find_cliques(graph):
                if len(clique) > len(largest):
                    largest = clique
                if time.perf_counter() - threshold_began > per_threshold_cap:
                    expired = True
                    break
            cliques.append(largest)
            graph.remove_nodes_from(largest)
        if expired:
            timed_out += 1
        elif len(cliques) >= n_clusters:
            return time.perf_counter() - began, f"threshold {threshold:.3f}, {timed_out} timed out"
        threshold += 0.01
    return time.perf_counter() - began, "no threshold reached N0"


def planted_rows(args) -> None:
    print(f"{'N0':>4} {'N':>5}  {'method':<17} {'seconds':>8}  {'recovered':>9}  details")
    for n_groups in args.planted:
        vectors, labels = planted(n_groups)
        ours = {}
        for method in METHODS:
            began = time.perf_counter()
            result = cluster_candidates(vectors, n_groups, method)
            ours[method] = time.perf_counter() - began
            skipped = next((note.split(" where")[0] for note in result.notes if note.startswith("skipped")), "")
            print(f"{n_groups:>4} {len(vectors):>5}  {method:<17} {ours[method]:>8.2f}  "
                  f"{str(recovered(result.centres, labels, n_groups)):>9}  threshold {result.threshold:.3f} {skipped}")
        if len(vectors) > args.skip_naive_above:
            print(f"{n_groups:>4} {len(vectors):>5}  {'naive paper':<17} {'skipped':>8}  (N > {args.skip_naive_above}; "
                  f"every dense threshold costs the full {args.per_threshold_cap:.0f} s)")
            continue
        seconds, outcome = naive_paper_procedure(vectors, n_groups, args.per_threshold_cap, args.naive_total_cap)
        shown = f"{seconds:>8.2f}" if seconds is not None else f"{'>' + format(args.naive_total_cap, '.0f'):>8}"
        bound = seconds if seconds is not None else args.naive_total_cap
        ratios = ", ".join(f"{m} {'>' if seconds is None else ''}{bound / t:.0f}x" for m, t in ours.items())
        print(f"{n_groups:>4} {len(vectors):>5}  {'naive paper':<17} {shown}  {'':>9}  {outcome}; speed-up: {ratios}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=10, help="realistic sets per setting")
    parser.add_argument("--settings", type=int, nargs="+", default=[n0 for n0, _ in REALISTIC],
                        help="N0 of the realistic settings to run (10 and/or 138)")
    parser.add_argument("--powers", type=int, nargs="*", default=[],
                        help="also run ranked_cliques with these powers of tightness in its score")
    parser.add_argument("--hard", action="store_true", help="also run harder realistic sets (overlapping ranges)")
    parser.add_argument("--planted", type=int, nargs="*", default=[5, 10, 30, 138], help="N0 of the planted sets")
    parser.add_argument("--per-threshold-cap", type=float, default=30.0)
    parser.add_argument("--naive-total-cap", type=float, default=120.0)
    parser.add_argument("--skip-naive-above", type=int, default=1500, help="N above which the naive run is skipped")
    args = parser.parse_args()
    print(f"load average before: {load()}; similarity scale 1/{SIMILARITY_SCALE}; OMP/BLAS threads: "
          f"{os.environ.get('OMP_NUM_THREADS', 'default')}")
    default_power = ranking.TIGHTNESS_POWER
    methods = [(method, default_power, method) for method in METHODS]
    methods += [("ranked_cliques", power, f"ranked_cliques (T^{power})")
                for power in args.powers if power != default_power]
    print(f"\nRealistic sets, {args.seeds} seeds per row: recovered = memorised images with a copy among the N0 "
          "centres; first = ... among the first M clusters (M memorised images)")
    print(f"{'set':<9} {'N0':>4} {'N':>5} {'M':>4}  {'method':<22} {'recovered':>9} {'first':>6} {'mean s':>7} "
          f"{'max s':>7}")
    for label, levels in [("realistic", {}), *([("hard", HARD_LEVELS)] if args.hard else [])]:
        for n0, n_memorised in REALISTIC:
            if n0 in args.settings:
                realistic_rows(n0, n_memorised, args.seeds, methods, levels, label)
    ranking.TIGHTNESS_POWER = default_power
    if args.planted:
        print("\nClean planted sets (45 members per group, 10% unrelated candidates):")
        planted_rows(args)
    print(f"\nload average after: {load()}")


if __name__ == "__main__":
    main()
