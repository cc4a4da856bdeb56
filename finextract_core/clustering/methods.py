"""The single-threshold methods: how each one chooses one threshold (or one cut of a tree) and its cliques/groups.
Each method's rule is its function's docstring."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage

from .cliques import WorkBudgetExceeded, components_in_index_order
from .similarities import SIMILARITY_SCALE, CandidateSimilarities, similarity
from .thresholds import THRESHOLD_STEP, ThresholdGraphs, capacity, partition_pieces, piece_sizes


@dataclass
class Outcome:
    threshold: int  # every cluster is a clique of the graph at this threshold
    clusters: list[list[int]]  # every counted clique/group, any order (the ranked method: its ranking)
    notes: list[str]


class NoThreshold(Exception):
    """No threshold (or cut) of the rule gives N0 clusters of the size asked for; the message says what was found."""


def counting_smaller_clusters(rule, run: CandidateSimilarities, n_clusters: int, min_size: int,
                              work_budget: int) -> Outcome:
    """``rule``'s outcome counting clusters of at least ``min_size`` members, or where it finds no threshold with N0
    of them, of one member fewer, and so on down to single candidates (which every rule can count N0 of, except
    where most candidates are one clique; the result's completion covers that)."""
    failures = []
    for size in range(min_size, 0, -1):
        try:
            outcome = rule(run, n_clusters, size, work_budget)
        except NoThreshold as failure:
            failures.append(f"{failure}: counted clusters of >= {size - 1} members instead" if size > 1 else
                            f"{failure}")
            continue
        outcome.notes[:0] = failures
        return outcome
    return Outcome(run.highest, [], failures)


def _grid_notes(threshold: int, start: int) -> list[str]:
    return [f"threshold {similarity(threshold):.5f}: start {similarity(start):.5f} (25th percentile of the "
            f"off-diagonal similarities) + {(threshold - start) // THRESHOLD_STEP} steps of 0.01"]


def _kept_note(counted: int, n_clusters: int, min_size: int) -> list[str]:
    return ([f"{counted} cliques/groups of >= {min_size} members at this threshold; kept the {n_clusters} largest"]
            if counted > n_clusters else [])


def paper_method(run: CandidateSimilarities, n_clusters: int, min_size: int, work_budget: int) -> Outcome:
    """The paper's procedure: the first threshold of the grid whose greedy clique partition has N0 cliques.

    The similarity threshold starts at the 25th percentile of the off-diagonal similarities and rises in steps of
    0.01. At each threshold the graph (edge where similarity >= threshold) is partitioned greedily: repeatedly remove a
    maximum clique. The first threshold at which the partition has at least N0 cliques of at least ``min_size``
    members is used; the N0 largest of them are the clusters. Faithful to the paper, including its weakness: when
    inter-group pairs make up much of the similarities, the start threshold already links many of them and the first
    threshold may merge groups. Two groups of 10 near-duplicates (similarity ~0.9996 inside, ~-0.19 between) with
    N0 = 2: half the pairs are inter-group, so the start links half the inter-group pairs, the partition is a mixed
    15-clique and a 5-clique, that is N0 cliques, and the scan stops there. Deterministic and fast where the paper's
    code is neither:

    * the start is the exact percentile, not one of 1000 unseeded random entries;
    * among maximum cliques the lexicographically smallest (by sorted candidate index) is removed, so the partition is
      a function of the graph alone;
    * an exact maximum-clique solver (bitset branch and bound with greedy-colouring bounds) runs per connected
      component; each maximum-clique search may take at most ``work_budget`` steps, and a threshold where one needs
      more is skipped, as the paper's code skips a threshold whose subprocess times out after 30 s, but the same on
      every machine;
    * a search that is sure to exceed the budget is not run: before its first clique it must colour the later
      neighbours of every vertex whose bound exceeds the clique number, which a greedy colouring bounds;
    * connected components (exact at every threshold from one maximum spanning tree) give a monotone bound: the
      number of cliques of at least s members is at most sum(|C| // s) over components C, which never grows with the
      threshold, so once it drops below N0 the scan stops (no higher threshold can reach N0); the same holds for the
      pieces of the (s - 1)-core, where cliques are searched.
    """
    graphs = ThresholdGraphs(run)
    start, highest = graphs.start, graphs.highest
    skipped, best_count = [], 0
    threshold = start
    while True:
        labels = graphs.component_labels(threshold)
        if capacity(np.bincount(labels), min_size) < n_clusters:  # no later threshold can reach N0 either
            break
        pieces = graphs.pieces(threshold, labels, min_size)
        if capacity(piece_sizes(pieces), min_size) < n_clusters:  # the same holds for cores
            break
        try:
            cliques = partition_pieces(pieces, min_size, work_budget)
        except WorkBudgetExceeded:
            skipped.append(threshold)
        else:
            best_count = max(best_count, len(cliques))
            if len(cliques) >= n_clusters:
                notes = _grid_notes(threshold, start)
                if skipped:
                    notes.append(f"skipped {len(skipped)} lower threshold(s) where a maximum-clique search exceeded "
                                 f"the work budget of {work_budget} steps "
                                 f"({', '.join(f'{similarity(t):.5f}' for t in skipped[:5])}"
                                 f"{', ...' if len(skipped) > 5 else ''})")
                return Outcome(threshold, cliques, notes + _kept_note(len(cliques), n_clusters, min_size))
        if threshold > highest:  # all singletons from here on
            break
        threshold += THRESHOLD_STEP
    raise NoThreshold(
        f"no threshold from {similarity(start):.5f} upwards partitions the {run.n} candidates into {n_clusters} "
        f"cliques of at least {min_size} members (at most {best_count} found"
        f"{f'; {len(skipped)} thresholds skipped for the work budget of {work_budget} steps' if skipped else ''})")


def _complete_components_bound(labels: np.ndarray, degrees: np.ndarray, n_clusters: int, min_size: int) -> int:
    """The N0-th largest component that is a clique (0 if fewer than N0): a lower bound on the threshold's score.

    The greedy partition removes such a component whole, so the N0-th largest clique is at least this big.
    """
    sizes = np.bincount(labels)
    complete = np.bincount(labels, weights=degrees) == sizes * (sizes - 1)
    sizes = np.sort(sizes[complete & (sizes >= min_size)])[::-1]
    return int(sizes[n_clusters - 1]) if len(sizes) >= n_clusters else 0


@dataclass
class _Scan:
    size: int = 0  # the N0-th largest clique at the best threshold; 0 while none has N0 cliques
    threshold: int | None = None
    cliques: list[list[int]] = field(default_factory=list)
    floor: int = 0  # the smallest clique size searched for at the best threshold
    too_dense: int | None = None  # the threshold where the scan stopped for the work budget


def _scan_thresholds(graphs: ThresholdGraphs, labels: dict[int, np.ndarray], n_clusters: int, min_size: int,
                     work_budget: int) -> _Scan:
    """Scan ``labels``' thresholds downwards for the largest N0-th largest clique of the greedy partition.

    Among equally good thresholds the highest (tightest cliques) is met first, so a lower one must beat the best
    size so far and only cliques of at least that size + 1 (``min_size`` at the least) are searched for. The scan
    ends at the first threshold whose maximum-clique search exceeds the work budget: every lower threshold's graph
    contains its graph.
    """
    scan = _Scan()
    for threshold in sorted(labels, reverse=True):
        floor = max(min_size, scan.size + 1)
        if capacity(np.bincount(labels[threshold]), floor) < n_clusters:
            continue
        pieces = graphs.pieces(threshold, labels[threshold], floor)
        if capacity(piece_sizes(pieces), floor) < n_clusters:
            continue
        try:
            cliques = partition_pieces(pieces, floor, work_budget)
        except WorkBudgetExceeded:
            scan.too_dense = threshold
            break
        if len(cliques) >= n_clusters:
            scan.size = sorted(map(len, cliques), reverse=True)[n_clusters - 1]
            scan.threshold, scan.cliques, scan.floor = threshold, cliques, floor
    return scan


def best_threshold_method(run: CandidateSimilarities, n_clusters: int, min_size: int, work_budget: int) -> Outcome:
    """The threshold whose N0-th largest clique is biggest: every threshold of the grid, from the start up to the
    largest similarity, is a candidate; its score is the size of the N0-th largest clique of the greedy clique
    partition (as in ``paper_method``). The threshold with the highest score is used, the highest threshold among
    equals (tightest cliques). Planted groups are recovered where the paper's first-threshold rule merges them.

    Kept fast by bounds, not by approximation: a threshold is only searched for cliques that would beat the best
    score so far, the components (a maximum spanning tree gives them at every threshold) and the (score - 1)-cores of
    the graph rule most thresholds out without a search, and components that are cliques bound every threshold's
    score from below before the scan. The scan runs from the top down and ends at the first threshold where a
    maximum-clique search exceeds the work budget (lower thresholds have denser graphs; the note names it).
    """
    graphs = ThresholdGraphs(run)
    start = graphs.start
    labels = {t: graphs.component_labels(t) for t in range(start, graphs.highest + 1, THRESHOLD_STEP)}
    # Components that are cliques give every threshold a lower bound on its score at O(N) cost. Searching only for
    # cliques at least as big as the best bound from the start spares the scan the many partitions it would
    # otherwise compute above that threshold; it is sound as long as the scan reaches that threshold.
    bounds = {t: _complete_components_bound(labels[t], graphs.degrees(t), n_clusters, min_size) for t in labels}
    bound_threshold = max(labels, key=lambda t: (bounds[t], t))
    bound_floor = max(min_size, bounds[bound_threshold])
    scan = _scan_thresholds(graphs, labels, n_clusters, bound_floor, work_budget)
    if bound_floor > min_size and scan.too_dense is not None and scan.too_dense >= bound_threshold:
        # The scan stopped above the bound's threshold, so the bound says nothing about what it did scan.
        scan = _scan_thresholds(graphs, labels, n_clusters, min_size, work_budget)
    budget_note = ([f"scan stopped at {similarity(scan.too_dense):.5f}: a maximum-clique search exceeded the work "
                    f"budget of {work_budget} steps; lower thresholds were not tried"]
                   if scan.too_dense is not None else [])
    if scan.threshold is None:
        raise NoThreshold(
            f"no threshold from {similarity(start):.5f} upwards partitions the {run.n} candidates into {n_clusters} "
            f"cliques of at least {min_size} members{f' ({budget_note[0]})' if budget_note else ''}")
    notes = _grid_notes(scan.threshold, start)
    notes.append(f"chosen because its N0-th largest clique ({scan.size} members, N0 = {n_clusters}) is the largest "
                 "of all thresholds scanned (ties: the highest threshold)")
    return Outcome(scan.threshold, scan.cliques,
                    notes + budget_note + _kept_note(len(scan.cliques), n_clusters, scan.floor))


def _nth_largest_size(size_counts: np.ndarray, n_clusters: int, min_size: int) -> int:
    """The N0-th largest group size given counts of groups per size, or 0 if fewer than N0 groups are counted."""
    at_least = np.cumsum(size_counts[::-1])[::-1]  # groups with >= s members, for every s
    reached = np.flatnonzero(at_least >= n_clusters)
    size = int(reached[-1]) if len(reached) else 0
    return size if size >= min_size else 0


def complete_linkage_method(run: CandidateSimilarities, n_clusters: int, min_size: int, work_budget: int) -> Outcome:
    """Complete-linkage agglomeration on 1 - similarity, cut where the N0-th largest group is biggest.

    Cuts at or above the same 25th-percentile start, with no step size, are candidates; the one whose N0-th largest
    group of at least ``min_size`` members is biggest is used, the highest threshold among equals: the same rule as
    ``best_threshold_method``, on the tree. (Keeping the lowest threshold that still has N0 groups lets groups absorb
    unrelated candidates and each other.) Every group is a clique of the graph at the reported threshold (its
    members' smallest pairwise similarity is at least the threshold). Merges of equal height are applied together,
    so the result never depends on scipy's order within ties. No clique search: ``work_budget`` does not apply.
    """
    del work_budget
    n, start = run.n, run.start
    tree = linkage((SIMILARITY_SCALE - run.off_diagonal).astype(np.float64), method="complete")
    heights = tree[:, 2]
    # Every cut of the tree at or above the start threshold is a candidate (whole tie groups only, so the result
    # never depends on scipy's order within ties). Walk the merges upwards (threshold downwards) and keep the cut
    # whose N0-th largest group is biggest; the first such cut met is the highest threshold among equals.
    sizes = [1] * n + [0] * (n - 1)
    size_counts = np.zeros(n + 1, dtype=np.int64)
    size_counts[1] = n
    best_size = _nth_largest_size(size_counts, n_clusters, min_size)
    cut_height = -1.0  # -1: no merge applied
    for step, (left, right, height, size) in enumerate(tree):
        if height > SIMILARITY_SCALE - start:
            break
        size_counts[sizes[int(left)]] -= 1
        size_counts[sizes[int(right)]] -= 1
        sizes[n + step] = int(size)
        size_counts[int(size)] += 1
        ends_tie = step + 1 == len(tree) or heights[step + 1] != height
        if ends_tie:
            nth_size = _nth_largest_size(size_counts, n_clusters, min_size)
            if nth_size > best_size:
                best_size, cut_height = nth_size, float(height)
    if best_size == 0:
        raise NoThreshold(f"complete linkage never has {n_clusters} groups of at least {min_size} members among the "
                          f"{n} candidates above the start threshold {similarity(start):.5f}")
    labels = fcluster(tree, cut_height, "distance") if cut_height >= 0 else np.arange(n)
    groups = [c.tolist() for c in components_in_index_order(labels, min_size)]
    threshold = SIMILARITY_SCALE - int(max(cut_height, 0))
    notes = [f"threshold {similarity(threshold):.5f}: every group's smallest pairwise similarity is at least this; "
             f"chosen because its N0-th largest group ({best_size} members, N0 = {n_clusters}) is the largest of all "
             f"cuts from {similarity(start):.5f} (the 25th percentile of the off-diagonal similarities) up (ties: the "
             "highest threshold)"]
    return Outcome(threshold, groups, notes + _kept_note(len(groups), n_clusters, min_size))

