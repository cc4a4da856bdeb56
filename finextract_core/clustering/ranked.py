"""The ranked method: cliques of every threshold, the N0 most likely memorised images among them (``ranking``)."""
from __future__ import annotations

import numpy as np

from .cliques import WorkBudgetExceeded, greedy_clique_cover, partition_component
from .methods import NoThreshold, Outcome
from .ranking import MemorisationScorer, select_disjoint
from .similarities import SIMILARITY_SCALE, CandidateSimilarities, similarity
from .thresholds import THRESHOLD_STEP, ThresholdGraphs


def ranked_cliques_method(run: CandidateSimilarities, n_clusters: int, min_size: int, work_budget: int) -> Outcome:
    """Cliques of the threshold graphs from the top down; the N0 disjoint ones with the best memorisation score.

    A memorised image's copies form a clique at a threshold near their own similarity, a style's look-alikes only at
    a much lower one, so no single threshold suits every group. The scan walks the paper's grid (the 25th-percentile
    start + k x 0.01) from the highest similarity down and collects the greedy clique partition's cliques of at
    least ``min_size`` members at every threshold (at least 2: single candidates score 0, and are only added where
    N0 needs them). It ends at the start, or earlier at the first threshold where one
    component holds more than half the candidates once the cliques collected hold N0 disjoint ones: below that the
    background links everything and new cliques are chance ones. A piece of a graph whose exact partition needs more
    than ``work_budget`` steps per search is partitioned by the cheaper greedy clique cover instead (noted), and the
    scan goes on. A piece whose members and edges are those of the threshold above has the same cliques and is not
    searched again. The clusters are the disjoint cliques with the best scores, chosen greedily, best first; where
    fewer than N0 disjoint cliques of ``min_size`` (above 2) members exist, NoThreshold asks for smaller ones.
    """
    if min_size > 2:
        outcome = _ranked_cliques(run, n_clusters, min_size, work_budget)
        if len(outcome.clusters) < n_clusters:
            raise NoThreshold(f"the threshold graphs hold {len(outcome.clusters)} disjoint cliques of at least "
                              f"{min_size} members, not N0 = {n_clusters}")
        return outcome
    # Single candidates score 0 and need no search: the result's completion adds them where N0 needs them.
    return _ranked_cliques(run, n_clusters, 2, work_budget)


def _ranked_cliques(run: CandidateSimilarities, n_clusters: int, min_size: int, work_budget: int) -> Outcome:
    graphs, scorer = ThresholdGraphs(run), MemorisationScorer(run)
    top = graphs.start + (graphs.highest - graphs.start) // THRESHOLD_STEP * THRESHOLD_STEP
    found: dict[tuple[int, ...], tuple[int, float]] = {}  # clique -> (highest threshold it was found at, score)
    previous: dict[tuple[int, ...], int] = {}  # the pieces of the threshold above: members -> edges
    covered: list[int] = []  # thresholds where a piece was too dense for the exact search
    lowest, stopped_early = top, False
    for threshold in range(top, graphs.start - 1, -THRESHOLD_STEP):
        labels = graphs.component_labels(threshold)
        if 2 * int(np.bincount(labels).max()) > run.n and len(_best(found, n_clusters, run.n)) == n_clusters:
            stopped_early = True
            break
        current = {}
        for members, adjacency in graphs.pieces(threshold, labels, min_size):
            key, edges = tuple(members.tolist()), int(adjacency.sum())
            current[key] = edges
            if previous.get(key) == edges:
                continue
            try:
                cliques = partition_component(adjacency, members, min_size, work_budget)
            except WorkBudgetExceeded:
                cliques = [members[clique].tolist() for clique in greedy_clique_cover(adjacency, min_size)]
                if not covered or covered[-1] != threshold:
                    covered.append(threshold)
            for clique in cliques:
                clique = tuple(sorted(clique))
                if clique not in found:
                    found[clique] = (threshold, scorer.evidence(list(clique)).score)
        previous, lowest = current, threshold

    chosen = _best(found, n_clusters, run.n)
    threshold = min((found[tuple(clique)][0] for clique in chosen), default=SIMILARITY_SCALE)
    end = ("where one component first holds more than half the candidates" if stopped_early else
           "the start (25th percentile of the off-diagonal similarities)")
    notes = [f"cliques of >= {min_size} members of every threshold from {similarity(top):.5f} down to "
             f"{similarity(lowest):.5f} ({end}): {len(found)} distinct; kept the {len(chosen)} disjoint ones with the "
             f"best memorisation scores (background similarity {similarity(run.background):.5f}, the median)"]
    if covered:
        notes.append(f"at {len(covered)} threshold(s) ({similarity(covered[0]):.5f} to {similarity(covered[-1]):.5f}) "
                     f"a piece of the graph needed more than the work budget of {work_budget} steps per maximum-clique "
                     "search: its cliques come from a greedy clique cover (cliques, not always maximum ones)")
    return Outcome(threshold, chosen, notes)


def _best(found: dict[tuple[int, ...], tuple[int, float]], n_clusters: int, n: int) -> list[list[int]]:
    return select_disjoint([(score, list(clique)) for clique, (_, score) in found.items()], n_clusters, n)
