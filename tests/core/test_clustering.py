"""CliqueCluster: planted groups are recovered, the `paper` method equals a plain re-implementation of the paper's
procedure (networkx.find_cliques, remove the largest clique, +0.01 threshold steps), and `best_threshold` and
`complete_linkage` equal brute-force versions of their rules."""
import itertools

import networkx as nx
import numpy as np
import pytest

from scipy.cluster.hierarchy import fcluster, linkage

from fixtures.clique_reference import random_graph, reference_partition
from fixtures.planted_embeddings import planted as benchmark_planted
from fixtures.planted_embeddings import recovered
from finextract_core.clustering import cliques as clique_engine
from finextract_core.clustering import (METHODS, SIMILARITY_SCALE, WorkBudgetExceeded, cluster_candidates,
                                        greedy_clique_partition, quantised_similarities)
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


def two_separated_groups(per_group=10, cosine=-0.2, noise=0.003, dim=32, seed=0):
    """Two tight groups of near-duplicates (similarity ~0.9996 inside) around unit centres with cosine -0.2."""
    rng = np.random.default_rng(seed)
    centres = np.zeros((2, dim))
    centres[0, 0] = 1
    centres[1, :2] = cosine, np.sqrt(1 - cosine ** 2)
    labels = np.repeat([0, 1], per_group)
    vectors = centres[labels] + noise * rng.standard_normal((2 * per_group, dim))
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True), labels


# ------------------------------------------------------------------------------------------ reference implementation
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


def quantised(vectors):
    return np.rint(vectors.astype(np.float64) @ vectors.T.astype(np.float64) * SIMILARITY_SCALE).astype(np.int64)


def start_threshold(sims):
    upper = sims[np.triu_indices(len(sims), 1)]
    return int(np.sort(upper)[(len(upper) - 1) // 4]), int(upper.max())


def reference_best_threshold(vectors, n_clusters, min_size):
    """Partition the graph at every threshold; keep the largest N0-th largest clique, the highest threshold on ties."""
    sims = quantised(vectors)
    start, highest = start_threshold(sims)
    best = (0, None, None)
    for threshold in range(start, highest + 1, SIMILARITY_SCALE // 100):
        cliques = [c for c in reference_partition(sims >= threshold) if len(c) >= min_size]
        if len(cliques) >= n_clusters:
            size = sorted(map(len, cliques), reverse=True)[n_clusters - 1]
            if size >= best[0]:
                best = (size, threshold, sorted(cliques, key=lambda c: (-len(c), c[0]))[:n_clusters])
    return best[1] / SIMILARITY_SCALE, [tuple(c) for c in best[2]]


def reference_complete_linkage(vectors, n_clusters, min_size):
    """Cut the complete-linkage tree at every merge height from the start; keep the largest N0-th largest group."""
    sims = quantised(vectors)
    start, _ = start_threshold(sims)
    tree = linkage((SIMILARITY_SCALE - sims[np.triu_indices(len(sims), 1)]).astype(float), method="complete")
    best = (0, None, None)
    for height in sorted({-1.0, *tree[:, 2]}, reverse=True):
        if height > SIMILARITY_SCALE - start:
            continue
        labels = fcluster(tree, height, "distance") if height >= 0 else np.arange(len(sims))
        groups = [sorted(np.flatnonzero(labels == label).tolist()) for label in np.unique(labels)]
        groups = sorted((g for g in groups if len(g) >= min_size), key=lambda g: (-len(g), g[0]))
        if len(groups) >= n_clusters and len(groups[n_clusters - 1]) >= best[0]:
            best = (len(groups[n_clusters - 1]), (SIMILARITY_SCALE - max(height, 0)) / SIMILARITY_SCALE,
                    [tuple(g) for g in groups[:n_clusters]])
    return best[1], best[2]


# -------------------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("method", METHODS)
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


@pytest.mark.parametrize("method", ["best_threshold", "complete_linkage"])
def test_clustering_separates_two_groups_where_the_paper_rule_merges_them(method):
    vectors, labels = two_separated_groups()
    result = cluster_candidates(vectors, 2, method)
    assert [sorted(labels[list(members)]) for members in result.members] == [[0] * 10, [1] * 10]
    assert result.threshold > 0.98  # within one 0.01 step of the smallest similarity inside a group


def test_clustering_paper_method_merges_two_groups_as_documented():
    # At the start threshold (25th percentile) half the inter-group pairs are edges, and the greedy partition already
    # has N0 = 2 mixed cliques: the paper's first-threshold rule stops there.
    vectors, labels = two_separated_groups()
    result = cluster_candidates(vectors, 2, "paper")
    assert result.sizes != (10, 10)
    assert len(set(labels[list(result.members[0])])) == 2


@pytest.mark.parametrize("method", METHODS)
def test_clustering_recovers_benchmark_planted_groups(method):
    n_groups = 10  # N = 500: 45 members per group around correlated-by-chance centres, 10% unrelated candidates
    vectors, labels = benchmark_planted(n_groups)
    result = cluster_candidates(vectors, n_groups, method)
    assert recovered(result.centres, labels, n_groups)
    if method != "paper":  # the robust rules also find the groups whole and pure
        assert all(len(set(labels[list(members)])) == 1 for members in result.members)
        assert result.sizes == (45,) * n_groups


@pytest.mark.parametrize("seed,n_clusters,min_size", [(0, 3, 1), (1, 4, 2), (2, 2, 2), (3, 5, 1), (4, 3, 3)])
def test_clustering_best_threshold_and_complete_linkage_equal_brute_force(seed, n_clusters, min_size):
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((22, 4))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    for method, reference in [("best_threshold", reference_best_threshold),
                              ("complete_linkage", reference_complete_linkage)]:
        threshold, clusters = reference(vectors, n_clusters, min_size)
        result = cluster_candidates(vectors, n_clusters, method, min_clique_size=min_size)
        assert result.threshold == pytest.approx(threshold, abs=1e-9), method
        assert list(result.members) == clusters, method


def test_clustering_greedy_partition_equals_networkx_reference_on_random_graphs():
    rng = np.random.default_rng(7)
    for trial in range(60):
        n = int(rng.integers(6, 26))
        adjacency = random_graph(rng, n, rng.uniform(0.15, 0.85))
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
    assert cluster_candidates(vectors, 3) == cluster_candidates(vectors.copy(), 3, "ranked_cliques")  # the default
    for method in METHODS:
        assert cluster_candidates(vectors, 3, method) == cluster_candidates(vectors.copy(), 3, method)
    first = cluster_candidates(vectors, 3, "paper")
    starved = cluster_candidates(vectors, 3, "paper", work_budget=5)
    assert any("exceeded the work budget of 5 steps" in note for note in starved.notes)
    assert starved.threshold > first.threshold
    assert sorted(starved.centres) != [] and len(starved.to_json()) > 0
    dense = np.ones((30, 30), dtype=bool)
    dense[0, 1] = dense[1, 0] = False
    with pytest.raises(WorkBudgetExceeded):
        greedy_clique_partition(dense, 1, work_budget=3)


def test_clustering_rejects_bad_settings_and_embeddings_with_advice():
    vectors, _ = planted(n_groups=2, per_group=4, n_noise=0)
    with pytest.raises(ValueError, match="N0 = 0"):
        cluster_candidates(vectors, 0)
    with pytest.raises(ValueError, match="min_clique_size = 0"):
        cluster_candidates(vectors, 2, min_clique_size=0)
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


@pytest.mark.parametrize("method", METHODS)
def test_clustering_answers_when_candidates_are_too_few_and_says_so(method):
    vectors, labels = planted(n_groups=2, per_group=4, n_noise=0)
    fewer = cluster_candidates(vectors, 9, method)  # N0 > N: each of the 8 candidates is a cluster
    assert fewer.n_clusters == 8 and sorted(fewer.centres) == list(range(8)) and fewer.sizes == (1,) * 8
    assert any("there are 8 candidates: each candidate is its own cluster, 8 clusters instead of N0" in note
               for note in fewer.notes)
    # 5 clusters of >= 2 members cannot be made from 8 candidates: smaller ones make up N0, and the notes say so.
    small = cluster_candidates(vectors, 5, method, min_clique_size=2)
    assert small.n_clusters == 5 and len(set(itertools.chain.from_iterable(small.members))) == sum(small.sizes)
    assert 1 in small.sizes and all(len(set(labels[list(members)])) == 1 for members in small.members)
    assert any("single candidate" in note or "counted clusters of >= 1" in note for note in small.notes)
    single = cluster_candidates(vectors[:1], 1, method)
    assert (single.centres, single.members, single.scores) == ((0,), ((0,),), (0.0,))


def test_clustering_budget_proof_agrees_with_the_search(monkeypatch):
    # greedy_partition rules dense graphs out before searching; searching anyway must give the same outcome.
    prove = clique_engine._Graph._first_search_exceeds
    proofs = []

    def counted_proof(*args):
        proofs.append(prove(*args))
        return proofs[-1]

    rng = np.random.default_rng(13)
    exceeded = 0
    for trial in range(40):
        n = int(rng.integers(20, 90))
        adjacency = random_graph(rng, n, rng.uniform(0.3, 0.95))
        budget, min_size = int(rng.integers(50, 3000)), int(rng.integers(1, 4))
        outcomes = []
        for proof in (counted_proof, lambda *args: False):
            monkeypatch.setattr(clique_engine._Graph, "_first_search_exceeds", proof)
            try:
                outcomes.append(greedy_clique_partition(adjacency, min_size, budget))
            except WorkBudgetExceeded:
                outcomes.append(None)
        assert outcomes[0] == outcomes[1], f"trial {trial}"
        exceeded += outcomes[0] is None
    assert 0 < sum(proofs) < exceeded < len(proofs)  # proofs, searches that exceed anyway, and completed partitions


def test_clustering_quantised_similarities_equal_the_full_float64_product():
    rng = np.random.default_rng(17)
    # Pairs whose float64 similarity x 1e5 is exactly halfway between two integers: rounding must tie the same way.
    halfway = [c for c in (np.arange(-99_999, 100_000, 7) + 0.5) / SIMILARITY_SCALE if c * SIMILARITY_SCALE % 1 == 0.5]
    assert len(halfway) > 1000
    for n, dim in [(1, 3), (2, 8), (57, 5), (700, 64), (1500, 512)]:
        vectors = rng.standard_normal((n, dim))
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        if dim >= 2:
            ties = rng.choice(halfway, size=n // 2)
            vectors[1::2][:len(ties)] = 0
            vectors[1::2, 0][:len(ties)] = ties  # similarity to the basis vector below is exactly the tie
            vectors[0::2][:len(ties)] = 0
            vectors[0::2, 0][:len(ties)] = 1
        expected = np.rint(vectors @ vectors.T * SIMILARITY_SCALE)
        np.fill_diagonal(expected, SIMILARITY_SCALE)
        assert np.array_equal(quantised_similarities(vectors), expected.astype(np.int32)), (n, dim)
