"""SSCD Embed -> Clique Cluster -> Extracted Images -> Extraction Metrics as ComfyUI nodes, on planted candidates with
a real weight file.

The SSCD file is the demo's ResNet50 SSCD with seeded random weights (projection centred, see
stand_in_models.centred_random_sscd) saved as safetensors in a folder registered under models/sscd; planted candidates
are two unmistakable prototype images, each repeated with small pixel noise, so the ground truth (which candidate
belongs to which prototype) is known. How well the clustering
separates harder cases is tested on planted vectors in tests/core; here the nodes' wiring is under test.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fixtures.stand_in_models import TINY_CLIP_ARCHITECTURE, centred_random_sscd, write_tiny_open_clip

N0, COPIES, SIZE = 2, 10, 64


def prototype_images() -> torch.Tensor:
    """Two images no descriptor can confuse: fine black-and-white stripes, and a smooth colour gradient."""
    ramp = torch.linspace(0, 1, SIZE)
    stripes = ((torch.arange(SIZE) // 2) % 2).float().view(1, SIZE, 1).expand(SIZE, SIZE, 3)
    gradient = torch.stack([ramp.view(SIZE, 1).expand(SIZE, SIZE), ramp.view(1, SIZE).expand(SIZE, SIZE),
                            torch.full((SIZE, SIZE), 0.3)], dim=-1)
    return torch.stack([stripes, gradient])


def planted_candidates(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(prototypes [N0,H,W,3], candidates: COPIES noisy copies of each prototype shuffled, each one's prototype)."""
    gen = torch.Generator().manual_seed(seed)
    prototypes = prototype_images()
    labels = [i for i in range(N0) for _ in range(COPIES)]
    order = torch.randperm(len(labels), generator=gen).tolist()
    labels = [labels[i] for i in order]
    jitter = torch.randn(len(labels), SIZE, SIZE, 3, generator=gen) * 0.01
    return prototypes, (prototypes[labels] + jitter).clamp(0, 1), labels


@pytest.fixture(scope="module")
def sscd_file(host, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sscd")
    save_file(centred_random_sscd(), str(folder / "sscd_test.safetensors"))
    host.folder_paths.add_model_folder_path("sscd", str(folder))
    return "sscd_test.safetensors"


def run(node, *args, **kwargs):
    return node.execute(*args, **kwargs).args


def node_classes(host, *node_ids):
    return [host.nodes.NODE_CLASS_MAPPINGS[node_id] for node_id in node_ids]


def test_attack_back_half_recovers_the_planted_images(host, sscd_file):
    embed, cluster, images, metrics = node_classes(host, "FineXtractSSCDEmbed", "FineXtractCliqueClusterV2",
                                                   "FineXtractExtractedImages", "FineXtractExtractionMetrics")
    prototypes, candidates, labels = planted_candidates()
    (candidate_embeddings,) = run(embed, candidates, sscd_file, "paper", 8)
    assert candidate_embeddings.vectors.shape == (N0 * COPIES, 512)
    # The paper's own rule merges these two groups (its documented weakness, tested in tests/core).
    for method in ("best_threshold", "complete_linkage"):
        clusters, summary, clusters_json = run(cluster, candidate_embeddings, N0, method, 2)
        assert clusters.embeddings is candidate_embeddings and json.loads(clusters_json) == json.loads(
            clusters.result.to_json()), "the JSON output is the typed clusters, for reading"
        extracted, extracted_embeddings = run(images, clusters, candidates=candidates)
        assert extracted.shape == (N0, SIZE, SIZE, 3)
        centres = list(clusters.result.centres)
        assert torch.equal(extracted, candidates[centres]), "the extracted images must be the cluster centres"
        assert (extracted_embeddings.vectors == candidate_embeddings.vectors[centres]).all()
        assert sorted(clusters.result.sizes) == [COPIES] * N0, summary
        for members in clusters.result.members:
            assert len({labels[m] for m in members}) == 1, f"{method}: a cluster mixes prototypes: {summary}"
        (reference_embeddings,) = run(embed, prototypes, sscd_file, "paper", 8)
        as_score, esr_loose, esr_strict, table, metrics_json, grid, scores = run(
            metrics, prototypes, reference_embeddings, extracted, extracted_embeddings, 0.6, 0.7)
        assert json.loads(metrics_json) == scores.to_dict() and scores.average_similarity == as_score
        by_hand = (reference_embeddings.vectors @ extracted_embeddings.vectors.T).max(axis=1)
        assert abs(as_score - float(by_hand.mean())) < 1e-6
        assert as_score > 0.95 and esr_loose == 1.0 and esr_strict == 1.0
        best_matches = [int(row.split(",")[1]) for row in table.strip().splitlines()[1:]]
        assert sorted(best_matches) == list(range(N0)), "each prototype must be matched by its own extracted image"
        assert grid.shape[0] == 1 and grid.shape[-1] == 3 and grid.shape[1] == N0 * 256


def test_deprecated_clique_cluster_gives_what_the_new_pair_gives(host, sscd_file):
    """Pack 0.1.0's Clique Cluster (kept for saved workflows) = Clique Cluster + Extracted Images, same JSON."""
    embed, old, cluster, images = node_classes(host, "FineXtractSSCDEmbed", "FineXtractCliqueCluster",
                                               "FineXtractCliqueClusterV2", "FineXtractExtractedImages")
    assert old.GET_SCHEMA().is_deprecated and not cluster.GET_SCHEMA().is_deprecated
    _, candidates, _ = planted_candidates(seed=1)
    (embeddings,) = run(embed, candidates, sscd_file, "paper", 8)
    extracted, extracted_embeddings, summary, clusters_json = run(old, embeddings, N0, "best_threshold", 2,
                                                                  candidates=candidates)
    clusters, new_summary, new_json = run(cluster, embeddings, N0, "best_threshold", 2)
    new_extracted, new_embeddings = run(images, clusters, candidates=candidates)
    assert (summary, clusters_json) == (new_summary, new_json)
    assert torch.equal(extracted, new_extracted) and (extracted_embeddings.vectors == new_embeddings.vectors).all()


def test_similarity_nodes_refuse_bad_input_with_advice(host, sscd_file):
    embed, cluster, images, metrics = node_classes(host, "FineXtractSSCDEmbed", "FineXtractCliqueClusterV2",
                                                   "FineXtractExtractedImages", "FineXtractExtractionMetrics")
    prototypes, candidates, _ = planted_candidates()
    with pytest.raises(FileNotFoundError, match=r"models/sscd.*dl\.fbaipublicfiles\.com"):
        run(embed, candidates, "(no SSCD file in models/sscd)", "paper", 8)
    (paper,) = run(embed, prototypes, sscd_file, "paper", 8)
    (sscd_preset,) = run(embed, prototypes, sscd_file, "sscd", 8)
    with pytest.raises(ValueError, match="preset"):
        run(metrics, prototypes, paper, prototypes, sscd_preset, 0.6, 0.7)
    clusters, summary, _ = run(cluster, paper, N0 + 1, "paper", 1)
    assert clusters.result.n_clusters == N0 and f"{N0} clusters instead of N0" in summary  # fewer than N0
    clusters, _, _ = run(cluster, paper, 1, "paper", 1)
    with pytest.raises(ValueError, match="embed the same batch"):
        run(images, clusters, candidates=candidates)
    with pytest.raises(ValueError, match="Candidate Bank"):
        run(images, clusters)


def test_clip_embed_node_reads_local_weights_and_never_mixes_with_sscd(host, sscd_file, tmp_path):
    write_tiny_open_clip(str(tmp_path / "open_clip"))
    host.folder_paths.add_model_folder_path("open_clip", str(tmp_path / "open_clip"))

    clip_embed, sscd_embed, metrics = node_classes(host, "FineXtractOpenCLIPEmbed", "FineXtractSSCDEmbed",
                                                   "FineXtractExtractionMetrics")
    prototypes, candidates, _ = planted_candidates()
    (clip_vectors,) = run(clip_embed, candidates, "tiny.safetensors", TINY_CLIP_ARCHITECTURE, False, 8)
    assert clip_vectors.vectors.shape == (N0 * COPIES, 32)
    assert clip_vectors.model_id.startswith(f"open_clip:{TINY_CLIP_ARCHITECTURE}:")
    (again,) = run(clip_embed, candidates, "tiny.safetensors", TINY_CLIP_ARCHITECTURE, False, 3)
    # Another batch size changes only float rounding (well below the clustering's 1e-5 quantisation).
    assert np.abs(again.vectors - clip_vectors.vectors).max() < 1e-6
    (sscd_vectors,) = run(sscd_embed, prototypes, sscd_file, "paper", 8)
    with pytest.raises(ValueError, match="same model"):
        run(metrics, prototypes, sscd_vectors, candidates, clip_vectors, 0.6, 0.7)
    with pytest.raises(FileNotFoundError, match="models/open_clip|open_clip weights"):
        run(clip_embed, candidates, "(no CLIP file in models/open_clip)", "ViT-B-32", False, 8)
