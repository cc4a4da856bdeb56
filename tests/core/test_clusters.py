"""CandidateClusters, the value Clique Cluster hands on: its extracted embeddings are the centres' rows, it refuses
embeddings of another size, and clusters_json reads back to the same ClusterResult."""
import json

import numpy as np
import pytest

from finextract_core.clustering import cluster_candidates
from finextract_core.clusters import CandidateClusters, cluster_result_from_dict
from finextract_core.embeddings import Embeddings


def two_groups() -> Embeddings:
    """Candidates 0, 2, 4 near e0 and 1, 3 near e1 (unit rows)."""
    rows = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.99, 0.1, 0.0], [0.1, 0.99, 0.0], [0.98, 0.0, 0.2]])
    return Embeddings(rows / np.linalg.norm(rows, axis=1, keepdims=True), "m", "paper")


def test_extracted_embeddings_are_the_centres_rows():
    embeddings = two_groups()
    clusters = CandidateClusters(cluster_candidates(embeddings, 2, method="complete_linkage"), embeddings)
    groups = [{0, 2, 4}, {1, 3}]
    assert sorted(any(set(members) <= group for group in groups) for members in clusters.result.members) == [True] * 2
    assert clusters.centres == clusters.result.centres
    extracted = clusters.extracted_embeddings()
    assert (extracted.vectors == embeddings.vectors[list(clusters.centres)]).all()
    assert extracted.space == "m/preset paper"
    with pytest.raises(ValueError, match="clusters of 5 candidates cannot come with 2 embeddings"):
        CandidateClusters(clusters.result, embeddings.subset([0, 1]))


def test_clusters_json_reads_back_to_the_same_result():
    result = cluster_candidates(two_groups(), 2, method="paper", min_clique_size=1)
    assert cluster_result_from_dict(json.loads(result.to_json())) == result
    with pytest.raises(ValueError, match="connect Clique Cluster's clusters_json"):
        cluster_result_from_dict({"centres": [0]})
