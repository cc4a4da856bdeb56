"""How likely a cluster is to be a memorised image: the memorisation score.

A memorised training image comes back as a group of near-copies: candidates far more similar to each other than the
run's candidates usually are (tight), and clearly more similar to each other than to anything else (separated). A
style or a common subject comes back as a loose family, often bigger. Size alone (the paper's ranking) therefore
puts styles first. The score puts tightness first, lets separation tell a whole group from a piece of one, and lets
size add evidence that saturates:

    score = tightness^4 x separation x (1 - 1 / size)

on the scale where the run's background (the median similarity between two candidates) is 0 and identical images
are 1, u(s) = (s - background) / (1 - background):

- tightness: u(mean similarity between the cluster's members), 0 if below the background;
- separation: u(mean inside) - u(nearest outside), where "nearest outside" is, averaged over the members, each
  member's highest similarity to a candidate outside the cluster; 0 if an outsider is as close as the members are
  to each other (a piece of a bigger group, or a chance pair inside a family of look-alikes);
- size: a single candidate scores 0, a pair half, a group of 10 nine tenths of tightness^4 x separation.

Tightness is what tells a copy from a look-alike; separation and size only matter between clusters of similar
tightness, hence its power (docs/clustering.md has the recovery measured with powers 1, 2, 4 and 8). All factors
lie in [0, 1], so the score does too. It reads integers (quantised similarities) and ranks the same on every machine.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .similarities import SIMILARITY_SCALE, CandidateSimilarities

TIGHTNESS_POWER = 4
SCORE_DIGITS = 4  # scores are reported (not ranked) at this precision


@dataclass(frozen=True)
class Evidence:
    """The memorisation score of one cluster and its factors (on the background-to-identical scale)."""

    tightness: float
    separation: float
    score: float


class MemorisationScorer:
    """Scores clusters of one run. Remembers each member's nearest neighbours: the nearest outsider of a member of
    a small cluster is among them, so a small cluster costs O(size^2) instead of O(size x N)."""

    NEIGHBOURS = 16

    def __init__(self, run: CandidateSimilarities):
        self.run = run
        self._neighbours: dict[int, tuple[list[int], list[int]]] = {}

    def evidence(self, members: list[int]) -> Evidence:
        """The score of the cluster ``members`` (candidate indices) among the run's candidates."""
        run, size = self.run, len(members)
        span = SIMILARITY_SCALE - run.background
        if size < 2 or span <= 0:  # a single candidate, or every pair identical: nothing stands out
            return Evidence(0.0, 0.0, 0.0)
        block = run.matrix[np.ix_(members, members)].astype(np.int64)
        mean_inside = (int(block.sum()) - size * SIMILARITY_SCALE) / (size * (size - 1))  # without the diagonal
        if size == run.n:  # nothing outside: the background stands in for it
            nearest_outside = run.background
        elif size < self.NEIGHBOURS:
            inside = set(members)
            nearest_outside = sum(self._nearest_outside(member, inside) for member in members) / size
        else:  # the neighbours of a big cluster's members are mostly inside it: read whole rows
            outside = np.delete(run.matrix[members], members, axis=1)
            nearest_outside = int(outside.max(axis=1).astype(np.int64).sum()) / size
        tightness = max(0.0, (mean_inside - run.background) / span)
        separation = max(0.0, (mean_inside - nearest_outside) / span)
        return Evidence(tightness, separation, tightness ** TIGHTNESS_POWER * separation * (1 - 1 / size))

    def _nearest_outside(self, member: int, inside: set[int]) -> int:
        """``member``'s highest similarity to a candidate outside ``inside`` (fewer than NEIGHBOURS candidates, so
        at least one neighbour is outside). The neighbours hold the highest similarities (ties in any order): the
        first outsider among them is as close as any outsider."""
        indices, values = self._nearest(member)
        return next(value for index, value in zip(indices, values) if index not in inside)

    def _nearest(self, member: int) -> tuple[list[int], list[int]]:
        if member not in self._neighbours:
            row = self.run.matrix[member].astype(np.int64)
            row[member] = -2 * SIMILARITY_SCALE  # below every similarity: never its own neighbour
            count = min(self.NEIGHBOURS, len(row) - 1)
            nearest = np.argpartition(-row, count - 1)[:count]
            nearest = nearest[np.argsort(-row[nearest], kind="stable")]
            self._neighbours[member] = (nearest.tolist(), row[nearest].tolist())
        return self._neighbours[member]


def select_disjoint(scored: list[tuple[float, list[int]]], n_clusters: int, n: int) -> list[list[int]]:
    """Up to ``n_clusters`` disjoint clusters, best score first: each cluster is taken unless it shares a candidate
    with one taken before. Ties go to the bigger cluster, then to the lexicographically first."""
    taken = np.zeros(n, dtype=bool)
    chosen = []
    for _, members in sorted(scored, key=lambda item: (-item[0], -len(item[1]), item[1])):
        if not taken[members].any():
            taken[members] = True
            chosen.append(members)
            if len(chosen) == n_clusters:
                break
    return chosen
