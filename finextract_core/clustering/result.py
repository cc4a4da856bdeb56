"""The public call: N candidate embeddings in, N0 clusters, their centres and memorisation scores out."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Callable

import numpy as np

from .cliques import DEFAULT_WORK_BUDGET
from .methods import (Outcome, best_threshold_method, complete_linkage_method, counting_smaller_clusters,
                      paper_method)
from .ranked import ranked_cliques_method
from .ranking import SCORE_DIGITS, MemorisationScorer
from .similarities import (SIMILARITY_SCALE, CandidateSimilarities, VectorsLike, as_unit_vectors,
                           candidate_similarities, similarity)

DEFAULT_MIN_CLIQUE_SIZE = 2


@dataclass(frozen=True)
class Method:
    # (run, N0, min size, work budget) -> Outcome. Raises NoThreshold where no threshold gives N0 clusters of the
    # min size; cluster_candidates then asks for smaller ones (counting_smaller_clusters).
    rule: Callable[[CandidateSimilarities, int, int, int], Outcome]
    ranked_by_score: bool  # False: biggest cluster first (the paper's ranking)
    description: str  # one line, for the node's tooltip


_METHODS = {
    "ranked_cliques": Method(
        ranked_cliques_method, True,
        "Cliques of every threshold, ranked by memorisation score = tightness^4 x separation x (1 - 1/size), both "
        "measured from the run's background similarity: memorised images first, small tight groups ahead of big "
        "loose styles."),
    "best_threshold": Method(
        best_threshold_method, False,
        "One threshold, the one whose N0-th largest clique (greedy clique partition) is biggest, scanning every 0.01 "
        "from the 25th percentile up; biggest cluster first. Good when the groups are alike and well separated."),
    "paper": Method(
        paper_method, False,
        "The paper's rule: the first threshold from the 25th percentile whose greedy clique partition has N0 "
        "cliques, biggest first; can merge groups when inter-group pairs dominate that percentile (two groups of 10 "
        "near-duplicates at N0 = 2 come out as mixed cliques of 15 and 5)."),
    "complete_linkage": Method(
        complete_linkage_method, False,
        "Complete-linkage tree cut where the N0-th largest group is biggest, biggest first; every group is a clique "
        "at the reported threshold."),
}
METHODS = tuple(_METHODS)  # the first is the default
METHOD_DESCRIPTIONS = {name: method.description for name, method in _METHODS.items()}


@dataclass(frozen=True)
class ClusterResult:
    """N0 clusters of candidates, most likely memorised first (``ranked_cliques``) or biggest first (the others).

    All indices refer to rows of the clustered embeddings. Scores, tightness and separation: see ``ranking``.
    """

    method: str
    n_candidates: int
    n_clusters: int  # N0, or the number of candidates where there are fewer
    min_clique_size: int
    threshold: float  # similarity threshold at which every cluster is a clique
    background: float  # the run's median similarity between two candidates
    ranked_by: str  # "memorisation score" or "size"
    centres: tuple[int, ...]  # the extracted images: one candidate per cluster
    members: tuple[tuple[int, ...], ...]  # ascending candidate indices per cluster
    sizes: tuple[int, ...]
    mean_similarities: tuple[float | None, ...]  # mean pairwise similarity inside each cluster; None for singletons
    scores: tuple[float, ...]  # memorisation score per cluster, in [0, 1]
    tightness: tuple[float, ...]
    separation: tuple[float, ...]
    notes: tuple[str, ...]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ClusterResult:
        """The ClusterResult whose ``to_dict()`` (or its JSON, read back) this is."""
        def frozen(value):
            return tuple(frozen(item) for item in value) if isinstance(value, (list, tuple)) else value

        return cls(**{field.name: frozen(values[field.name]) for field in fields(cls)})

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def summary(self) -> str:
        """A few human-readable lines for a text output."""
        lines = [f"{self.method}: {self.n_clusters} clusters of {self.n_candidates} candidates, ranked by "
                 f"{self.ranked_by}; each a clique at threshold {self.threshold:.5f} (min clique size "
                 f"{self.min_clique_size}); background similarity {self.background:.5f}"]
        for rank, (centre, size, mean, score, tight, separate) in enumerate(zip(
                self.centres, self.sizes, self.mean_similarities, self.scores, self.tightness, self.separation)):
            shown = "-" if mean is None else f"{mean:.4f}"
            lines.append(f"  #{rank}: centre {centre}, {size} members, mean similarity {shown}, memorisation score "
                         f"{score:.4f} (tightness {tight:.4f}, separation {separate:.4f})")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


def _complete(clusters: list[list[int]], n_clusters: int,
              run: CandidateSimilarities) -> tuple[list[list[int]], list[str]]:
    """Exactly ``n_clusters`` clusters (at most N): where the rule found fewer, single candidates that no cluster
    holds are added in index order; where every candidate is already in a cluster, the biggest cluster gives up its
    least central member (lowest summed similarity to it; ties: the highest index) as a cluster of its own."""
    clusters, notes = [list(c) for c in clusters[:n_clusters]], []
    if len(clusters) < n_clusters:
        taken = np.zeros(run.n, dtype=bool)
        for members in clusters:
            taken[members] = True
        singles = np.flatnonzero(~taken)[:n_clusters - len(clusters)].tolist()
        if singles:
            notes.append(f"the method found {len(clusters)} cluster(s): {len(singles)} single candidate(s) that no "
                         "cluster holds were added, in index order (memorisation score 0)")
        clusters += [[single] for single in singles]
    split = 0
    while len(clusters) < n_clusters:
        biggest = max(range(len(clusters)), key=lambda i: (len(clusters[i]), -i))
        members = clusters[biggest]
        centrality = run.matrix[np.ix_(members, members)].astype(np.int64).sum(axis=1)
        outlier = members[len(members) - 1 - int(np.argmin(centrality[::-1]))]
        members.remove(outlier)
        clusters.append([outlier])
        split += 1
    if split:
        notes.append(f"the clusters held every candidate: {split} least central member(s) of the biggest clusters "
                     "were split off as single candidates to make N0 clusters")
    return clusters, notes


def cluster_candidates(embeddings: VectorsLike, n_clusters: int, method: str = METHODS[0],
                       min_clique_size: int = DEFAULT_MIN_CLIQUE_SIZE,
                       work_budget: int = DEFAULT_WORK_BUDGET) -> ClusterResult:
    """Group N candidate embeddings (unit rows) into ``n_clusters`` (N0) clusters and pick their centres.

    Always N0 clusters (N where there are fewer candidates than N0, said in the notes), whatever the data: where a
    method finds fewer, it counts smaller clusters or fills in single candidates, and says so in the notes.
    ``method``: one of METHODS, ``"ranked_cliques"`` by default (each method's rule is its function's docstring).
    ``min_clique_size``: clusters with fewer members count only where N0 bigger ones cannot be found (1 reproduces the
    paper's code, where stray singletons count; the default 2 keeps a lone candidate, which nothing else resembles,
    from being reported ahead of a group). ``work_budget``: steps one maximum-clique search may take (the methods'
    docstrings say what happens beyond it).
    Raises ValueError with advice for invalid settings or embeddings.
    """
    if method not in _METHODS:
        raise ValueError(f"unknown clustering method {method!r}: choose one of {', '.join(METHODS)}")
    if n_clusters < 1:
        raise ValueError(f"N0 = {n_clusters}: ask for at least one cluster (N0 is the number of fine-tuning images)")
    if min_clique_size < 1:
        raise ValueError(f"min_clique_size = {min_clique_size}: it must be at least 1")
    if work_budget < 1:
        raise ValueError("work_budget must be a positive number of steps")
    vectors = as_unit_vectors(embeddings)
    run = candidate_similarities(vectors)
    chosen = _METHODS[method]
    if run.n <= n_clusters:
        outcome = Outcome(SIMILARITY_SCALE, [[i] for i in range(run.n)],
                          [f"N0 = {n_clusters} clusters asked for and there are {run.n} candidates: each candidate is "
                           f"its own cluster{'' if run.n == n_clusters else f', {run.n} clusters instead of N0'} "
                           "(the paper generates N = 50 x N0 candidates)"])
    else:
        outcome = counting_smaller_clusters(chosen.rule, run, n_clusters, min_clique_size, work_budget)
    if not chosen.ranked_by_score:
        outcome.clusters = sorted((sorted(c) for c in outcome.clusters), key=lambda c: (-len(c), c[0]))
    clusters, completion_notes = _complete(outcome.clusters, min(n_clusters, run.n), run)
    scorer = MemorisationScorer(run)
    evidence = [scorer.evidence(members) for members in clusters]
    order = sorted(range(len(clusters)), key=(lambda i: (-evidence[i].score, -len(clusters[i]), sorted(clusters[i])))
                   if chosen.ranked_by_score else (lambda i: (-len(clusters[i]), min(clusters[i]))))
    clusters, evidence = [sorted(clusters[i]) for i in order], [evidence[i] for i in order]

    centres, means = [], []
    for members in clusters:
        block = run.matrix[np.ix_(members, members)].astype(np.int64)
        centres.append(members[int(np.argmax(block.sum(axis=1)))])  # argmax takes the first (smallest) on ties
        pairs = len(members) * (len(members) - 1)
        means.append(None if pairs == 0 else round(float(block.sum() - np.trace(block)) / pairs / SIMILARITY_SCALE, 5))
    return ClusterResult(
        method=method, n_candidates=run.n, n_clusters=len(clusters), min_clique_size=min_clique_size,
        threshold=similarity(outcome.threshold), background=similarity(run.background),
        ranked_by="memorisation score" if chosen.ranked_by_score else "size", centres=tuple(centres),
        members=tuple(tuple(m) for m in clusters), sizes=tuple(len(m) for m in clusters),
        mean_similarities=tuple(means), scores=tuple(round(e.score, SCORE_DIGITS) for e in evidence),
        tightness=tuple(round(e.tightness, SCORE_DIGITS) for e in evidence),
        separation=tuple(round(e.separation, SCORE_DIGITS) for e in evidence),
        notes=tuple(outcome.notes + completion_notes),
    )
