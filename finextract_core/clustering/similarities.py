"""Candidate similarities as integers: cosine similarities of unit descriptors, in units of 1/SIMILARITY_SCALE.

Computed in float64 and rounded to multiples of 1e-5 before any comparison, so BLAS rounding differences between
machines cannot move a pair across a threshold (except for a value within ~1e-16 of a rounding boundary).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Sequence, Union

import numpy as np

from ..embeddings import Embeddings, check_unit_rows

SIMILARITY_SCALE = 100_000  # similarities become integers in units of 1e-5
START_PERCENTILE = 25  # the paper's first threshold: this percentile of the off-diagonal similarities
BACKGROUND_PERCENTILE = 50  # the run's background: what a typical pair of candidates shares
BLOCK_ENTRIES = 2 ** 22  # passes over the N x N similarities take rows in blocks of about this many entries


def rows_per_block(n: int) -> int:
    """Rows of an N x N matrix per block: temporaries stay tens of MB at any N."""
    return max(1, BLOCK_ENTRIES // n)

VectorsLike = Union[Embeddings, np.ndarray, Sequence[Sequence[float]]]


def as_unit_vectors(embeddings: VectorsLike) -> np.ndarray:
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
    rows = rows_per_block(n)
    for first in range(0, n, rows):
        last = min(n, first + rows)
        block = vectors[first:last] @ vectors[first:].T
        block *= SIMILARITY_SCALE
        np.rint(block, out=block)
        sims[first:last, first:] = block
        sims[last:, first:last] = block[:, last - first:].T
    np.fill_diagonal(sims, SIMILARITY_SCALE)
    return sims


def condensed(sims: np.ndarray) -> np.ndarray:
    """Upper-triangle entries row by row (scipy's condensed order) without N^2 index arrays."""
    n = sims.shape[0]
    return np.concatenate([sims[i, i + 1:] for i in range(n - 1)]) if n > 1 else np.zeros(0, dtype=sims.dtype)


@dataclass(frozen=True)
class CandidateSimilarities:
    """One run's quantised similarities and the order statistics that the rules read from them (all in units of
    1/SIMILARITY_SCALE; order statistics are the lower ones, that is values of off-diagonal entries themselves)."""

    matrix: np.ndarray  # N x N int32, diagonal SIMILARITY_SCALE
    start: int  # START_PERCENTILE of the off-diagonal similarities
    background: int  # BACKGROUND_PERCENTILE of them
    highest: int

    @property
    def n(self) -> int:
        return self.matrix.shape[0]

    @cached_property
    def off_diagonal(self) -> np.ndarray:
        """The upper triangle in scipy's condensed order (only complete linkage needs it)."""
        return condensed(self.matrix)


def candidate_similarities(vectors: np.ndarray) -> CandidateSimilarities:
    """The similarities of ``vectors`` (unit rows) and their order statistics, read from a histogram of the
    quantised values: exact, and no sort or copy of the N^2 entries."""
    matrix = quantised_similarities(vectors)
    n = matrix.shape[0]
    if n == 1:  # a single candidate: every statistic is its similarity to itself
        return CandidateSimilarities(matrix, SIMILARITY_SCALE, SIMILARITY_SCALE, SIMILARITY_SCALE)
    counts = np.zeros(2 * SIMILARITY_SCALE + 1, dtype=np.int64)
    rows = rows_per_block(n)
    for first in range(0, n, rows):
        counts += np.bincount((matrix[first:first + rows] + SIMILARITY_SCALE).ravel(),
                              minlength=len(counts))
    counts[2 * SIMILARITY_SCALE] -= n  # the diagonal
    counts //= 2  # every off-diagonal pair appears twice
    at_most = np.cumsum(counts)  # entries <= value, value = index - SIMILARITY_SCALE
    pairs = int(at_most[-1])

    def order_statistic(percent: int) -> int:
        rank = (pairs - 1) * percent // 100  # the entry at this rank of the sorted upper triangle (from 0)
        return int(np.searchsorted(at_most, rank + 1)) - SIMILARITY_SCALE

    highest = int(np.flatnonzero(counts)[-1]) - SIMILARITY_SCALE
    return CandidateSimilarities(matrix, order_statistic(START_PERCENTILE), order_statistic(BACKGROUND_PERCENTILE),
                                 highest)


def similarity(units: int) -> float:
    return round(units / SIMILARITY_SCALE, 5)

