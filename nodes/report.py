"""Audit Report: writes what an extraction found, and everything needed to reproduce it, into one subfolder of
ComfyUI's output directory. The report itself (report.json, report.html, summary.png, the extracted images) is made
by finextract_core/report.py; this node finds and hashes the model files, places the folder and shows the result in
the graph.
"""

from __future__ import annotations

import hashlib
import os

import folder_paths
from comfy_api.latest import io, ui

from ..finextract_core import report as report_core
from ..finextract_core.evidence import BaseCheck, EvidenceError, check_base_file, read_evidence
from .paths import REPORT_FOLDER, resolve_folder, validate_folder
from .types import CLUSTERS, EXTRACTION_SCORES, RUN_SETTINGS

CATEGORY = "FineXtract/evaluation"


def _sha256_uncached(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


_hashes: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str) -> str:
    """SHA-256 of a model file; re-hashing a few GB on every run would dominate a small run, so results are kept
    per (path, size, mtime)."""
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _hashes:
        _hashes[key] = _sha256_uncached(path)
    return _hashes[key]


NO_FILE = "(none)"  # a role with no file: a LoRA attack has no fine-tuned checkpoint
# Where each role's file can be: the folders its loaders list (a DreamBooth fine-tune can be a full checkpoint or a
# UNet in diffusion_models).
ROLE_FOLDERS = {"pretrained": ("checkpoints", "diffusion_models"), "fine_tuned": ("checkpoints", "diffusion_models"),
                "lora": ("loras",)}


def model_file_options(role: str) -> list[str]:
    """(none), then the file names the loaders of this role list, in the same spelling (with any subfolder)."""
    names = [name for folder in ROLE_FOLDERS[role] for name in folder_paths.get_filename_list(folder)]
    return [NO_FILE, *dict.fromkeys(names)]


def describe_model_file(role: str, name: str) -> dict:
    """A model file as its loader names it, with the folder it was found in, its size and SHA-256."""
    for folder in ROLE_FOLDERS[role]:
        path = folder_paths.get_full_path(folder, name)
        if path:
            return {"role": role, "file": name, "folder": folder, "bytes": os.path.getsize(path),
                    "sha256": file_sha256(path)}
    # Only reachable when the file went away after the prompt was validated against the list.
    raise FileNotFoundError(f"{role} model file '{name}' is no longer in models/{{{','.join(ROLE_FOLDERS[role])}}}: "
                            "press 'r' in the graph to refresh the file lists and pick it again")


def report_folder(prefix: str) -> tuple[str, str]:
    """(absolute folder, subfolder relative to the output directory, as ComfyUI's /view takes it)."""
    folder = resolve_folder(REPORT_FOLDER, prefix)
    return folder, os.path.relpath(folder, REPORT_FOLDER.comfy_root()).replace(os.sep, "/")


def model_file_inputs() -> list:
    """pretrained_file, fine_tuned_file, lora_file: shared with the deprecated Audit Report."""
    return [
        io.Combo.Input("pretrained_file", options=model_file_options("pretrained"), default=NO_FILE,
                       tooltip="The pretrained (base) model file: pick the entry its loader shows (listed from "
                       "checkpoints and diffusion_models). The report records its SHA-256."),
        io.Combo.Input("fine_tuned_file", options=model_file_options("fine_tuned"), default=NO_FILE,
                       tooltip="The fine-tuned model file (the DreamBooth checkpoint or UNet), as its loader shows it. "
                       "(none) for a LoRA attack, where the LoRA file below is the fine-tune."),
        io.Combo.Input("lora_file", options=model_file_options("lora"), default=NO_FILE,
                       tooltip="The LoRA under audit (models/loras), as LoraLoaderModelOnly shows it. (none) "
                       "otherwise."),
    ]


FOLDER_PREFIX_TOOLTIP = ("Subfolder of ComfyUI's output directory for this report (it cannot leave output: the graph "
                         "shows the report from there); a second run with the same prefix replaces the report in it.")


def validate_report_inputs(folder_prefix, pretrained_file, fine_tuned_file, lora_file) -> bool | str:
    """Refuse, before anything runs, a report folder outside output and a name no loader lists (ComfyUI 0.3.75 does
    not check V3 combo values; current ComfyUI does, but in its own words, unless validate_inputs takes them)."""
    for role, name in (("pretrained", pretrained_file), ("fine_tuned", fine_tuned_file), ("lora", lora_file)):
        if name is not None and name not in model_file_options(role):  # None: the value comes from a link
            return (f"{role}_file '{name}' is not in models/{{{','.join(ROLE_FOLDERS[role])}}}: pick the file its "
                    f"loader shows from the list (press 'r' to refresh it), or {NO_FILE}")
    return validate_folder(REPORT_FOLDER, folder_prefix)


def lora_base_check(models: list[dict]) -> BaseCheck | None:
    """For a LoRA audit: whether the pretrained file is the base the LoRA's metadata records (kohya's base SHA-256,
    else its name), the one check that tells two bases of one architecture apart (SDXL base, Pony, Illustrious)."""
    by_role = {model["role"]: model for model in models}
    if "lora" not in by_role or "pretrained" not in by_role:
        return None
    lora, pretrained = by_role["lora"], by_role["pretrained"]
    try:
        evidence = read_evidence(folder_paths.get_full_path(lora["folder"], lora["file"]), name=lora["file"])
    except EvidenceError:
        return None  # not a safetensors file: ComfyUI's loader has refused it already
    return check_base_file(evidence, pretrained["file"], pretrained["sha256"])


def write_audit_report(extracted, settings, clusters, extracted_embeddings, folder_prefix, pretrained_file,
                       fine_tuned_file, lora_file, references=None, scores=None, reference_names=None) -> io.NodeOutput:
    """Writes the report into output/<folder_prefix>/ and returns the node's output: report.html's path, and the
    summary, the extracted images and the panel for the graph."""
    folder, subfolder = report_folder(folder_prefix)
    models = [describe_model_file(role, name) for role, name in
              (("pretrained", pretrained_file), ("fine_tuned", fine_tuned_file), ("lora", lora_file))
              if name != NO_FILE]
    names = reference_names.splitlines() if reference_names is not None else None
    base_check = lora_base_check(models)
    made = report_core.make_report(extracted, settings, clusters, extracted_embeddings, models, references, scores,
                                   names, base_check.to_dict() if base_check else None)
    os.makedirs(folder, exist_ok=True)
    report_path = report_core.write_report(folder, made)
    saved = [ui.SavedResult(name, subfolder, io.FolderType.output)
             for name in [report_core.SUMMARY_NAME, *made.extracted_files]]
    warning = f"\n{base_check.message}" if base_check is not None and base_check.warns else ""
    return io.NodeOutput(report_path, ui={"images": saved, "text": [f"{made.headline}{warning}\nreport: {report_path}"],
                                          "finextract_report": [report_core.panel(made, subfolder)]})


class AuditReportV2(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FineXtractAuditReportV2",
            display_name="Audit Report (FineXtract)",
            category=CATEGORY,
            description="Writes report.html, summary.png, the extracted images and report.json (model hashes, sampler "
                        "settings, embedder, clustering, scores) into one subfolder of ComfyUI's output directory. "
                        "The same inputs always write the same bytes.",
            inputs=[
                io.Image.Input("extracted", tooltip="The extracted images (Extracted Images' 'extracted')."),
                CLUSTERS.Input("clusters", tooltip="Clique Cluster's clusters: method, threshold, cluster sizes and "
                               "the embedder, all recorded in the report."),
                RUN_SETTINGS.Input("run_settings", tooltip="The run settings of the Candidate Bank or Model Guidance "
                                   "Sampler that made the candidates: mode, w', k, seed, steps, sampler."),
                io.String.Input("folder_prefix", default=REPORT_FOLDER.example, tooltip=FOLDER_PREFIX_TOOLTIP),
                *model_file_inputs(),
                io.Image.Input("references", optional=True,
                               tooltip="Optional reference images (Load Reference Images): the summary then shows "
                               "each reference beside its best extracted match. Needs scores."),
                EXTRACTION_SCORES.Input("scores", optional=True,
                                        tooltip="Extraction Metrics' scores for those references: AS, A-ESR and the "
                                        "best match of each reference."),
                io.String.Input("reference_names", optional=True, force_input=True,
                                tooltip="Load Reference Images' 'file_names', to label the references by file."),
            ],
            is_output_node=True,
            outputs=[io.String.Output(display_name="report_path", tooltip="Full path of report.html.")],
        )

    @classmethod
    def validate_inputs(cls, folder_prefix, pretrained_file, fine_tuned_file, lora_file) -> bool | str:
        return validate_report_inputs(folder_prefix, pretrained_file, fine_tuned_file, lora_file)

    @classmethod
    def execute(cls, extracted, clusters, run_settings, folder_prefix, pretrained_file, fine_tuned_file, lora_file,
                references=None, scores=None, reference_names=None) -> io.NodeOutput:
        return write_audit_report(extracted, run_settings, clusters.result, clusters.extracted_embeddings(),
                                  folder_prefix, pretrained_file, fine_tuned_file, lora_file, references, scores,
                                  reference_names)


NODES = [AuditReportV2]
