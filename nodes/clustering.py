"""CliqueCluster: N candidates -> the N0 images the attack claims were in the fine-tuning set."""

from __future__ import annotations

from comfy_api.latest import io

from ..finextract_core import clustering
from .bank import decode_candidates
from .embedding import require_images
from .types import CANDIDATE_BANK, EMBEDDINGS

CATEGORY = "FineXtract/clustering"


class CliqueCluster(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FineXtractCliqueCluster",
            display_name="Clique Cluster (FineXtract)",
            category=CATEGORY,
            description="Groups the candidates into N0 clusters of mutually similar images (threshold graph and "
                        "cliques, Sec. 4.3 of the paper) and returns each cluster's centre, biggest cluster first.",
            inputs=[
                EMBEDDINGS.Input("embeddings", tooltip="The candidates' descriptors (SSCD Embed, or a Candidate Bank)."),
                io.Int.Input("n0", default=10, min=1, max=100000,
                             tooltip="N0: how many training images to extract (the fine-tuning set's size)."),
                io.Combo.Input("method", options=list(clustering.METHODS), default=clustering.METHODS[0],
                               tooltip=" ".join(f"{name}: {text}"
                                                for name, text in clustering.METHOD_DESCRIPTIONS.items())),
                io.Int.Input("min_clique_size", default=clustering.DEFAULT_MIN_CLIQUE_SIZE, min=1, max=1000,
                             tooltip="Clusters smaller than this are not counted: 1 lets a lone candidate count as "
                             "extracted (the paper's code), 2 needs at least two similar candidates."),
                io.Image.Input("candidates", optional=True,
                               tooltip="The N candidate images, in the order of the embeddings. Leave empty when "
                               "the embeddings come from a Candidate Bank: connect its bank and VAE instead."),
                CANDIDATE_BANK.Input("bank", optional=True, tooltip="A Candidate Bank whose embeddings these are: "
                                        "only the N0 extracted candidates are decoded."),
                io.Vae.Input("vae", optional=True, tooltip="The VAE to decode the bank's extracted candidates with."),
            ],
            outputs=[
                io.Image.Output(display_name="extracted"),
                EMBEDDINGS.Output(display_name="extracted_embeddings"),
                io.String.Output(display_name="summary"),
                io.String.Output(display_name="clusters_json"),
            ],
        )

    @classmethod
    def execute(cls, embeddings, n0, method, min_clique_size, candidates=None, bank=None, vae=None) -> io.NodeOutput:
        if candidates is None and (bank is None or vae is None):
            raise ValueError("connect the candidate images, or the Candidate Bank's bank and its VAE, so that the "
                             "extracted candidates can be output as images")
        if candidates is not None:
            require_images(candidates, "candidates")
            if candidates.shape[0] != len(embeddings):
                raise ValueError(f"{candidates.shape[0]} candidate images but {len(embeddings)} embeddings: embed the "
                                 "same batch that you cluster")
        result = clustering.cluster_candidates(embeddings, n0, method=method, min_clique_size=min_clique_size)
        centres = list(result.centres)
        extracted = candidates[centres] if candidates is not None else decode_candidates(bank, vae, centres)
        return io.NodeOutput(extracted, embeddings.subset(centres), result.summary(), result.to_json())


NODES = [CliqueCluster]
