"""CliqueCluster: from N candidate images to the N0 images most likely to be fine-tuning images (paper Sec. 4.3).

Two methods, both deterministic (same embeddings in, same clusters out):

``paper``
    The paper's procedure. The similarity threshold starts at the 25th percentile of the off-diagonal similarities and
    rises in steps of 0.01. At each threshold the graph (edge where similarity >= threshold) is partitioned greedily:
    repeatedly remove a maximum clique. The first threshold at which the partition has at least N0 cliques of at least
    ``min_clique_size`` members is used; the N0 largest of them are the clusters. Deterministic and fast where the
    paper's code is neither:

    * the start is the exact percentile, not one of 1000 unseeded random entries;
    * among maximum cliques the lexicographically smallest (by sorted candidate index) is removed, so the partition is
      a function of the graph alone;
    * an exact maximum-clique solver (bitset branch and bound with greedy-colouring bounds) runs per connected
      component; each maximum-clique search may take at most ``work_budget`` steps, and a threshold where one needs
      more is skipped, as the paper's code skips a threshold whose subprocess times out after 30 s, but the same on
      every machine;
    * connected components (exact at every threshold from one single-linkage tree) give a monotone bound: the number
      of cliques of at least s members is at most sum(|C| // s) over components C, which never grows with the
      threshold, so once it drops below N0 the scan stops (no higher threshold can reach N0).

``complete_linkage``
    Complete-linkage agglomeration on 1 - similarity. Its merge heights are monotone, so raising the threshold only
    splits groups and "raise the threshold (from the same 25th-percentile start) until there are N0 groups of at
    least ``min_clique_size`` members" is exact, with no step size; every group is a clique of the graph at the
    reported threshold (its members' smallest pairwise similarity is at least the threshold). Merges of equal height
    are applied or undone together, so the result never depends on scipy's order within ties.

Similarities are computed in float64 and rounded to multiples of 1e-5 before any comparison, so BLAS rounding
differences between machines cannot move a pair across a threshold (except for a value within ~1e-16 of a rounding
boundary). The centre of a cluster is the member with the highest summed similarity to its cluster (= nearest the
mean descriptor); ties go to the smallest index. Clusters are ordered by size, biggest first, ties by smallest member.
"""
from __future__ import annotations

import heapq
import json
from dataclasses import asdict, dataclass
from typing import Sequence, Union

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.sparse.csgraph import connected_components

from .embeddings import Embeddings, check_unit_rows

METHODS = ("paper", "complete_linkage")
SIMILARITY_SCALE = 100_000  # similarities become integers in units of 1e-5
THRESHOLD_STEP = SIMILARITY_SCALE // 100  # the paper's +0.01
START_PERCENTILE = 25
DEFAULT_MIN_CLIQUE_SIZE = 2
# Steps (search nodes + vertices coloured) one maximum-clique search may use: ~0.1-0.2 s of Python on the 2-core
# development machine. Graphs of well separated candidates need far fewer; dense low-threshold graphs need
# astronomically more (the paper's code times out there).
DEFAULT_WORK_BUDGET = 60_000

VectorsLike = Union[Embeddings, np.ndarray, Sequence[Sequence[float]]]


@dataclass(frozen=True)
class ClusterResult:
    """N0 clusters of candidates, biggest first. All indices refer to rows of the clustered embeddings."""

    method: str
    n_candidates: int
    n_clusters: int
    min_clique_size: int
    threshold: float  # similarity threshold at which every cluster is a clique
    centres: tuple[int, ...]  # the extracted images: one candidate per cluster
    members: tuple[tuple[int, ...], ...]  # ascending candidate indices per cluster
    sizes: tuple[int, ...]
    mean_similarities: tuple[float | None, ...]  # mean pairwise similarity inside each cluster; None for singletons
    notes: tuple[str, ...]

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def summary(self) -> str:
        """A few human-readable lines for a text output."""
        lines = [f"{self.method}: {self.n_clusters} clusters of {self.n_candidates} candidates at threshold "
                 f"{self.threshold:.5f} (min clique size {self.min_clique_size})"]
        for rank, (centre, size, mean) in enumerate(zip(self.centres, self.sizes, self.mean_similarities)):
            shown = "-" if mean is None else f"{mean:.4f}"
            lines.append(f"  #{rank}: centre {centre}, {size} members, mean similarity {shown}")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


class WorkBudgetExceeded(Exception):
    """A maximum-clique search needed more steps than allowed."""


# ----------------------------------------------------------------------------------------------------- similarities
def _as_unit_vectors(embeddings: VectorsLike) -> np.ndarray:
    vectors = embeddings.vectors if isinstance(embeddings, Embeddings) else np.asarray(embeddings, dtype=np.float64)
    if vectors.ndim != 2 or vectors.shape[0] < 1:
        raise ValueError(f"need at least one candidate embedding (an N x d matrix), got shape {vectors.shape}")
    check_unit_rows(vectors, "candidate embeddings")
    return vectors.astype(np.float64)


def quantised_similarities(vectors: np.ndarray) -> np.ndarray:
    """N x N int32 cosine similarities in units of 1/SIMILARITY_SCALE, diagonal exactly SIMILARITY_SCALE."""
    sims = np.rint(vectors @ vectors.T * SIMILARITY_SCALE)
    np.fill_diagonal(sims, SIMILARITY_SCALE)
    return sims.astype(np.int32)


def _condensed(sims: np.ndarray) -> np.ndarray:
    """Upper-triangle entries row by row (scipy's condensed order) without N^2 index arrays."""
    n = sims.shape[0]
    return np.concatenate([sims[i, i + 1:] for i in range(n - 1)]) if n > 1 else np.zeros(0, dtype=sims.dtype)


# --------------------------------------------------------------------------------------- exact greedy clique partition
class _Budget:
    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0

    def spend(self, steps: int) -> None:
        self.used += steps
        if self.used > self.limit:
            raise WorkBudgetExceeded


class _Graph:
    """Adjacency bitsets (Python ints, bit j of rows[i] = edge i-j) of one component, vertices in index order."""

    def __init__(self, rows: list[int]):
        self.rows = rows
        self.size = len(rows)
        full = (1 << self.size) - 1
        self.later = [full ^ ((1 << (v + 1)) - 1) for v in range(self.size)]  # vertices after v

    def colour_classes(self, candidates: int, cap: int, budget: _Budget) -> int:
        """Greedy colouring of ``candidates``; returns the number of colour classes, or ``cap`` once it reaches it.

        A clique inside ``candidates`` has at most one vertex per class, so this bounds the clique size.
        """
        classes, uncoloured, coloured = 0, candidates, 0
        while uncoloured:
            classes += 1
            if classes >= cap:
                break
            free = uncoloured
            while free:
                lowest = free & -free
                uncoloured ^= lowest
                free &= ~(self.rows[lowest.bit_length() - 1] | lowest)
                coloured += 1
        budget.spend(coloured + 1)
        return classes

    def first_clique(self, candidates: int, size: int, budget: _Budget) -> int | None:
        """The lexicographically first clique of exactly ``size`` vertices inside ``candidates`` (bitmask), or None.

        Depth first, lowest vertex included first: cliques are met in lexicographic order of their sorted members.
        """
        if size == 0:
            return 0
        if candidates.bit_count() < size or self.colour_classes(candidates, size, budget) < size:
            return None
        while candidates.bit_count() >= size:
            lowest = candidates & -candidates
            vertex = lowest.bit_length() - 1
            rest = self.first_clique(candidates & self.rows[vertex], size - 1, budget)
            if rest is not None:
                return rest | lowest
            candidates ^= lowest
        return None

    def greedy_partition(self, min_size: int, budget_limit: int) -> list[list[int]]:
        """Repeatedly remove the lexicographically first maximum clique; return the cliques of >= min_size vertices.

        Keeps for each vertex v an upper bound on the largest clique whose lowest vertex is v (it stays valid as the
        graph shrinks), so each removal re-examines only vertices whose bound is the current maximum. The first
        vertex with the maximum bound that attains it roots the lexicographically first maximum clique. Each
        removal's search may use ``budget_limit`` steps (WorkBudgetExceeded otherwise).
        """
        alive = (1 << self.size) - 1
        bound = [1 + (row & later).bit_count() for row, later in zip(self.rows, self.later)]
        heap = [(-b, v) for v, b in enumerate(bound)]
        heapq.heapify(heap)
        cliques: list[list[int]] = []
        while alive:
            budget = _Budget(budget_limit)
            while True:
                negative_bound, vertex = heap[0]
                if not alive >> vertex & 1 or -negative_bound != bound[vertex]:
                    heapq.heappop(heap)  # stale entry
                    continue
                target = bound[vertex]
                if target < min_size:
                    return cliques  # every remaining clique is too small to count
                if target == 1:  # only isolated vertices remain: each is its own clique, in index order
                    cliques.extend([v] for v in _members(alive))
                    return cliques
                candidates = self.rows[vertex] & alive & self.later[vertex]
                colours = self.colour_classes(candidates, target - 1, budget)
                if 1 + colours < target:
                    bound[vertex] = 1 + colours
                else:
                    rest = self.first_clique(candidates, target - 1, budget)
                    if rest is not None:
                        clique = rest | (1 << vertex)
                        break
                    bound[vertex] = target - 1
                heapq.heapreplace(heap, (-bound[vertex], vertex))
            alive &= ~clique
            cliques.append(_members(clique))
        return cliques


def _members(mask: int) -> list[int]:
    """Indices of the set bits of ``mask``, ascending."""
    members = []
    while mask:
        lowest = mask & -mask
        members.append(lowest.bit_length() - 1)
        mask ^= lowest
    return members


def _bitset_rows(adjacency: np.ndarray) -> list[int]:
    packed = np.packbits(adjacency, axis=1, bitorder="little")
    return [int.from_bytes(row.tobytes(), "little") for row in packed]


def greedy_clique_partition(adjacency: np.ndarray, min_size: int = 1,
                            work_budget: int = DEFAULT_WORK_BUDGET) -> list[list[int]]:
    """Greedy partition of a graph into maximum cliques (lexicographically first among ties), per component.

    ``adjacency``: symmetric boolean N x N (diagonal ignored). Returns the cliques with at least ``min_size`` members,
    in removal order within each component, components in order of their smallest vertex. Raises
    WorkBudgetExceeded when one maximum-clique search needs more than ``work_budget`` steps.
    """
    adjacency = np.asarray(adjacency, dtype=bool).copy()
    np.fill_diagonal(adjacency, False)
    _, labels = connected_components(adjacency, directed=False)
    cliques = []
    for component in _components_in_index_order(labels):
        cliques.extend(_partition_component(adjacency[np.ix_(component, component)], component, min_size,
                                            work_budget))
    return cliques


def _components_in_index_order(labels: np.ndarray) -> list[np.ndarray]:
    order = np.argsort(labels, kind="stable")
    boundaries = np.flatnonzero(np.diff(labels[order])) + 1
    components = np.split(order, boundaries)
    return sorted(components, key=lambda members: int(members[0]))


def _partition_component(adjacency: np.ndarray, members: np.ndarray, min_size: int,
                         work_budget: int) -> list[list[int]]:
    """Cliques of one component (``adjacency`` without self loops, rows in the order of ``members``)."""
    size = len(members)
    if size < min_size:
        return []
    if size == 1 or adjacency.sum() == size * (size - 1):  # complete: the component is its own maximum clique
        return [members.tolist()]
    local = _Graph(_bitset_rows(adjacency)).greedy_partition(min_size, work_budget)
    return [members[clique].tolist() for clique in local]


# ------------------------------------------------------------------------------------------------------ the methods
@dataclass
class _Outcome:
    threshold: int
    clusters: list[list[int]]  # every counted clique/group, any order
    notes: list[str]


def _start_threshold(off_diagonal: np.ndarray) -> int:
    """The 25th percentile (lower order statistic) of the off-diagonal similarities."""
    rank = (len(off_diagonal) - 1) * START_PERCENTILE // 100
    return int(np.partition(off_diagonal, rank)[rank])


def _paper_method(sims: np.ndarray, off_diagonal: np.ndarray, n_clusters: int, min_size: int,
                  work_budget: int) -> _Outcome:
    n = sims.shape[0]
    start = _start_threshold(off_diagonal)
    highest = int(off_diagonal.max())
    # Components at any threshold t are the single-linkage clusters whose merge distance is <= SCALE - t.
    single = linkage((SIMILARITY_SCALE - off_diagonal).astype(np.float64), method="single")
    skipped, best_count = [], 0
    threshold = start
    while True:
        components = _components_in_index_order(fcluster(single, SIMILARITY_SCALE - threshold, "distance"))
        capacity = sum(len(c) // min_size for c in components)
        if capacity < n_clusters:  # never grows with the threshold: no later threshold can reach N0 either
            break
        try:
            cliques = _partition_threshold_graph(sims, threshold, components, min_size, work_budget)
        except WorkBudgetExceeded:
            skipped.append(threshold)
        else:
            best_count = max(best_count, len(cliques))
            if len(cliques) >= n_clusters:
                notes = [f"threshold {_similarity(threshold):.5f}: start {_similarity(start):.5f} (25th percentile of "
                         f"the off-diagonal similarities) + {(threshold - start) // THRESHOLD_STEP} steps of 0.01"]
                if skipped:
                    notes.append(f"skipped {len(skipped)} lower threshold(s) where a maximum-clique search exceeded "
                                 f"the work budget of {work_budget} steps "
                                 f"({', '.join(f'{_similarity(t):.5f}' for t in skipped[:5])}"
                                 f"{', ...' if len(skipped) > 5 else ''})")
                if len(cliques) > n_clusters:
                    notes.append(f"the paper's rule kept {len(cliques)} cliques of >= {min_size} members; "
                                 f"kept the {n_clusters} largest")
                return _Outcome(threshold, cliques, notes)
        if threshold > highest:  # all singletons from here on
            break
        threshold += THRESHOLD_STEP
    raise ValueError(
        f"no threshold from {_similarity(start):.5f} upwards partitions the {n} candidates into {n_clusters} cliques "
        f"of at least {min_size} members (at most {best_count} found"
        f"{f'; {len(skipped)} thresholds skipped for the work budget' if skipped else ''}): lower min_clique_size "
        "or N0, generate more candidates, or raise the work budget"
    )


def _partition_threshold_graph(sims: np.ndarray, threshold: int, components: list[np.ndarray], min_size: int,
                               work_budget: int) -> list[list[int]]:
    adjacency = None
    cliques: list[list[int]] = []
    for component in components:
        if len(component) == 1:
            cliques.extend([[int(component[0])]] if min_size == 1 else [])
            continue
        if adjacency is None:
            adjacency = sims >= threshold
            np.fill_diagonal(adjacency, False)
        block = adjacency if len(component) == len(sims) else adjacency[np.ix_(component, component)]
        cliques.extend(_partition_component(block, component, min_size, work_budget))
    return cliques


def _complete_linkage_method(sims: np.ndarray, off_diagonal: np.ndarray, n_clusters: int,
                             min_size: int) -> _Outcome:
    n = sims.shape[0]
    start = _start_threshold(off_diagonal)
    tree = linkage((SIMILARITY_SCALE - off_diagonal).astype(np.float64), method="complete")
    heights = tree[:, 2]
    # Raising the threshold from the start undoes merges, highest first. Walk the merges upwards instead (lowest
    # first), tracking how many groups have >= min_size members, and keep the coarsest cut (whole tie groups only,
    # at or above the start threshold) that still has N0 of them.
    sizes = [1] * n + [0] * (n - 1)
    counted = n if min_size <= 1 else 0
    cut_height = -1.0 if counted >= n_clusters else None  # -1: no merge applied
    for step, (left, right, height, size) in enumerate(tree):
        if height > SIMILARITY_SCALE - start:
            break
        counted -= (sizes[int(left)] >= min_size) + (sizes[int(right)] >= min_size)
        sizes[n + step] = int(size)
        counted += int(size) >= min_size
        ends_tie = step + 1 == len(tree) or heights[step + 1] != height
        if ends_tie and counted >= n_clusters:
            cut_height = float(height)
    if cut_height is None:
        raise ValueError(f"complete linkage never has {n_clusters} groups of at least {min_size} members among the "
                         f"{n} candidates above the start threshold {_similarity(start):.5f}: lower min_clique_size "
                         "or N0, or generate more candidates")
    labels = fcluster(tree, cut_height, "distance") if cut_height >= 0 else np.arange(n)
    groups = [c.tolist() for c in _components_in_index_order(labels) if len(c) >= min_size]
    threshold = SIMILARITY_SCALE - int(max(cut_height, 0))
    notes = [f"threshold {_similarity(threshold):.5f}: every group's smallest pairwise similarity is at least this "
             f"(threshold scan from {_similarity(start):.5f}, the 25th percentile of the off-diagonal similarities)"]
    if len(groups) > n_clusters:
        notes.append(f"{len(groups)} groups of >= {min_size} members at this threshold; kept the {n_clusters} largest")
    return _Outcome(threshold, groups, notes)


def _similarity(units: int) -> float:
    return round(units / SIMILARITY_SCALE, 5)


# ------------------------------------------------------------------------------------------------------- public API
def cluster_candidates(embeddings: VectorsLike, n_clusters: int, method: str = "paper",
                       min_clique_size: int = DEFAULT_MIN_CLIQUE_SIZE,
                       work_budget: int = DEFAULT_WORK_BUDGET) -> ClusterResult:
    """Group N candidate embeddings (unit rows) into exactly ``n_clusters`` (N0) clusters and pick their centres.

    ``method``: ``"paper"`` or ``"complete_linkage"`` (see the module docstring). ``min_clique_size``: clusters with
    fewer members are not counted (1 reproduces the paper's code, where stray singletons count; the default 2 keeps a
    lone candidate, which nothing else resembles, from being reported as extracted). ``work_budget``: steps one
    maximum-clique search may take before its threshold is skipped (``paper`` only).
    Raises ValueError with advice for invalid input or when no threshold yields N0 clusters.
    """
    if method not in METHODS:
        raise ValueError(f"unknown clustering method {method!r}: choose one of {', '.join(METHODS)}")
    vectors = _as_unit_vectors(embeddings)
    n = vectors.shape[0]
    if not 1 <= n_clusters <= n:
        raise ValueError(f"N0 = {n_clusters} clusters cannot be taken from {n} candidates: N0 must be between 1 and "
                         f"the number of candidates (the paper generates N = 50 x N0 candidates)")
    if min_clique_size < 1 or n_clusters * min_clique_size > n:
        raise ValueError(f"{n_clusters} clusters of at least {min_clique_size} members need at least "
                         f"{n_clusters * min_clique_size} candidates, there are {n}: lower min_clique_size (>= 1) "
                         "or N0, or generate more candidates")
    if work_budget < 1:
        raise ValueError("work_budget must be a positive number of steps")
    sims = quantised_similarities(vectors)
    if n == 1:
        outcome = _Outcome(SIMILARITY_SCALE, [[0]], ["a single candidate is its own cluster"])
    elif method == "paper":
        outcome = _paper_method(sims, _condensed(sims), n_clusters, min_clique_size, work_budget)
    else:
        outcome = _complete_linkage_method(sims, _condensed(sims), n_clusters, min_clique_size)

    ranked = sorted((sorted(c) for c in outcome.clusters), key=lambda c: (-len(c), c[0]))[:n_clusters]
    centres, means = [], []
    for members in ranked:
        block = sims[np.ix_(members, members)].astype(np.int64)
        centres.append(members[int(np.argmax(block.sum(axis=1)))])  # argmax takes the first (smallest) on ties
        pairs = len(members) * (len(members) - 1)
        means.append(None if pairs == 0 else round(float(block.sum() - np.trace(block)) / pairs / SIMILARITY_SCALE, 5))
    return ClusterResult(
        method=method, n_candidates=n, n_clusters=n_clusters, min_clique_size=min_clique_size,
        threshold=_similarity(outcome.threshold), centres=tuple(centres),
        members=tuple(tuple(m) for m in ranked), sizes=tuple(len(m) for m in ranked),
        mean_similarities=tuple(means), notes=tuple(outcome.notes),
    )
