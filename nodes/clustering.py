"""Clique Cluster: N candidates' embeddings -> N0 clusters; Extracted Images: clusters -> the N0 images the attack
claims were in the fine-tuning set, from the candidate images or from a Candidate Bank (decoding only the centres)."""

from __future__ import annotations

import numpy as np
from comfy_api.latest import io

from ..finextract_core import clustering
from ..finextract_core.clusters import CandidateClusters
from .bank import BankRows, decode_candidates
from .embedding import require_images
from .types import CANDIDATE_BANK, CLUSTERS, EMBEDDINGS

CATEGORY = "FineXtract/clustering"


def clustering_inputs() -> list:
    """embeddings, n0, method, min_clique_size: shared with the deprecated Clique Cluster."""
    return [
        EMBEDDINGS.Input("embeddings", tooltip="The candidates' descriptors (SSCD Embed, or a Candidate Bank)."),
        io.Int.Input("n0", default=10, min=1, max=100000,
                     tooltip="N0: how many training images to extract (the fine-tuning set's size)."),
        io.Combo.Input("method", options=list(clustering.METHODS), default=clustering.METHODS[0],
                       tooltip=" ".join(f"{name}: {text}" for name, text in clustering.METHOD_DESCRIPTIONS.items())),
        io.Int.Input("min_clique_size", default=clustering.DEFAULT_MIN_CLIQUE_SIZE, min=1, max=1000,
                     tooltip="Clusters smaller than this count only where N0 bigger ones cannot be found (the summary "
                     "says so): 1 lets a lone candidate count as extracted (the paper's code), 2 needs at least two "
                     "similar candidates."),
    ]


def candidate_source_inputs() -> list:
    """Where the candidates are: their images, or a Candidate Bank and its VAE."""
    return [
        io.Image.Input("candidates", optional=True,
                       tooltip="The N candidate images, in the order of the embeddings that were clustered. Leave "
                       "empty when the embeddings come from a Candidate Bank: connect its bank and VAE instead."),
        CANDIDATE_BANK.Input("bank", optional=True, tooltip="The Candidate Bank whose embeddings were clustered: only "
                             "the extracted candidates are decoded."),
        io.Vae.Input("vae", optional=True, tooltip="The VAE to decode the bank's extracted candidates with."),
    ]


def check_candidate_source(count: int, candidates, bank: BankRows | None, vae) -> None:
    """Refuse, before any work, a source that cannot give the images of ``count`` clustered candidates."""
    if candidates is None and (bank is None or vae is None):
        raise ValueError("connect the candidate images, or the Candidate Bank's bank and its VAE, so that the "
                         "extracted candidates can be output as images")
    if candidates is not None:
        require_images(candidates, "candidates")
        if candidates.shape[0] != count:
            raise ValueError(f"{candidates.shape[0]} candidate images but {count} embeddings: embed the same batch "
                             "that you cluster")
    elif len(bank.candidates) != count:
        raise ValueError(f"the bank holds {len(bank.candidates)} candidates but {count} were clustered: connect the "
                         "Candidate Bank whose embeddings Clique Cluster clustered")


def extracted_images(clusters: CandidateClusters, candidates=None, bank: BankRows | None = None, vae=None):
    """(IMAGE of the cluster centres, their embeddings), in the clusters' order."""
    check_candidate_source(clusters.result.n_candidates, candidates, bank, vae)
    centres = list(clusters.centres)
    if candidates is not None:
        return candidates[centres], clusters.extracted_embeddings()
    if bank.embeddings is not clusters.embeddings and not np.array_equal(bank.embeddings.vectors,
                                                                         clusters.embeddings.vectors):
        raise ValueError("these clusters were not made from this bank's embeddings: connect the Candidate Bank whose "
                         "embeddings Clique Cluster clustered")
    return decode_candidates(bank, vae, centres), clusters.extracted_embeddings()


class CliqueClusterV2(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FineXtractCliqueClusterV2",
            display_name="Clique Cluster (FineXtract)",
            category=CATEGORY,
            description="Groups the candidates into N0 clusters of mutually similar images (threshold graph and "
                        "cliques, Sec. 4.3 of the paper), the likeliest memorised image first (ranked_cliques) or "
                        "the biggest cluster first (the other methods); Extracted Images turns them into the "
                        "extracted images.",
            inputs=clustering_inputs(),
            outputs=[
                CLUSTERS.Output(display_name="clusters",
                                tooltip="The clusters, for Extracted Images and the Audit Report."),
                io.String.Output(display_name="summary", tooltip="The clusters in a few lines, to read."),
                io.String.Output(display_name="clusters_json", tooltip="The clusters as JSON, to read."),
            ],
        )

    @classmethod
    def execute(cls, embeddings, n0, method, min_clique_size) -> io.NodeOutput:
        result = clustering.cluster_candidates(embeddings, n0, method=method, min_clique_size=min_clique_size)
        return io.NodeOutput(CandidateClusters(result, embeddings), result.summary(), result.to_json())


class ExtractedImages(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FineXtractExtractedImages",
            display_name="Extracted Images (FineXtract)",
            category=CATEGORY,
            description="The image of each cluster's centre (the extracted images, in the clusters' order), taken from "
                        "the candidate images or decoded from a Candidate Bank.",
            inputs=[CLUSTERS.Input("clusters", tooltip="Clique Cluster's clusters."), *candidate_source_inputs()],
            outputs=[
                io.Image.Output(display_name="extracted", tooltip="One image per cluster, in the clusters' order."),
                EMBEDDINGS.Output(display_name="extracted_embeddings", tooltip="Their descriptors, for Extraction "
                                  "Metrics."),
            ],
        )

    @classmethod
    def execute(cls, clusters, candidates=None, bank=None, vae=None) -> io.NodeOutput:
        return io.NodeOutput(*extracted_images(clusters, candidates, bank, vae))


NODES = [CliqueClusterV2, ExtractedImages]
