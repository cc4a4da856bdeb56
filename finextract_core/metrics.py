"""Extraction scores: how close the extracted images are to reference (training) images.

For every reference image its best match is the extracted image of highest similarity.
* AS (average similarity) = mean over reference images of that best similarity.
* A-ESR_tau (average extraction success rate) = fraction of reference images whose best similarity *exceeds* tau,
  i.e. is strictly greater than tau (the paper's wording; 0.6 is its loose and 0.7 its strict threshold).
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .embeddings import Embeddings, require_same_space

DEFAULT_ESR_THRESHOLDS = (0.6, 0.7)


@dataclass(frozen=True)
class ExtractionScores:
    """Scores of one extraction against its references; index i of the per-reference tuples is reference image i."""

    average_similarity: float  # AS
    extraction_success_rates: dict[float, float]  # A-ESR: threshold -> fraction of references with best score > it
    best_match: tuple[int, ...]  # index of the extracted image closest to each reference (smallest on ties)
    best_score: tuple[float, ...]
    model_id: str
    preset: str

    def to_dict(self) -> dict:
        return {
            "AS": self.average_similarity,
            "A-ESR": {f"{t:g}": rate for t, rate in self.extraction_success_rates.items()},
            "success_means": "best similarity > threshold",
            "model_id": self.model_id,
            "preset": self.preset,
            "per_reference": [
                {"reference": i, "best_match": m, "score": s}
                for i, (m, s) in enumerate(zip(self.best_match, self.best_score))
            ],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, values: dict) -> "ExtractionScores":
        """The scores of :meth:`to_dict`'s output (what Extraction Metrics' metrics_json holds)."""
        try:
            rows = sorted(values["per_reference"], key=lambda row: row["reference"])
            return cls(average_similarity=float(values["AS"]),
                       extraction_success_rates={float(t): float(r) for t, r in values["A-ESR"].items()},
                       best_match=tuple(int(row["best_match"]) for row in rows),
                       best_score=tuple(float(row["score"]) for row in rows),
                       model_id=values["model_id"], preset=values["preset"])
        except (KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"not Extraction Metrics' scores (missing {error}): connect its metrics_json") from error

    def to_csv(self) -> str:
        """One row per reference image: reference, best_match, score, and one exceeds_<tau> column per threshold."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        thresholds = list(self.extraction_success_rates)
        writer.writerow(["reference", "best_match", "score"] + [f"exceeds_{t:g}" for t in thresholds])
        for index, (match, score) in enumerate(zip(self.best_match, self.best_score)):
            writer.writerow([index, match, f"{score:.6f}"] + [int(score > t) for t in thresholds])
        return buffer.getvalue()


def metrics_from_similarity(similarity: np.ndarray, thresholds: Sequence[float] = DEFAULT_ESR_THRESHOLDS,
                            model_id: str = "", preset: str = "") -> ExtractionScores:
    """Metrics from a references x extracted similarity matrix (row i = reference image i)."""
    similarity = np.asarray(similarity, dtype=np.float64)
    if similarity.ndim != 2 or 0 in similarity.shape:
        raise ValueError(f"need at least one reference and one extracted image, got a {similarity.shape} matrix")
    if not np.all(np.isfinite(similarity)):
        raise ValueError("similarities contain NaN or infinite values: re-embed the images")
    best_match = np.argmax(similarity, axis=1)  # first maximum = smallest index on ties
    best_score = similarity[np.arange(similarity.shape[0]), best_match]
    rates = {float(t): float(np.mean(best_score > t)) for t in thresholds}
    return ExtractionScores(
        average_similarity=float(best_score.mean()),
        extraction_success_rates=rates,
        best_match=tuple(int(i) for i in best_match),
        best_score=tuple(float(s) for s in best_score),
        model_id=model_id,
        preset=preset,
    )


def extraction_metrics(references: Embeddings, extracted: Embeddings,
                       thresholds: Sequence[float] = DEFAULT_ESR_THRESHOLDS) -> ExtractionScores:
    """AS, A-ESR at ``thresholds`` and per-reference best matches; both inputs must share model and preset."""
    require_same_space(references, extracted, "reference", "extracted")
    return metrics_from_similarity(references.similarity(extracted), thresholds, references.model_id,
                                   references.preset)
