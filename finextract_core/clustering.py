"""CliqueCluster: from N candidate images to the N0 images most likely to be fine-tuning images (paper Sec. 4.3).

Three methods, all deterministic (same embeddings in, same clusters out). All scan similarity thresholds upwards from
the 25th percentile of the off-diagonal similarities and keep the N0 largest cliques/groups of the chosen threshold.

``best_threshold`` (the default)
    Every threshold from the start up to the largest similarity in steps of 0.01 is a candidate; its score is the
    size of the N0-th largest clique of the paper's greedy clique partition (below). The threshold with the highest
    score is used, the highest threshold among equals (tightest cliques). Planted groups are recovered where the
    paper's first-threshold rule merges them (see ``paper``). Kept fast by bounds, not by approximation: a
    threshold is only searched for cliques that would beat the best score so far, the components (a maximum
    spanning tree gives them at every threshold) and the (score - 1)-cores of the graph rule most thresholds out
    without a search, and components that are cliques bound every threshold's score from below before the scan.
    The scan runs from the top down and ends at the first threshold where a maximum-clique search exceeds the work
    budget (lower thresholds have denser graphs; the note names it).

``paper``
    The paper's procedure. The similarity threshold starts at the 25th percentile of the off-diagonal similarities and
    rises in steps of 0.01. At each threshold the graph (edge where similarity >= threshold) is partitioned greedily:
    repeatedly remove a maximum clique. The first threshold at which the partition has at least N0 cliques of at least
    ``min_clique_size`` members is used; the N0 largest of them are the clusters. Faithful to the paper, including
    its weakness: when inter-group pairs make up much of the similarities, the start threshold already links many of
    them and the first threshold may merge groups. Two groups of 10 near-duplicates (similarity ~0.9996 inside,
    ~-0.19 between) with N0 = 2: half the pairs are inter-group, so the start links half the inter-group pairs, the
    partition is a mixed 15-clique and a 5-clique, that is N0 cliques, and the scan stops there. Deterministic and
    fast where the paper's code is neither:

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

``complete_linkage``
    Complete-linkage agglomeration on 1 - similarity, cut (at or above the same 25th-percentile start, with no step
    size) where the N0-th largest group of at least ``min_clique_size`` members is biggest, the highest threshold
    among equals: the same rule as ``best_threshold``, on the tree. (Keeping the lowest threshold that still has N0
    groups, the earlier rule, lets groups absorb unrelated candidates and each other.) Every group is a clique of the
    graph at the reported threshold (its members' smallest pairwise similarity is at least the threshold). Merges of
    equal height are applied together, so the result never depends on scipy's order within ties.

Similarities are computed in float64 and rounded to multiples of 1e-5 before any comparison, so BLAS rounding
differences between machines cannot move a pair across a threshold (except for a value within ~1e-16 of a rounding
boundary). The centre of a cluster is the member with the highest summed similarity to its cluster (= nearest the
mean descriptor); ties go to the smallest index. Clusters are ordered by size, biggest first, ties by smallest member.
"""
from __future__ import annotations

import heapq
import json
from dataclasses import asdict, dataclass, field
from typing import Sequence, Union

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .embeddings import Embeddings, check_unit_rows

METHODS = ("best_threshold", "paper", "complete_linkage")  # the first is the default
METHOD_DESCRIPTIONS = {  # one line each, for tooltips
    "best_threshold": "Scans every 0.01 threshold from the 25th percentile up and uses the one whose N0-th largest "
                      "clique (greedy clique partition) is biggest: robust when groups are well separated.",
    "paper": "The paper's rule: the first threshold from the 25th percentile whose greedy clique partition has N0 "
             "cliques; can merge groups when inter-group pairs dominate that percentile (two groups of 10 near-"
             "duplicates at N0 = 2 come out as mixed cliques of 15 and 5).",
    "complete_linkage": "Complete-linkage tree cut where the N0-th largest group is biggest; every group is a clique "
                        "at the reported threshold.",
}
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
    """N x N int32 cosine similarities in units of 1/SIMILARITY_SCALE, diagonal exactly SIMILARITY_SCALE.

    The same float64 products as ``vectors @ vectors.T``, in blocks of rows against the rows from the block on: half
    the multiplications, and no N x N float64 temporaries (their allocation and passes cost as much as the product).
    """
    n = vectors.shape[0]
    sims = np.empty((n, n), dtype=np.int32)
    rows_per_block = max(1, 2 ** 22 // n)
    for first in range(0, n, rows_per_block):
        last = min(n, first + rows_per_block)
        block = vectors[first:last] @ vectors[first:].T
        block *= SIMILARITY_SCALE
        np.rint(block, out=block)
        sims[first:last, first:] = block
        sims[last:, first:last] = block[:, last - first:].T
    np.fill_diagonal(sims, SIMILARITY_SCALE)
    return sims


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
        # Colouring is the hot loop of dense searches: one precomputed mask saves big-int operations per vertex.
        self.non_neighbours = [full ^ row ^ (1 << v) for v, row in enumerate(rows)]

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
                free &= self.non_neighbours[lowest.bit_length() - 1]
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
        if self._first_search_exceeds(bound, min_size, budget_limit):
            raise WorkBudgetExceeded
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

    def _first_search_exceeds(self, bound: list[int], min_size: int, budget_limit: int) -> bool:
        """Whether the first removal's search is sure to need more than ``budget_limit`` steps, without running it.

        The first removal cannot end before every vertex whose initial bound b exceeds both the clique number and
        min_size - 1 has been examined at that bound, and colouring its b - 1 later neighbours costs at least b - 1
        steps. A greedy colouring of the whole graph (about one examination's cost) bounds the clique number. Dense
        graphs, which would spend the whole budget on such examinations, are ruled out here at a fraction of it.
        """
        costs = sorted(bound, reverse=True)
        spent = 0
        for examined, b in enumerate(costs):
            spent += b - 1
            if spent > budget_limit:
                break
        else:
            return False
        # The vertices with the examined + 1 largest bounds cost more than the budget if all their bounds exceed the
        # clique number, that is if the graph can be coloured with fewer than costs[examined] colours.
        cap = costs[examined]
        if cap <= min_size - 1:
            return False
        return self.colour_classes((1 << self.size) - 1, cap, _Budget(self.size + 1)) < cap


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
    if size == 1 or np.count_nonzero(adjacency) == size * (size - 1):  # complete: the component is its own maximum clique
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


def _maximum_spanning_tree(sims: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sources, targets, similarities) of a maximum spanning tree of the complete similarity graph (Prim, O(N^2)).

    The components of the threshold graph at t are those of the tree's edges with similarity >= t, at every t.
    """
    n = sims.shape[0]
    lowest = np.iinfo(sims.dtype).min
    best = sims[0].copy()  # best link of each vertex outside the tree to the tree
    best[0] = lowest
    parent = np.zeros(n, dtype=np.int64)
    outside = np.ones(n, dtype=bool)
    outside[0] = False
    sources, targets, weights = (np.empty(n - 1, dtype=np.int64) for _ in range(3))
    improves = np.empty(n, dtype=bool)
    for edge in range(n - 1):
        vertex = int(np.argmax(best))
        sources[edge], targets[edge], weights[edge] = parent[vertex], vertex, best[vertex]
        best[vertex] = lowest
        outside[vertex] = False
        np.greater(sims[vertex], best, out=improves)
        improves &= outside
        np.copyto(best, sims[vertex], where=improves)
        parent[improves] = vertex
    return sources, targets, weights


class _ThresholdGraphs:
    """The graphs "similarity >= t" of one quantised similarity matrix at the thresholds start + k * 0.01 (start: the
    25th percentile of the off-diagonal similarities) up to the first above the highest of them: components, degrees
    and the pieces of cores in which cliques are searched."""

    def __init__(self, sims: np.ndarray, off_diagonal: np.ndarray):
        self.sims = sims
        self.start = _start_threshold(off_diagonal)
        self.highest = int(off_diagonal.max())
        self.n_thresholds = (self.highest - self.start) // THRESHOLD_STEP + 2
        self.tree = _maximum_spanning_tree(sims)
        self._degrees: np.ndarray | None = None

    def component_labels(self, threshold: int) -> np.ndarray:
        sources, targets, weights = self.tree
        kept = weights >= threshold
        n = self.sims.shape[0]
        links = coo_matrix((np.ones(int(kept.sum()), dtype=np.int8), (sources[kept], targets[kept])), shape=(n, n))
        return connected_components(links, directed=False)[1]

    def degrees(self, threshold: int) -> np.ndarray:
        if self._degrees is None:
            self._degrees = _degrees_on_grid(self.sims, self.start, self.n_thresholds)
        return self._degrees[:, (threshold - self.start) // THRESHOLD_STEP]

    def pieces(self, threshold: int, labels: np.ndarray, min_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """(members, adjacency without self loops) of the connected pieces of the graph's (min_size - 1)-core.

        Every clique of at least ``min_size`` members lies in one piece, and the greedy partition's cliques of at
        least ``min_size`` members are the same in the pieces as in the whole graph: each maximum clique it removes
        lies in the core of what remains, which lies in this core.
        """
        kept = np.bincount(labels)[labels] >= min_size
        if min_size > 2:  # below that, a component of >= min_size vertices is its own core
            # Peel on whole rows of the similarity matrix: no block of a large component is gathered before the
            # core is known (dense thresholds often have a large component and an empty core).
            degrees = np.where(kept, self.degrees(threshold), 0)
            # A component with fewer than min_size vertices of degree >= min_size - 1 goes whole, without row updates.
            eligible = np.bincount(labels, weights=degrees >= min_size - 1)
            kept &= eligible[labels] >= min_size
            while True:
                dropped = kept & (degrees < min_size - 1)
                if not dropped.any():
                    break
                kept &= ~dropped
                degrees -= (self.sims[dropped] >= threshold).sum(axis=0)
        pieces = []
        for component in _components_in_index_order(labels):
            members = component[kept[component]]
            if len(members) < min_size:
                continue
            block = self._adjacency_among(members, threshold)
            np.fill_diagonal(block, False)
            if len(members) == len(component):  # untouched by the peeling: still connected
                pieces.append((members, block))
                continue
            pieces.extend((members[piece], block if len(piece) == len(members) else block[np.ix_(piece, piece)])
                          for piece in _dense_components(block) if len(piece) >= min_size)
        return pieces

    def _adjacency_among(self, members: np.ndarray, threshold: int) -> np.ndarray:
        """The graph's adjacency among ``members`` (ascending indices).

        Gathering int32 entries by index pairs is slow for a large block; one comes from the whole boolean matrix.
        """
        n = len(self.sims)
        if 2 * len(members) <= n:
            return self.sims[np.ix_(members, members)] >= threshold
        adjacency = self.sims >= threshold
        if len(members) == n:
            return adjacency
        chosen = np.zeros(n, dtype=bool)
        chosen[members] = True
        return adjacency.compress(chosen, axis=0).compress(chosen, axis=1)


def _dense_components(adjacency: np.ndarray) -> list[np.ndarray]:
    """Connected components of a dense boolean graph in order of their smallest vertex, by breadth-first search.

    O(N^2) row operations; converting a dense core of a few thousand vertices to a sparse matrix costs far more.
    """
    unreached = np.ones(len(adjacency), dtype=bool)
    components = []
    while unreached.any():
        reached = np.zeros(len(adjacency), dtype=bool)
        frontier = reached.copy()
        frontier[np.argmax(unreached)] = True
        while frontier.any():
            reached |= frontier
            frontier = adjacency[frontier].any(axis=0) & ~reached
        unreached &= ~reached
        components.append(np.flatnonzero(reached))
    return components


def _partition_pieces(pieces: list[tuple[np.ndarray, np.ndarray]], min_size: int,
                      work_budget: int) -> list[list[int]]:
    """The greedy partition's cliques of at least ``min_size`` members (WorkBudgetExceeded as documented)."""
    cliques: list[list[int]] = []
    for members, adjacency in pieces:
        cliques.extend(_partition_component(adjacency, members, min_size, work_budget))
    return cliques


def _capacity(group_sizes: np.ndarray, size: int) -> int:
    """How many disjoint cliques of ``size`` members groups (components, or pieces of a core) could hold at most.

    Never grows with the threshold: raising it only splits groups or shrinks cores, and floor division is
    superadditive.
    """
    return int((np.asarray(group_sizes) // size).sum())


def _piece_sizes(pieces: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    return np.array([len(members) for members, _ in pieces], dtype=np.int64)


def _grid_notes(threshold: int, start: int) -> list[str]:
    return [f"threshold {_similarity(threshold):.5f}: start {_similarity(start):.5f} (25th percentile of the "
            f"off-diagonal similarities) + {(threshold - start) // THRESHOLD_STEP} steps of 0.01"]


def _kept_note(counted: int, n_clusters: int, min_size: int) -> list[str]:
    return ([f"{counted} cliques/groups of >= {min_size} members at this threshold; kept the {n_clusters} largest"]
            if counted > n_clusters else [])


def _paper_method(sims: np.ndarray, off_diagonal: np.ndarray, n_clusters: int, min_size: int,
                  work_budget: int) -> _Outcome:
    n = sims.shape[0]
    graphs = _ThresholdGraphs(sims, off_diagonal)
    start, highest = graphs.start, graphs.highest
    skipped, best_count = [], 0
    threshold = start
    while True:
        labels = graphs.component_labels(threshold)
        if _capacity(np.bincount(labels), min_size) < n_clusters:  # no later threshold can reach N0 either
            break
        pieces = graphs.pieces(threshold, labels, min_size)
        if _capacity(_piece_sizes(pieces), min_size) < n_clusters:  # the same holds for cores
            break
        try:
            cliques = _partition_pieces(pieces, min_size, work_budget)
        except WorkBudgetExceeded:
            skipped.append(threshold)
        else:
            best_count = max(best_count, len(cliques))
            if len(cliques) >= n_clusters:
                notes = _grid_notes(threshold, start)
                if skipped:
                    notes.append(f"skipped {len(skipped)} lower threshold(s) where a maximum-clique search exceeded "
                                 f"the work budget of {work_budget} steps "
                                 f"({', '.join(f'{_similarity(t):.5f}' for t in skipped[:5])}"
                                 f"{', ...' if len(skipped) > 5 else ''})")
                return _Outcome(threshold, cliques, notes + _kept_note(len(cliques), n_clusters, min_size))
        if threshold > highest:  # all singletons from here on
            break
        threshold += THRESHOLD_STEP
    raise ValueError(
        f"no threshold from {_similarity(start):.5f} upwards partitions the {n} candidates into {n_clusters} cliques "
        f"of at least {min_size} members (at most {best_count} found"
        f"{f'; {len(skipped)} thresholds skipped for the work budget' if skipped else ''}): lower min_clique_size "
        "or N0, generate more candidates, or raise the work budget"
    )


def _degrees_on_grid(sims: np.ndarray, start: int, n_thresholds: int) -> np.ndarray:
    """N x T: column k holds every vertex's degree in the graph at threshold start + k * THRESHOLD_STEP."""
    n = len(sims)
    degrees = np.empty((n, n_thresholds), dtype=np.int64)
    rows_per_chunk = max(1, 2 ** 22 // n)
    for first in range(0, n, rows_per_chunk):
        chunk = sims[first:first + rows_per_chunk].astype(np.int64)
        # 0: below the start; k + 1: at least threshold k but below threshold k + 1 (the last bin is open).
        bins = np.clip((chunk - start) // THRESHOLD_STEP + 1, 0, n_thresholds)
        bins += (np.arange(len(chunk)) * (n_thresholds + 1))[:, None]
        counts = np.bincount(bins.ravel(), minlength=len(chunk) * (n_thresholds + 1)).reshape(len(chunk), -1)
        degrees[first:first + len(chunk)] = np.cumsum(counts[:, :0:-1], axis=1)[:, ::-1]
    return degrees - 1  # the diagonal counts at every threshold


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


def _scan_thresholds(graphs: _ThresholdGraphs, labels: dict[int, np.ndarray], n_clusters: int, min_size: int,
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
        if _capacity(np.bincount(labels[threshold]), floor) < n_clusters:
            continue
        pieces = graphs.pieces(threshold, labels[threshold], floor)
        if _capacity(_piece_sizes(pieces), floor) < n_clusters:
            continue
        try:
            cliques = _partition_pieces(pieces, floor, work_budget)
        except WorkBudgetExceeded:
            scan.too_dense = threshold
            break
        if len(cliques) >= n_clusters:
            scan.size = sorted(map(len, cliques), reverse=True)[n_clusters - 1]
            scan.threshold, scan.cliques, scan.floor = threshold, cliques, floor
    return scan


def _best_threshold_method(sims: np.ndarray, off_diagonal: np.ndarray, n_clusters: int, min_size: int,
                           work_budget: int) -> _Outcome:
    n = sims.shape[0]
    graphs = _ThresholdGraphs(sims, off_diagonal)
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
    budget_note = ([f"scan stopped at {_similarity(scan.too_dense):.5f}: a maximum-clique search exceeded the work "
                    f"budget of {work_budget} steps; lower thresholds were not tried"]
                   if scan.too_dense is not None else [])
    if scan.threshold is None:
        raise ValueError(
            f"no threshold from {_similarity(start):.5f} upwards partitions the {n} candidates into {n_clusters} "
            f"cliques of at least {min_size} members{f' ({budget_note[0]})' if budget_note else ''}: lower "
            "min_clique_size or N0, generate more candidates, or raise the work budget")
    notes = _grid_notes(scan.threshold, start)
    notes.append(f"chosen because its N0-th largest clique ({scan.size} members, N0 = {n_clusters}) is the largest "
                 "of all thresholds scanned (ties: the highest threshold)")
    return _Outcome(scan.threshold, scan.cliques,
                    notes + budget_note + _kept_note(len(scan.cliques), n_clusters, scan.floor))


def _nth_largest_size(size_counts: np.ndarray, n_clusters: int, min_size: int) -> int:
    """The N0-th largest group size given counts of groups per size, or 0 if fewer than N0 groups are counted."""
    at_least = np.cumsum(size_counts[::-1])[::-1]  # groups with >= s members, for every s
    reached = np.flatnonzero(at_least >= n_clusters)
    size = int(reached[-1]) if len(reached) else 0
    return size if size >= min_size else 0


def _complete_linkage_method(sims: np.ndarray, off_diagonal: np.ndarray, n_clusters: int,
                             min_size: int) -> _Outcome:
    n = sims.shape[0]
    start = _start_threshold(off_diagonal)
    tree = linkage((SIMILARITY_SCALE - off_diagonal).astype(np.float64), method="complete")
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
        raise ValueError(f"complete linkage never has {n_clusters} groups of at least {min_size} members among the "
                         f"{n} candidates above the start threshold {_similarity(start):.5f}: lower min_clique_size "
                         "or N0, or generate more candidates")
    labels = fcluster(tree, cut_height, "distance") if cut_height >= 0 else np.arange(n)
    groups = [c.tolist() for c in _components_in_index_order(labels) if len(c) >= min_size]
    threshold = SIMILARITY_SCALE - int(max(cut_height, 0))
    notes = [f"threshold {_similarity(threshold):.5f}: every group's smallest pairwise similarity is at least this; "
             f"chosen because its N0-th largest group ({best_size} members, N0 = {n_clusters}) is the largest of all "
             f"cuts from {_similarity(start):.5f} (the 25th percentile of the off-diagonal similarities) up (ties: the "
             "highest threshold)"]
    return _Outcome(threshold, groups, notes + _kept_note(len(groups), n_clusters, min_size))


def _similarity(units: int) -> float:
    return round(units / SIMILARITY_SCALE, 5)


# ------------------------------------------------------------------------------------------------------- public API
def cluster_candidates(embeddings: VectorsLike, n_clusters: int, method: str = METHODS[0],
                       min_clique_size: int = DEFAULT_MIN_CLIQUE_SIZE,
                       work_budget: int = DEFAULT_WORK_BUDGET) -> ClusterResult:
    """Group N candidate embeddings (unit rows) into exactly ``n_clusters`` (N0) clusters and pick their centres.

    ``method``: one of METHODS, ``"best_threshold"`` by default (see the module docstring). ``min_clique_size``:
    clusters with fewer members are not counted (1 reproduces the paper's code, where stray singletons count; the
    default 2 keeps a lone candidate, which nothing else resembles, from being reported as extracted).
    ``work_budget``: steps one maximum-clique search may take (the clique methods; see the module docstring for what
    happens beyond it).
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
    elif method == "best_threshold":
        outcome = _best_threshold_method(sims, _condensed(sims), n_clusters, min_clique_size, work_budget)
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
