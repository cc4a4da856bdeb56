"""Candidate similarities as integers: cosine similarities of unit descriptors, in units of 1/SIMILARITY_SCALE.

Computed in float64 and rounded to multiples of 1e-5 before any comparison, so BLAS rounding differences between
machines cannot move a pair across a threshold (except for a value within ~1e-16 of a rounding boundary).
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np

from ..embeddings import Embeddings, check_unit_rows

SIMILARITY_SCALE = 100_000  # similarities become integers in units of 1e-5

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


def condensed(sims: np.ndarray) -> np.ndarray:
    """Upper-triangle entries row by row (scipy's condensed order) without N^2 index arrays."""
    n = sims.shape[0]
    return np.concatenate([sims[i, i + 1:] for i in range(n - 1)]) if n > 1 else np.zeros(0, dtype=sims.dtype)


def similarity(units: int) -> float:
    return round(units / SIMILARITY_SCALE, 5)

