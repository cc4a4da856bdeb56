"""Threshold graphs: for one quantised similarity matrix, the graphs "similarity >= t" on the paper's grid of
thresholds (start at the 25th percentile of the off-diagonal similarities, +0.01 steps), their components, degrees
and the pieces of their cores in which cliques are searched."""
from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .cliques import components_in_index_order, partition_component
from .similarities import SIMILARITY_SCALE, CandidateSimilarities, rows_per_block

THRESHOLD_STEP = SIMILARITY_SCALE // 100  # the paper's +0.01


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


class ThresholdGraphs:
    """The graphs "similarity >= t" of one quantised similarity matrix at the thresholds start + k * 0.01 (start: the
    25th percentile of the off-diagonal similarities) up to the first above the highest of them: components, degrees
    and the pieces of cores in which cliques are searched."""

    def __init__(self, run: CandidateSimilarities):
        sims = self.sims = run.matrix
        self.start, self.highest = run.start, run.highest
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
        for component in components_in_index_order(labels, min_size):
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


def partition_pieces(pieces: list[tuple[np.ndarray, np.ndarray]], min_size: int,
                      work_budget: int) -> list[list[int]]:
    """The greedy partition's cliques of at least ``min_size`` members (WorkBudgetExceeded as documented)."""
    cliques: list[list[int]] = []
    for members, adjacency in pieces:
        cliques.extend(partition_component(adjacency, members, min_size, work_budget))
    return cliques


def capacity(group_sizes: np.ndarray, size: int) -> int:
    """How many disjoint cliques of ``size`` members groups (components, or pieces of a core) could hold at most.

    Never grows with the threshold: raising it only splits groups or shrinks cores, and floor division is
    superadditive.
    """
    return int((np.asarray(group_sizes) // size).sum())


def piece_sizes(pieces: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    return np.array([len(members) for members, _ in pieces], dtype=np.int64)


def _degrees_on_grid(sims: np.ndarray, start: int, n_thresholds: int) -> np.ndarray:
    """N x T: column k holds every vertex's degree in the graph at threshold start + k * THRESHOLD_STEP."""
    n = len(sims)
    degrees = np.empty((n, n_thresholds), dtype=np.int64)
    rows = rows_per_block(n)
    for first in range(0, n, rows):
        chunk = sims[first:first + rows].astype(np.int64)
        # 0: below the start; k + 1: at least threshold k but below threshold k + 1 (the last bin is open).
        bins = np.clip((chunk - start) // THRESHOLD_STEP + 1, 0, n_thresholds)
        bins += (np.arange(len(chunk)) * (n_thresholds + 1))[:, None]
        counts = np.bincount(bins.ravel(), minlength=len(chunk) * (n_thresholds + 1)).reshape(len(chunk), -1)
        degrees[first:first + len(chunk)] = np.cumsum(counts[:, :0:-1], axis=1)[:, ::-1]
    return degrees - 1  # the diagonal counts at every threshold

