"""CliqueCluster: planted groups are recovered, and the `paper` method equals a plain re-implementation of the
paper's procedure (networkx.find_cliques, remove the largest clique, +0.01 threshold steps)."""
import itertools

import networkx as nx
import numpy as np
import pytest

from finextract_core.clustering import (SIMILARITY_SCALE, WorkBudgetExceeded, cluster_candidates,
                                        greedy_clique_partition)
from finextract_core.embeddings import Embeddings


def planted(n_groups, per_group, n_noise, dim=64, spread=0.4, seed=0):
    """Unit vectors around orthonormal centres (within-group similarity ~0.85) plus unrelated noise vectors."""
    rng = np.random.default_rng(seed)
    centres = np.linalg.qr(rng.standard_normal((dim, n_groups)))[0].T
    labels = np.repeat(np.arange(n_groups), per_group)
    members = centres[labels] + spread * rng.standard_normal((len(labels), dim)) / np.sqrt(dim)
    vectors = np.vstack([members, rng.standard_normal((n_noise, dim))])
    order = rng.permutation(len(vectors))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True))[order]
    return vectors, np.concatenate([labels, -np.ones(n_noise, dtype=int)])[order]


# ------------------------------------------------------------------------------------------ reference implementation
def reference_partition(adjacency):
    """The paper's loop: enumerate all maximal cliques, remove the largest (ties: lexicographically first), repeat."""
    graph = nx.from_numpy_array(adjacency)
    graph.remove_edges_from(nx.selfloop_edges(graph))
    cliques = []
    while graph.number_of_nodes():
        largest = min((sorted(c) for c in nx.find_cliques(graph)), key=lambda c: (-len(c), c))
        cliques.append(largest)
        graph.remove_nodes_from(largest)
    return cliques


def reference_paper_procedure(vectors, n_clusters, min_size):
    sims = np.rint(vectors.astype(np.float64) @ vectors.T.astype(np.float64) * SIMILARITY_SCALE).astype(np.int64)
    upper = sims[np.triu_indices(len(sims), 1)]
    start = int(np.sort(upper)[(len(upper) - 1) // 4])
    threshold = start
    while True:
        cliques = [c for c in reference_partition(sims >= threshold) if len(c) >= min_size]
        if len(cliques) >= n_clusters:
            kept = sorted(cliques, key=lambda c: (-len(c), c[0]))[:n_clusters]
            return threshold / SIMILARITY_SCALE, [tuple(c) for c in kept]
        threshold += SIMILARITY_SCALE // 100


# -------------------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("method", ["paper", "complete_linkage"])
@pytest.mark.parametrize("min_clique_size", [1, 2])
def test_clustering_recovers_planted_groups(method, min_clique_size):
    # Groups must be larger than the cliques that chance forms among unrelated candidates: at the start threshold
    # (25th percentile) three quarters of the unrelated pairs are edges, and such a random graph on N vertices has
    # cliques of about 2 log(N) / log(4/3) vertices; the paper's N = 50 x N0 keeps groups ahead of that too.
    vectors, labels = planted(n_groups=4, per_group=40, n_noise=12, seed=3)
    result = cluster_candidates(Embeddings(vectors, "m", "paper"), 4, method, min_clique_size=min_clique_size)
    assert len(result.centres) == len(result.members) == 4
    assert sorted(labels[list(result.centres)]) == [0, 1, 2, 3]  # one extracted image per planted group
    for centre, members in zip(result.centres, result.members):
        group = set(np.flatnonzero(labels == labels[centre]))
        # At low thresholds a clique may also take in a candidate whose similarity to *every* member is high by
        # chance (its offset from its own centre points at this group's centre), so recovery is >= 90%, not exact.
        assert len(group & set(members)) >= 0.9 * len(group)
        assert len(set(members) - group) <= 0.1 * len(members)
    assert list(result.sizes) == sorted(result.sizes, reverse=True)
    assert all(0.7 < mean < 1 for mean in result.mean_similarities)


def test_clustering_greedy_partition_equals_networkx_reference_on_random_graphs():
    rng = np.random.default_rng(7)
    for trial in range(60):
        n = int(rng.integers(6, 26))
        adjacency = np.triu(rng.random((n, n)) < rng.uniform(0.15, 0.85), 1)
        adjacency = adjacency | adjacency.T
        ours = sorted(greedy_clique_partition(adjacency, 1))
        reference = reference_partition(adjacency)
        assert ours == sorted(reference), f"trial {trial}"
        # Independent of tie-breaking, the first clique removed is a maximum clique.
        assert max(map(len, ours)) == max(len(c) for c in nx.find_cliques(nx.from_numpy_array(adjacency)))


@pytest.mark.parametrize("seed,n_clusters,min_size", [(0, 3, 1), (1, 4, 2), (2, 2, 2), (3, 5, 1), (4, 3, 3)])
def test_clustering_paper_method_equals_reference_procedure(seed, n_clusters, min_size):
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((22, 4))  # low dimension: wide, overlapping similarity spread
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    threshold, clusters = reference_paper_procedure(vectors, n_clusters, min_size)
    result = cluster_candidates(vectors, n_clusters, "paper", min_clique_size=min_size)
    assert result.threshold == pytest.approx(threshold, abs=1e-9)
    assert list(result.members) == clusters


def test_clustering_complete_linkage_groups_are_cliques_at_reported_threshold():
    rng = np.random.default_rng(5)
    vectors = rng.standard_normal((40, 6))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    sims = vectors @ vectors.T
    for n_clusters, min_size in itertools.product([2, 5, 9], [1, 2]):
        result = cluster_candidates(vectors, n_clusters, "complete_linkage", min_clique_size=min_size)
        assert len(result.members) == n_clusters
        for members in result.members:
            assert len(members) >= min_size
            assert sims[np.ix_(members, members)].min() >= result.threshold - 1e-5
        assert len(set(itertools.chain.from_iterable(result.members))) == sum(result.sizes)  # disjoint


def test_clustering_is_deterministic_and_reports_budget_skips():
    vectors, _ = planted(n_groups=3, per_group=15, n_noise=5, seed=11)
    first = cluster_candidates(vectors, 3, "paper")
    assert first == cluster_candidates(vectors.copy(), 3, "paper")
    starved = cluster_candidates(vectors, 3, "paper", work_budget=5)
    assert any("exceeded the work budget of 5 steps" in note for note in starved.notes)
    assert starved.threshold > first.threshold
    assert sorted(starved.centres) != [] and len(starved.to_json()) > 0
    dense = np.ones((30, 30), dtype=bool)
    dense[0, 1] = dense[1, 0] = False
    with pytest.raises(WorkBudgetExceeded):
        greedy_clique_partition(dense, 1, work_budget=3)


def test_clustering_rejects_bad_input_with_advice():
    vectors, _ = planted(n_groups=2, per_group=4, n_noise=0)
    with pytest.raises(ValueError, match="N0 = 9 clusters cannot be taken from 8 candidates"):
        cluster_candidates(vectors, 9)
    with pytest.raises(ValueError, match="N0 = 0"):
        cluster_candidates(vectors, 0)
    with pytest.raises(ValueError, match="need at least 10 candidates"):
        cluster_candidates(vectors, 5, min_clique_size=2)
    with pytest.raises(ValueError, match="unknown clustering method"):
        cluster_candidates(vectors, 2, "kmeans")
    with pytest.raises(ValueError, match="norm"):
        cluster_candidates(vectors * 2, 2)
    broken = vectors.copy()
    broken[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        cluster_candidates(broken, 2)
    with pytest.raises(ValueError, match="at least one candidate"):
        cluster_candidates(np.zeros((0, 4)), 1)
    single = cluster_candidates(vectors[:1], 1, min_clique_size=1)
    assert (single.centres, single.members) == ((0,), ((0,),))
