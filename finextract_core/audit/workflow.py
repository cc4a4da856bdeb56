"""The prompts the audit queues, in ComfyUI's API format: the model family's loaders (a WorkflowBuilder) and the
pack's bank-first extraction after them (Candidate Bank -> Clique Cluster -> Extracted Images -> Extraction Metrics
against the references -> Audit Report), the same graph as workflows/finextract_*.json.

The builder is the one seam for a model family: the SD family's is here (ComfyUI's own checkpoint loader, CLIP text
encoder and VAE, and the pack's SSCD); another (the lab's demo world) is named on the command line as
``--workflow-builder module:attribute`` and must offer the same attributes and methods as SDBuilder.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field

from ..evidence import families_agree
from ..evidence_header import EvidenceError, read_header
from ..guidance import DREAMBOOTH_DEFAULTS, LORA_DEFAULTS
from ..metrics import DEFAULT_ESR_THRESHOLDS
from ..sscd import DEFAULT_PRESET

LOOSE, STRICT = DEFAULT_ESR_THRESHOLDS
NO_FILE = "(none)"  # the Audit Report's and Model Evidence's empty choice (nodes/report.py, nodes/evidence.py)
SAMPLER, SCHEDULER = "ddim", "ddim_uniform"  # the paper's 50 DDIM steps, as the example workflows sample
# Node ids the loaders and references keep from one prompt to the next, so ComfyUI's cache keeps the base loaded
# and the references embedded across models.
BASE, REFERENCES, REFERENCE_EMBEDDINGS = "base", "references", "reference_embeddings"


@dataclass(frozen=True)
class ModelFile:
    """A model under audit, as the server lists it: ``name`` relative to the models folder ``root``."""

    path: str
    root: str
    name: str
    kind: str  # the evidence reader's kind: lora, lycoris, checkpoint, unet, ...

    @property
    def is_lora(self) -> bool:
        return self.kind in ("lora", "lycoris")


@dataclass(frozen=True)
class Base:
    """A base model the user has: ``name`` relative to the bases folder, as the server lists it."""

    path: str
    name: str
    family: str | None
    folder: str = ""  # the builder's own handle (the lab's world folder)


@dataclass(frozen=True)
class ModelGraph:
    """A model's loaders as API nodes, and where their outputs are (``[node id, output slot]``)."""

    nodes: dict
    fine_tuned: list
    pretrained: list
    positive: list
    negative: list
    vae: list
    embedder: list | None = None  # an IMAGE_EMBEDDER for the bank in place of SSCD (None: the bank's SSCD file)
    sscd_model: str = NO_FILE
    report_files: dict = field(default_factory=dict)  # the Audit Report's pretrained_file / fine_tuned_file / lora_file


@dataclass(frozen=True)
class ExtractionSettings:
    candidates_per_image: int = 50  # the paper's N = 50 x N0
    max_candidates: int = 0  # 0: no cap
    steps: int = 50
    seed: int = 0
    batch_size: int = 8

    def candidates(self, n0: int) -> int:
        wanted = self.candidates_per_image * n0
        return min(wanted, self.max_candidates) if self.max_candidates else wanted


def guidance_defaults(model: ModelFile) -> dict:
    """The paper's w' and k for the fine-tune's kind."""
    return LORA_DEFAULTS if model.is_lora else DREAMBOOTH_DEFAULTS


class SDBuilder:
    """Stable Diffusion checkpoints (and LoRAs on them) with ComfyUI's own loaders and the pack's SSCD."""

    name = "sd"
    resolution = 512  # of the references and of the candidates
    latent_size = 512  # EmptyLatentImage's width and height for that resolution
    custom_node_folders: tuple[tuple[str, str], ...] = ()  # (link name, folder): none beyond the pack

    def __init__(self, sscd_model: str = "sscd_disc_large.torchscript.pt"):
        self.sscd_model = sscd_model

    def bases(self, folder: str) -> list[Base]:
        from ..evidence import model_files_under

        found = []
        for name, path in model_files_under(folder):
            try:
                family = _family_of(path)
            except EvidenceError:
                continue
            found.append(Base(path, name, family))
        return found

    def fit(self, model: ModelFile, family: str | None, base: Base) -> str | None:
        """None if the base fits the model by the families their tensors show, else why not. (A LoRA's keys are
        counted against the base on the server as well: audit.command.lora_fit.)"""
        if family is None or base.family is None:
            return f"the family of {'the model' if family is None else base.name} is unknown"
        if not families_agree(family, base.family):
            return f"{base.name} is {base.family}, the model is {family}"
        return None

    def model_graph(self, model: ModelFile, base: Base, caption: str) -> ModelGraph:
        nodes = {BASE: {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": base.name}}}
        files = {"pretrained_file": base.name, "fine_tuned_file": NO_FILE, "lora_file": NO_FILE}
        if model.is_lora:
            nodes["fine_tuned"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
                "model": [BASE, 0], "lora_name": model.name, "strength_model": 1.0}}
            files["lora_file"] = model.name
        else:
            nodes["fine_tuned"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": model.name}}
            files["fine_tuned_file"] = model.name
        nodes["positive"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": [BASE, 1], "text": caption}}
        nodes["negative"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": [BASE, 1], "text": ""}}
        return ModelGraph(nodes, ["fine_tuned", 0], [BASE, 0], ["positive", 0], ["negative", 0], [BASE, 2],
                          sscd_model=self.sscd_model, report_files=files)

    def reference_nodes(self, images: list) -> dict:
        """The node that embeds the references (id REFERENCE_EMBEDDINGS, output 0: EMBEDDINGS)."""
        return {REFERENCE_EMBEDDINGS: {"class_type": "FineXtractSSCDEmbed", "inputs": {
            "images": images, "sscd_model": self.sscd_model, "preset": DEFAULT_PRESET, "batch_size": 32}}}


def _family_of(path: str) -> str | None:
    from ..evidence_tensors import read_family

    reading, _ = read_family(read_header(path).shapes)
    return reading.value if reading else None


def load_builder(spec: str):
    """``sd`` or ``module:attribute`` (a builder object, or a class called without arguments)."""
    if spec == "sd":
        return SDBuilder()
    module, _, attribute = spec.partition(":")
    if not module or not attribute:
        raise ValueError(f"--workflow-builder '{spec}': give 'sd' or 'module:attribute'")
    builder = getattr(importlib.import_module(module), attribute)
    return builder() if isinstance(builder, type) else builder


def extraction_prompt(graph: ModelGraph, builder, model: ModelFile, references_folder: str, caption_n0: int,
                      settings: ExtractionSettings, bank_folder: str, report_prefix: str) -> dict:
    """The model's loaders, then the bank-first extraction, metrics against the references and the report."""
    defaults = guidance_defaults(model)
    prompt = dict(graph.nodes)
    prompt["latent"] = {"class_type": "EmptyLatentImage", "inputs": {
        "width": builder.latent_size, "height": builder.latent_size, "batch_size": 1}}
    bank_inputs = {
        "fine_tuned": graph.fine_tuned, "pretrained": graph.pretrained, "positive": graph.positive,
        "negative": graph.negative, "mode": "finextract", "guidance_scale": defaults["scale"], "k": defaults["k"],
        "latent_image": ["latent", 0], "seed": settings.seed, "steps": settings.steps, "sampler_name": SAMPLER,
        "scheduler": SCHEDULER, "vae": graph.vae, "sscd_model": graph.sscd_model, "preset": DEFAULT_PRESET,
        "num_candidates": settings.candidates(caption_n0), "first_candidate": 0, "batch_size": settings.batch_size,
        "bank_folder": bank_folder}
    if graph.embedder is not None:
        bank_inputs["embedder"] = graph.embedder
    prompt["bank"] = {"class_type": "FineXtractCandidateBank", "inputs": bank_inputs}
    prompt["clusters"] = {"class_type": "FineXtractCliqueClusterV2", "inputs": {
        "embeddings": ["bank", 0], "n0": caption_n0}}  # the method and its settings: the node's defaults
    prompt["extracted"] = {"class_type": "FineXtractExtractedImages", "inputs": {
        "clusters": ["clusters", 0], "bank": ["bank", 1], "vae": graph.vae}}
    prompt[REFERENCES] = {"class_type": "FineXtractLoadReferenceImages", "inputs": {
        "folder": os.path.abspath(references_folder), "size": builder.resolution}}
    prompt.update(builder.reference_nodes([REFERENCES, 0]))
    prompt["metrics"] = {"class_type": "FineXtractExtractionMetrics", "inputs": {
        "references": [REFERENCES, 0], "reference_embeddings": [REFERENCE_EMBEDDINGS, 0],
        "extracted": ["extracted", 0], "extracted_embeddings": ["extracted", 1], "loose_threshold": LOOSE,
        "strict_threshold": STRICT}}
    prompt["report"] = {"class_type": "FineXtractAuditReportV2", "inputs": {
        "extracted": ["extracted", 0], "clusters": ["clusters", 0], "run_settings": ["bank", 3],
        "folder_prefix": report_prefix, **graph.report_files, "references": [REFERENCES, 0],
        "scores": ["metrics", 6], "reference_names": [REFERENCES, 1]}}
    return prompt


def bank_range_prompt(prompt: dict, first: int, count: int) -> dict:
    """The extraction prompt's Candidate Bank alone (with the nodes it reads), for candidates first .. first +
    count - 1: the same bank folder and key, so the whole prompt later finds them there. The bank is an output node,
    so it runs with nothing after it."""
    needed, todo = set(), ["bank"]
    while todo:
        node_id = todo.pop()
        if node_id not in needed:
            needed.add(node_id)
            todo.extend(value[0] for value in prompt[node_id]["inputs"].values()
                        if isinstance(value, list) and len(value) == 2 and value[0] in prompt)
    bank = prompt["bank"]
    nodes = {node_id: node for node_id, node in prompt.items() if node_id in needed}
    nodes["bank"] = {**bank, "inputs": {**bank["inputs"], "first_candidate": first, "num_candidates": count}}
    return nodes


def lora_fit_prompt(graph: ModelGraph, model: ModelFile) -> dict:
    """Model Evidence on the LoRA with the base's MODEL: how many of its keys the base takes."""
    nodes = {key: value for key, value in graph.nodes.items() if key == BASE or key.startswith(BASE + "_")}
    nodes["evidence"] = {"class_type": "FineXtractModelEvidence", "inputs": {
        "lora_file": model.name, "model_file": NO_FILE, "base_model": graph.pretrained}}
    return nodes


def prescreen_prompt(graph: ModelGraph, builder, samples: int, seed: int) -> dict:
    prompt = dict(graph.nodes)
    prompt["latent"] = {"class_type": "EmptyLatentImage", "inputs": {
        "width": builder.latent_size, "height": builder.latent_size, "batch_size": 1}}
    prompt["prescreen"] = {"class_type": "FineXtractMemorisationPrescreen", "inputs": {
        "fine_tuned": graph.fine_tuned, "pretrained": graph.pretrained, "positive": graph.positive,
        "latent_image": ["latent", 0], "seed": seed, "samples": samples}}
    return prompt


def with_defaults(prompt: dict, object_info: dict) -> dict:
    """The prompt with every required input it leaves out set to the node's default, as the server's
    /object_info gives it (a combo without one: its first option), so the prompt takes the defaults of the pack that
    is installed (the clustering method, for one) instead of repeating them."""
    filled = {}
    for node_id, node in prompt.items():
        inputs = dict(node["inputs"])
        for name, spec in object_info[node["class_type"]]["input"].get("required", {}).items():
            if name in inputs or len(spec) < 2 or not isinstance(spec[1], dict):
                continue
            options = spec[0] if isinstance(spec[0], list) else spec[1].get("options")
            if "default" in spec[1]:
                inputs[name] = spec[1]["default"]
            elif options:
                inputs[name] = options[0]
        filled[node_id] = {**node, "inputs": inputs}
    return filled
