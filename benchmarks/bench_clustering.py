"""Clustering time for N0 in {5, 10, 30, 138} with N = 50 x N0 planted embeddings (d = 512): our methods next to a
plain re-implementation of the paper's procedure (networkx.find_cliques, remove the largest clique, +0.01 steps,
30 s per threshold, a timed-out threshold is skipped). Prints figures; asserts nothing about time.

    python -m benchmarks.bench_clustering [--naive-total-cap 120] [--sizes 5 10 30 138]
"""
import argparse
import os
import time

import networkx as nx
import numpy as np

from finextract_core.clustering import METHODS, SIMILARITY_SCALE, cluster_candidates
from fixtures.planted_embeddings import planted, recovered


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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[5, 10, 30, 138])
    parser.add_argument("--per-threshold-cap", type=float, default=30.0)
    parser.add_argument("--naive-total-cap", type=float, default=120.0)
    parser.add_argument("--skip-naive-above", type=int, default=1500, help="N above which the naive run is skipped")
    args = parser.parse_args()
    print(f"similarity scale 1/{SIMILARITY_SCALE}; OMP/BLAS threads: {os.environ.get('OMP_NUM_THREADS', 'default')}")
    print(f"{'N0':>4} {'N':>5}  {'method':<17} {'seconds':>8}  {'recovered':>9}  details")
    for n_groups in args.sizes:
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


if __name__ == "__main__":
    main()
