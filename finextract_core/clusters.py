"""CandidateClusters: what Clique Cluster hands on, the clusters of N candidates together with the embeddings they
were found in, so that whoever turns clusters into images also gets the extracted images' embeddings.

The candidates themselves (images, or latents in a candidate bank) stay where they are: row i of ``embeddings`` is
candidate i of whatever was embedded, and Extracted Images takes that same batch or bank to make the images.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from .clustering import ClusterResult
from .embeddings import Embeddings


@dataclass(frozen=True)
class CandidateClusters:
    result: ClusterResult
    embeddings: Embeddings  # row i describes candidate i

    def __post_init__(self) -> None:
        if len(self.embeddings) != self.result.n_candidates:
            raise ValueError(f"clusters of {self.result.n_candidates} candidates cannot come with "
                             f"{len(self.embeddings)} embeddings")

    @property
    def centres(self) -> tuple[int, ...]:
        """The extracted candidates, one per cluster, in the clusters' order."""
        return self.result.centres

    def extracted_embeddings(self) -> Embeddings:
        return self.embeddings.subset(self.result.centres)


def cluster_result_from_dict(values: dict) -> ClusterResult:
    """The ClusterResult of its ``to_dict()`` (what Clique Cluster's clusters_json holds)."""
    names = {field.name for field in fields(ClusterResult)}
    if set(values) != names:
        raise ValueError(f"clusters need the fields {sorted(names)}, got {sorted(values)}: connect Clique Cluster's "
                         "clusters_json")
    return ClusterResult.from_dict(values)
