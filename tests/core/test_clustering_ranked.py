"""The ranked_cliques method and the memorisation score: a score computed by hand, the method equal to a plain
re-implementation (networkx cliques of every threshold, scores from whole rows, greedy choice), the memorised images
of realistic candidate sets found and ranked first, N0 clusters whatever the data, and the same clusters every run."""
import itertools
import json

import networkx as nx
import numpy as np
import pytest

from fixtures.clique_reference import random_graph, reference_partition
from fixtures.realistic_candidates import COPY_LEVELS, realistic_candidates
from finextract_core.clustering import METHODS, SIMILARITY_SCALE, THRESHOLD_STEP, ClusterResult, cluster_candidates
from finextract_core.clustering.cliques import greedy_clique_cover
from finextract_core.clustering.ranking import MemorisationScorer
from finextract_core.clustering.similarities import candidate_similarities

# A Gram matrix (positive definite) whose clusters are worked out by hand below.
HAND_SIMILARITIES = np.array([[1.0, 0.9, 0.7, 0.3, 0.0],
                              [0.9, 1.0, 0.8, 0.2, 0.1],
                              [0.7, 0.8, 1.0, 0.1, 0.4],
                              [0.3, 0.2, 0.1, 1.0, 0.0],
                              [0.0, 0.1, 0.4, 0.0, 1.0]])


def vectors_with_similarities(gram):
    values, vectors = np.linalg.eigh(gram)
    return vectors * np.sqrt(values)


def reference_score(sims, members, background):
    """tightness^4 x separation x (1 - 1/size), from whole rows."""
    members = list(members)
    size = len(members)
    if size < 2:
        return 0.0
    block = sims[np.ix_(members, members)]
    mean_inside = (block.sum() - np.trace(block)) / (size * (size - 1))
    outside = np.delete(sims[members], members, axis=1)
    nearest_outside = outside.max(axis=1).mean() if outside.size else background  # nothing outside: the background
    span = SIMILARITY_SCALE - background
    tightness = max(0.0, (mean_inside - background) / span)
    separation = max(0.0, (mean_inside - nearest_outside) / span)
    return tightness ** 4 * separation * (1 - 1 / size)


def reference_ranked_cliques(vectors, n_clusters):
    """Cliques (>= 2 members) of the greedy partition at every grid threshold from the top down to the start, or
    to the first threshold where a component holds more than half the candidates once N0 disjoint ones are found;
    the best-scoring disjoint ones, single candidates in index order to make N0."""
    sims = np.rint(vectors @ vectors.T * SIMILARITY_SCALE).astype(np.int64)
    n = len(sims)
    upper = np.sort(sims[np.triu_indices(n, 1)])
    start, background, highest = upper[(len(upper) - 1) // 4], upper[(len(upper) - 1) // 2], upper[-1]
    scores = {}

    def choose():
        chosen, taken = [], set()
        for clique in sorted(scores, key=lambda c: (-scores[c], -len(c), c)):
            if taken.isdisjoint(clique) and len(chosen) < n_clusters:
                chosen.append(clique)
                taken.update(clique)
        return chosen

    for threshold in range(start + (highest - start) // THRESHOLD_STEP * THRESHOLD_STEP, start - 1, -THRESHOLD_STEP):
        adjacency = sims >= threshold
        largest = max(map(len, nx.connected_components(nx.from_numpy_array(adjacency))))
        if 2 * largest > n and len(choose()) == n_clusters:
            break
        for clique in reference_partition(adjacency):
            if len(clique) >= 2:
                scores.setdefault(tuple(clique), reference_score(sims, clique, background))
    chosen = [list(c) for c in choose()]
    taken = set(itertools.chain.from_iterable(chosen))
    chosen += [[i] for i in range(n) if i not in taken][:n_clusters - len(chosen)]
    return [tuple(c) for c in sorted(chosen, key=lambda c: (-reference_score(sims, c, background), -len(c), c))]


def is_clique_at(vectors, members, threshold):
    block = vectors[list(members)] @ vectors[list(members)].T
    return block.min() >= threshold - 1e-5


# -------------------------------------------------------------------------------------------------------------- tests
def test_memorisation_score_equals_the_hand_computed_one():
    result = cluster_candidates(vectors_with_similarities(HAND_SIMILARITIES), 2)
    # Off-diagonal similarities 0, 0, .1, .1, .2, .3, .4, .7, .8, .9: the background (lower median) is 0.2, the start
    # (25th percentile) 0.1. Cluster {0, 1, 2}: mean inside (0.9 + 0.7 + 0.8) / 3 = 0.8, tightness (0.8 - 0.2) / 0.8
    # = 0.75; nearest outsiders 0.3 (0-3), 0.2 (1-3), 0.4 (2-4), mean 0.3, separation (0.8 - 0.3) / 0.8 = 0.625;
    # score 0.75^4 x 0.625 x (1 - 1/3) = 0.1318. It beats the pair {0, 1}: tightness 0.875, nearest outsiders 0.7
    # and 0.8, separation 0.1875, score 0.875^4 x 0.1875 x 1/2 = 0.0549. 3 and 4 (similarity 0, below the start)
    # form no clique: the second cluster is candidate 3 alone.
    assert result.members == ((0, 1, 2), (3,))
    assert (result.scores, result.tightness, result.separation) == ((0.1318, 0.0), (0.75, 0.0), (0.625, 0.0))
    assert result.background == 0.2 and result.centres == (1, 3) and result.threshold == 0.7
    assert "memorisation score 0.1318 (tightness 0.7500, separation 0.6250)" in result.summary()
    assert '"scores": [' in result.to_json() and result.to_dict()["ranked_by"] == "memorisation score"
    assert ClusterResult.from_dict(json.loads(result.to_json())) == result


def test_memorisation_scores_of_any_cluster_equal_scores_from_whole_rows():
    rng = np.random.default_rng(21)
    for n, dim in [(3, 3), (17, 4), (60, 8), (200, 16)]:
        vectors = rng.standard_normal((n, dim))
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        run = candidate_similarities(vectors)
        scorer = MemorisationScorer(run)  # one scorer for all clusters: its remembered neighbours are reused
        for size in sorted({2, 3, n // 4, n // 2, n - 1, n} - {0, 1}):
            members = sorted(rng.choice(n, size, replace=False).tolist())
            expected = reference_score(run.matrix.astype(np.int64), members, run.background)
            assert scorer.evidence(members).score == pytest.approx(expected, rel=1e-12, abs=1e-15), (n, size)


@pytest.mark.parametrize("seed,n,dim,n_clusters", [(0, 24, 4, 3), (1, 30, 5, 4), (2, 36, 6, 5), (3, 28, 3, 2)])
def test_ranked_cliques_equals_reference_implementation_on_random_sets(seed, n, dim, n_clusters):
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, dim))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    assert list(cluster_candidates(vectors, n_clusters).members) == reference_ranked_cliques(vectors, n_clusters)


def test_ranked_cliques_equals_reference_implementation_on_a_realistic_set():
    candidates = realistic_candidates(150, 3, n_styles=2, seed=4)
    result = cluster_candidates(candidates.vectors, 5)
    assert list(result.members) == reference_ranked_cliques(candidates.vectors, 5)
    assert candidates.found(result.centres[:3]) == 3  # and the memorised images come first


@pytest.mark.parametrize("seed", range(5))
def test_memorised_images_of_realistic_sets_are_found_and_ranked_first(seed):
    candidates = realistic_candidates(500, 3, seed=seed)  # N = 50 x N0 for N0 = 10, three memorised images
    result = cluster_candidates(candidates.vectors, 10)
    assert result.n_clusters == 10 and result.method == METHODS[0] == "ranked_cliques"
    # The three best-scoring clusters are the three memorised groups, whole and pure, however small.
    for members in result.members[:3]:
        labels = candidates.memorised[list(members)]
        assert labels[0] >= 0 and (labels == labels[0]).all()
        assert len(members) == candidates.group_sizes()[labels[0]]
    assert candidates.found(result.centres[:3]) == 3
    assert list(result.scores) == sorted(result.scores, reverse=True)
    assert min(result.scores[:3]) > max(result.scores[3:])  # styles and chance groups score lower
    assert all(is_clique_at(candidates.vectors, members, result.threshold) for members in result.members)


def test_size_ranking_of_the_paper_puts_styles_ahead_of_small_memorised_groups():
    # Why the default ranks by score: on the same sets the paper's rule keeps the N0 largest cliques, styles first.
    found = {method: 0 for method in ("ranked_cliques", "paper")}
    for seed in range(3):
        candidates = realistic_candidates(500, 3, seed=seed)
        for method in found:
            found[method] += candidates.found(cluster_candidates(candidates.vectors, 10, method).centres)
    assert found["ranked_cliques"] == 9 and found["paper"] < 9


def test_every_method_answers_at_the_papers_largest_setting():
    # N0 = 138, N = 50 x N0 = 6,900: the setting where the former default stopped with an error.
    candidates = realistic_candidates(6900, 50, seed=0)
    for method in METHODS:
        result = cluster_candidates(candidates.vectors, 138, method)
        assert result.n_clusters == len(result.centres) == 138, method
        members = list(itertools.chain.from_iterable(result.members))
        assert len(members) == len(set(members)), f"{method}: clusters overlap"
        if method == "ranked_cliques":
            assert candidates.found(result.centres) >= 0.9 * candidates.n_memorised
            assert candidates.found(result.centres[:candidates.n_memorised]) >= 0.9 * candidates.n_memorised


def test_clusters_are_the_same_on_every_run():
    candidates = realistic_candidates(500, 3, seed=7)
    for method in METHODS:
        first = cluster_candidates(candidates.vectors, 10, method)
        again = cluster_candidates(np.array(candidates.vectors, order="F"), 10, method)  # another memory layout
        assert first == again and first.to_json() == again.to_json(), method


def test_dense_pieces_fall_back_to_the_greedy_clique_cover_and_say_so():
    candidates = realistic_candidates(300, 2, n_styles=1, style_fraction=0.6, seed=2)
    result = cluster_candidates(candidates.vectors, 6, work_budget=20)
    assert any("greedy clique cover" in note for note in result.notes)
    assert result.n_clusters == 6
    assert all(is_clique_at(candidates.vectors, members, result.threshold) for members in result.members)
    assert candidates.found(result.centres[:2]) == 2  # the two memorised groups are small, sparse pieces


def test_greedy_clique_cover_partitions_into_cliques():
    rng = np.random.default_rng(11)
    for _ in range(30):
        n = int(rng.integers(5, 60))
        adjacency = random_graph(rng, n, rng.uniform(0.1, 0.95))
        cliques = greedy_clique_cover(adjacency, 1)
        assert sorted(itertools.chain.from_iterable(cliques)) == list(range(n))
        for clique in cliques:
            block = adjacency[np.ix_(clique, clique)]
            assert block.sum() == len(clique) * (len(clique) - 1)  # every pair linked
        assert [c for c in cliques if len(c) >= 3] == greedy_clique_cover(adjacency, 3)


def test_candidates_that_are_all_one_image_still_make_n0_clusters():
    rng = np.random.default_rng(3)
    copies = np.ones((40, 16)) + 1e-3 * rng.standard_normal((40, 16))
    copies /= np.linalg.norm(copies, axis=1, keepdims=True)
    for method in METHODS:
        result = cluster_candidates(copies, 5, method)
        assert result.n_clusters == 5 and sum(result.sizes) <= 40, method
        assert result.notes, method
    assert "split off" in " ".join(cluster_candidates(copies, 5).notes)  # one clique of 40 gives up 4 members


def test_realistic_generator_has_the_documented_shape():
    candidates = realistic_candidates(500, 3, seed=0)
    sims = candidates.vectors @ candidates.vectors.T
    first, second = np.triu_indices(len(sims), 1)
    pairs = sims[first, second]
    memorised, style = candidates.memorised, candidates.style
    copies = (memorised[first] >= 0) & (memorised[first] == memorised[second])
    same_style = (style[first] >= 0) & (style[first] == style[second]) & ~copies
    generic = (memorised[first] < 0) & (memorised[second] < 0) & (style[first] < 0) & (style[second] < 0)
    assert COPY_LEVELS[0] - 0.15 < pairs[copies].min() and pairs[copies].max() < COPY_LEVELS[1] + 0.05
    assert 0.3 < pairs[same_style].mean() < 0.5 and np.percentile(pairs[same_style], 99) < 0.6
    assert 0.05 < pairs[generic].mean() < 0.12 and np.percentile(pairs[generic], 99) < 0.25
    assert candidates.group_sizes().min() >= 3 and len(np.unique(style[style >= 0])) == 5
    assert np.array_equal(realistic_candidates(500, 3, seed=0).vectors, candidates.vectors)  # seeded
