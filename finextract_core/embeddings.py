"""The EMBEDDINGS value: unit-length image descriptors that remember which model and preprocessing made them.

Similarities between descriptors of different models (or of one model under different preprocessing) are
meaningless, yet numerically look fine. Every comparison in this package therefore goes through
:func:`require_same_space`, which refuses such pairs with an error that says how to fix them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

# float32 rows written by a model and normalised there are unit length to about 1e-6; 1e-3 catches rows that were
# never normalised (or were averaged) while tolerating fp16 round trips.
UNIT_NORM_TOLERANCE = 1e-3
# Rows checked at a time (1 MiB of float64 at d = 512): float64 temporaries of the whole matrix would hold 4x the
# embeddings themselves (a bank's 6,900 x 512 floats are 14 MB; the check would briefly take 56 MB more).
CHECK_ROWS = 256


def check_unit_rows(vectors: np.ndarray, what: str = "embeddings") -> None:
    """Raise ValueError unless ``vectors`` is a non-empty finite 2-D array whose rows have unit L2 norm."""
    if vectors.ndim != 2 or vectors.shape[0] < 1 or vectors.shape[1] < 1:
        raise ValueError(f"{what} must be a non-empty N x d matrix, got shape {tuple(vectors.shape)}")
    for first in range(0, vectors.shape[0], CHECK_ROWS):
        block = vectors[first:first + CHECK_ROWS].astype(np.float64)
        if not np.all(np.isfinite(block)):
            raise ValueError(f"{what} contain NaN or infinite values: re-embed the images (check the model file and "
                             "inputs)")
        norms = np.sqrt(np.einsum("ij,ij->i", block, block))
        worst = int(np.argmax(np.abs(norms - 1.0)))
        if abs(norms[worst] - 1.0) > UNIT_NORM_TOLERANCE:
            raise ValueError(
                f"{what} row {first + worst} has L2 norm {norms[worst]:.6f}, expected 1: normalise each row "
                "(x / ||x||) or use the output of an embedder from this package"
            )


@dataclass(frozen=True)
class Embeddings:
    """N unit-length descriptors (``vectors``: float32, N x d, read-only) plus their provenance.

    ``model_id`` names the weights (``"sscd_disc_large"``, ``"open_clip:ViT-B-32:1a2b3c4d5e6f"``); ``preset`` names
    the preprocessing (``"paper"``, ``"sscd"``, ``"open_clip"``). Row i describes input image i.

    ``vectors`` is copied, so the caller's array can change without changing these embeddings; except an array that
    is already float32, C-ordered, read-only and owns its memory (such as another Embeddings' vectors, or the rows a
    candidate bank reads from disk), which is kept as is: nobody can write to it, and a bank's N rows are not held
    twice.
    """

    vectors: np.ndarray
    model_id: str
    preset: str

    def __post_init__(self) -> None:
        vectors = self.vectors
        immutable = (isinstance(vectors, np.ndarray) and vectors.dtype == np.float32 and vectors.flags.c_contiguous
                     and vectors.flags.owndata and not vectors.flags.writeable)
        if not immutable:
            vectors = np.array(vectors, dtype=np.float32, order="C", copy=True)
        check_unit_rows(vectors)
        if not self.model_id or not self.preset:
            raise ValueError("Embeddings need a non-empty model_id and preset")
        vectors.flags.writeable = False
        object.__setattr__(self, "vectors", vectors)

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def space(self) -> str:
        """``"<model_id>/preset <preset>"``: the label used in error messages and reports."""
        return f"{self.model_id}/preset {self.preset}"

    def subset(self, indices: Sequence[int]) -> "Embeddings":
        """The rows at ``indices`` (in that order), with the same provenance."""
        return Embeddings(self.vectors[np.asarray(indices, dtype=np.int64)], self.model_id, self.preset)

    def similarity(self, other: "Embeddings") -> np.ndarray:
        """Cosine similarities, float64 of shape (len(self), len(other)); refuses embeddings from another space."""
        require_same_space(self, other)
        return self.vectors.astype(np.float64) @ other.vectors.astype(np.float64).T


def require_same_space(first: Embeddings, second: Embeddings, first_name: str = "first",
                       second_name: str = "second") -> None:
    """Raise ValueError unless both embeddings come from the same model, preset and dimension."""
    if first.model_id != second.model_id or first.preset != second.preset or first.dim != second.dim:
        raise ValueError(
            f"cannot compare {first_name} and {second_name} embeddings: embedded with {first.space} "
            f"({first.dim}-d) vs {second.space} ({second.dim}-d): embed both with the same model and preset"
        )


def concatenate(parts: Sequence[Embeddings]) -> Embeddings:
    """Stack several Embeddings of one space (e.g. batches embedded separately) into one."""
    if not parts:
        raise ValueError("concatenate needs at least one Embeddings value")
    for index, part in enumerate(parts[1:], start=1):
        require_same_space(parts[0], part, "part 0", f"part {index}")
    return Embeddings(np.concatenate([part.vectors for part in parts]), parts[0].model_id, parts[0].preset)
