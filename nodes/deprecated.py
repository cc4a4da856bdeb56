"""The nodes of pack 0.1.0 whose inputs or outputs changed type, kept registered (V3 ``is_deprecated``, as ComfyUI
keeps its own old nodes) so that workflows saved with them still load and run. Each is a thin adapter over the node
that replaced it; they read the JSON text outputs that the typed values replaced.

| deprecated                        | replaced by                                        |
|-----------------------------------|----------------------------------------------------|
| FineXtractCliqueCluster           | FineXtractCliqueClusterV2 + FineXtractExtractedImages |
| FineXtractDecodeBankCandidates    | FineXtractExtractedImages                          |
| FineXtractAuditReport             | FineXtractAuditReportV2                            |
"""

from __future__ import annotations

import json

from comfy_api.latest import io

from ..finextract_core import clustering
from ..finextract_core.clusters import CandidateClusters, cluster_result_from_dict
from ..finextract_core.metrics import ExtractionScores
from ..finextract_core.run_settings import RunSettings
from .bank import decode_candidates
from .clustering import CATEGORY as CLUSTERING_CATEGORY
from .clustering import candidate_source_inputs, check_candidate_source, clustering_inputs, extracted_images
from .paths import REPORT_FOLDER
from .report import CATEGORY as REPORT_CATEGORY
from .report import FOLDER_PREFIX_TOOLTIP, model_file_inputs, validate_report_inputs, write_audit_report
from .types import CANDIDATE_BANK, EMBEDDINGS


def parse_json(text: str, what: str) -> dict:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} is not JSON ({error}): connect the {what} output of the node that makes "
                         "it") from error


def parse_positions(text: str) -> list[int]:
    """Clique Cluster's clusters_json (its "centres"), a JSON list, or numbers separated by commas or spaces."""
    try:
        value = json.loads(text)
    except ValueError:
        value = text.replace(",", " ").split()
    if isinstance(value, dict):
        value = value.get("centres")
    if isinstance(value, int):
        value = [value]
    try:
        positions = [int(p) for p in value]
    except (TypeError, ValueError):
        positions = []
    if not positions:
        raise ValueError(f"indices must name candidates: CliqueCluster's clusters_json, or positions such as "
                         f"'0, 5, 17'; got {text[:80]!r}")
    return positions


class CliqueCluster(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FineXtractCliqueCluster",
            display_name="Clique Cluster, images out (FineXtract, deprecated: use Clique Cluster + Extracted Images)",
            category=CLUSTERING_CATEGORY,
            description="Pack 0.1.0's Clique Cluster, which took the candidates itself and gave the clusters as JSON.",
            inputs=[*clustering_inputs(), *candidate_source_inputs()],
            outputs=[
                io.Image.Output(display_name="extracted"),
                EMBEDDINGS.Output(display_name="extracted_embeddings"),
                io.String.Output(display_name="summary"),
                io.String.Output(display_name="clusters_json"),
            ],
            is_deprecated=True,
        )

    @classmethod
    def execute(cls, embeddings, n0, method, min_clique_size, candidates=None, bank=None, vae=None) -> io.NodeOutput:
        check_candidate_source(len(embeddings), candidates, bank, vae)  # before the clustering's work
        result = clustering.cluster_candidates(embeddings, n0, method=method, min_clique_size=min_clique_size)
        extracted, extracted_embeddings = extracted_images(CandidateClusters(result, embeddings), candidates, bank,
                                                           vae)
        return io.NodeOutput(extracted, extracted_embeddings, result.summary(), result.to_json())


class DecodeBankCandidates(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FineXtractDecodeBankCandidates",
            display_name="Decode Bank Candidates (FineXtract, deprecated: use Extracted Images)",
            category="FineXtract/sampling",
            description="Pack 0.1.0's decoder of chosen bank candidates, named by positions in a text.",
            inputs=[
                CANDIDATE_BANK.Input("bank", tooltip="The Candidate Bank node's bank output."),
                io.Vae.Input("vae", tooltip="The VAE the bank was made with."),
                io.String.Input("indices", multiline=True, default="0",
                                tooltip="Which candidates: CliqueCluster's clusters_json (its centres), or positions "
                                "in the bank's embeddings such as '0, 5, 17'."),
            ],
            outputs=[io.Image.Output(display_name="images", tooltip="The chosen candidates, in the order given.")],
            is_deprecated=True,
        )

    @classmethod
    def execute(cls, bank, vae, indices) -> io.NodeOutput:
        return io.NodeOutput(decode_candidates(bank, vae, parse_positions(indices)))


class AuditReport(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FineXtractAuditReport",
            display_name="Audit Report, JSON inputs (FineXtract, deprecated: use Audit Report)",
            category=REPORT_CATEGORY,
            description="Pack 0.1.0's Audit Report, which read the clusters, run settings and scores as JSON text. "
                        "Writes the same report as Audit Report.",
            inputs=[
                io.Image.Input("extracted", tooltip="The extracted images (Clique Cluster's 'extracted')."),
                EMBEDDINGS.Input("extracted_embeddings", tooltip="Their descriptors (Clique Cluster's "
                                 "'extracted_embeddings'): the report names the embedder and preset from them."),
                io.String.Input("clusters_json", force_input=True,
                                tooltip="Clique Cluster's 'clusters_json': method, threshold and cluster sizes."),
                io.String.Input("run_settings", force_input=True,
                                tooltip="The Model Guidance Sampler's run settings as JSON."),
                io.String.Input("folder_prefix", default=REPORT_FOLDER.example, tooltip=FOLDER_PREFIX_TOOLTIP),
                *model_file_inputs(),
                io.Image.Input("references", optional=True,
                               tooltip="Optional reference images (Load Reference Images). Needs metrics_json."),
                io.String.Input("metrics_json", optional=True, force_input=True,
                                tooltip="Extraction Metrics' 'metrics_json' for those references."),
                io.String.Input("reference_names", optional=True, force_input=True,
                                tooltip="Load Reference Images' 'file_names', to label the references by file."),
            ],
            is_output_node=True,
            outputs=[io.String.Output(display_name="report_path", tooltip="Full path of report.html.")],
            is_deprecated=True,
        )

    @classmethod
    def validate_inputs(cls, folder_prefix, pretrained_file, fine_tuned_file, lora_file) -> bool | str:
        return validate_report_inputs(folder_prefix, pretrained_file, fine_tuned_file, lora_file)

    @classmethod
    def execute(cls, extracted, extracted_embeddings, clusters_json, run_settings, folder_prefix, pretrained_file,
                fine_tuned_file, lora_file, references=None, metrics_json=None, reference_names=None) -> io.NodeOutput:
        if (references is None) != (metrics_json is None):
            raise ValueError("connect both references and metrics_json (from Extraction Metrics), or neither")
        clusters = cluster_result_from_dict(parse_json(clusters_json, "clusters_json"))
        settings = RunSettings.from_dict(parse_json(run_settings, "run_settings"))
        scores = None if metrics_json is None else ExtractionScores.from_dict(parse_json(metrics_json,
                                                                                         "metrics_json"))
        return write_audit_report(extracted, settings, clusters, extracted_embeddings, folder_prefix, pretrained_file,
                                  fine_tuned_file, lora_file, references, scores, reference_names)


NODES = [CliqueCluster, DecodeBankCandidates, AuditReport]
