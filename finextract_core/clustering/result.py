"""The public call: N candidate embeddings in, N0 clusters and their centres out (ClusterResult)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

from .cliques import DEFAULT_WORK_BUDGET
from .methods import METHODS, Outcome, best_threshold_method, complete_linkage_method, paper_method
from .similarities import SIMILARITY_SCALE, VectorsLike, as_unit_vectors, condensed, quantised_similarities, similarity

DEFAULT_MIN_CLIQUE_SIZE = 2


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


def cluster_candidates(embeddings: VectorsLike, n_clusters: int, method: str = METHODS[0],
                       min_clique_size: int = DEFAULT_MIN_CLIQUE_SIZE,
                       work_budget: int = DEFAULT_WORK_BUDGET) -> ClusterResult:
    """Group N candidate embeddings (unit rows) into exactly ``n_clusters`` (N0) clusters and pick their centres.

    ``method``: one of METHODS, ``"best_threshold"`` by default (each method's rule is its function's docstring in
    ``methods``). ``min_clique_size``:
    clusters with fewer members are not counted (1 reproduces the paper's code, where stray singletons count; the
    default 2 keeps a lone candidate, which nothing else resembles, from being reported as extracted).
    ``work_budget``: steps one maximum-clique search may take (the clique methods; their docstrings say what happens
    beyond it).
    Raises ValueError with advice for invalid input or when no threshold yields N0 clusters.
    """
    if method not in METHODS:
        raise ValueError(f"unknown clustering method {method!r}: choose one of {', '.join(METHODS)}")
    vectors = as_unit_vectors(embeddings)
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
        outcome = Outcome(SIMILARITY_SCALE, [[0]], ["a single candidate is its own cluster"])
    elif method == "best_threshold":
        outcome = best_threshold_method(sims, condensed(sims), n_clusters, min_clique_size, work_budget)
    elif method == "paper":
        outcome = paper_method(sims, condensed(sims), n_clusters, min_clique_size, work_budget)
    else:
        outcome = complete_linkage_method(sims, condensed(sims), n_clusters, min_clique_size)

    ranked = sorted((sorted(c) for c in outcome.clusters), key=lambda c: (-len(c), c[0]))[:n_clusters]
    centres, means = [], []
    for members in ranked:
        block = sims[np.ix_(members, members)].astype(np.int64)
        centres.append(members[int(np.argmax(block.sum(axis=1)))])  # argmax takes the first (smallest) on ties
        pairs = len(members) * (len(members) - 1)
        means.append(None if pairs == 0 else round(float(block.sum() - np.trace(block)) / pairs / SIMILARITY_SCALE, 5))
    return ClusterResult(
        method=method, n_candidates=n, n_clusters=n_clusters, min_clique_size=min_clique_size,
        threshold=similarity(outcome.threshold), centres=tuple(centres),
        members=tuple(tuple(m) for m in ranked), sizes=tuple(len(m) for m in ranked),
        mean_similarities=tuple(means), notes=tuple(outcome.notes),
    )
