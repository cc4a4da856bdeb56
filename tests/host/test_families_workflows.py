"""The Flux dev LoRA template (workflows/finextract_flux_lora.json) runs on the real host and writes its audit report.

ComfyUI's loaders detect Flux only at full size (12 B parameters, with T5-XXL beside it), so no stand-in file can
take the template's loader nodes. The template is converted to API form like the others and run node by node
in-process through ComfyUI's own node classes, with the loader nodes and the text encoders' outputs stood in by the
reduced Flux of fixtures/tiny_dits.py: everything after them (ModelSamplingFlux, LoraLoaderModelOnly on a LoRA file,
FluxGuidance, EmptySD3LatentImage, the bank, clusters, extracted images, the report) is the template's own graph.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from fixtures import tiny_dits
from fixtures.bank_helpers import SSCD_NAME, write_test_sscd
from tools.workflows import make_workflows
from tools.workflows.workflow_api import ui_to_api

NAME = "finextract_flux_lora"
SMALL_RUN = {"steps": 2, "num_candidates": 6, "batch_size": 3}
REPORT_PREFIX, BANK = "finextract/test_flux_lora_workflow", "test_flux_lora_workflow_bank"


def node_info(cls) -> dict:
    """A node type's /object_info entry, from ComfyUI's own class (V3 schema or V1 INPUT_TYPES)."""
    if hasattr(cls, "GET_NODE_INFO_V1"):
        return cls.GET_NODE_INFO_V1()
    inputs = cls.INPUT_TYPES()
    return {"input": inputs, "input_order": {group: list(inputs.get(group, {})) for group in ("required", "optional")}}


def run_node(cls, inputs: dict) -> tuple:
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        if hasattr(cls, "define_schema"):
            return tuple(cls.execute(**inputs).args)
        return tuple(getattr(cls(), cls.FUNCTION)(**inputs))


@pytest.fixture(scope="module")
def ran(host, tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux-workflow")
    for sub in ("diffusion_models", "loras"):
        (folder / sub).mkdir()
        host.folder_paths.add_model_folder_path(sub, str(folder / sub))
    host.folder_paths.add_model_folder_path("sscd", str(folder / "sscd"))
    host.folder_paths.add_model_folder_path("finextract_banks", str(folder / "banks"))
    write_test_sscd(str(folder / "sscd"))
    base, weights = tiny_dits.patcher("flux", seed=1)
    base_path = str(folder / "diffusion_models" / make_workflows.FLUX_BASE_FILE)
    save_file({k: v.contiguous() for k, v in weights.items()}, base_path)
    with open(base_path, "rb") as f:
        base_sha256 = hashlib.sha256(f.read()).hexdigest()
    lora = tiny_dits.lora_file("flux", tiny_dits.lora_factors("flux", weights, seed=3), "transformer")
    save_file(lora, str(folder / "loras" / make_workflows.FLUX_LORA_FILE),
              metadata={"ss_sd_model_name": make_workflows.FLUX_BASE_FILE, "ss_new_sd_model_hash": base_sha256})
    mappings = host.nodes.NODE_CLASS_MAPPINGS
    with open(os.path.join(make_workflows.WORKFLOWS_DIR, f"{NAME}.json")) as f:
        workflow = json.load(f)
    object_info = {node["type"]: node_info(mappings[node["type"]]) for node in workflow["nodes"]
                   if node["type"] in mappings}
    prompt = ui_to_api(workflow, object_info)
    report_folder = os.path.join(host.folder_paths.get_output_directory(), REPORT_PREFIX)
    shutil.rmtree(report_folder, ignore_errors=True)
    # The loaders and the text encoders' outputs, stood in; every other node is the template's, on ComfyUI's classes.
    stand_ins = {
        "UNETLoader": lambda inputs: (base,),
        "DualCLIPLoader": lambda inputs: ("flux text encoders",),
        "VAELoader": lambda inputs: (tiny_dits.taesd16_vae(),),
        "CLIPTextEncode": lambda inputs: (tiny_dits.conditioning("flux", 5 if inputs["text"] else 6),),
    }
    small = {"FineXtractCandidateBank": {**SMALL_RUN, "sscd_model": SSCD_NAME, "bank_folder": str(folder / "banks"
                                                                                                  / BANK)},
             "EmptySD3LatentImage": {"width": 64, "height": 64},
             "ModelSamplingFlux": {"width": 64, "height": 64},
             "FineXtractCliqueClusterV2": {"n0": 2, "min_clique_size": 1},
             "FineXtractAuditReportV2": {"folder_prefix": REPORT_PREFIX}}
    results, pending = {}, dict(prompt)
    while pending:
        for node_id, node in list(pending.items()):
            links = [v for v in node["inputs"].values() if isinstance(v, list)]
            if any(source not in results for source, _ in links):
                continue
            inputs = {name: results[value[0]][value[1]] if isinstance(value, list) else value
                      for name, value in node["inputs"].items()}
            inputs.update(small.get(node["class_type"], {}))
            make = stand_ins.get(node["class_type"])
            results[node_id] = make(inputs) if make else run_node(mappings[node["class_type"]], inputs)
            del pending[node_id]
    by_type = {node["class_type"]: node_id for node_id, node in prompt.items()}
    with open(os.path.join(report_folder, "report.json")) as f:
        report = json.load(f)
    return {"prompt": prompt, "results": results, "by_type": by_type, "report": report, "base_sha256": base_sha256,
            "bank_folder": str(folder / "banks" / BANK)}


def test_the_flux_template_runs_and_writes_the_audit_report(host, ran):
    report = ran["report"]
    sampling = report["sampling"]
    assert sampling["latent_shape"] == [16, 8, 8] and sampling["model_family"] == "Flux (Flux, latent Flux)"
    assert sampling["fine_tune"] == "base + LoRA (shared weights)" and sampling["candidates"] == 6
    guidance = host.module("finextract_core.guidance").FLUX_DEV_DEFAULTS
    assert (sampling["guidance_scale"], sampling["k"]) == (guidance["scale"], guidance["k"])
    assert (sampling["sampler"], sampling["scheduler"]) == ("euler", "simple")
    assert report["clustering"]["n_candidates"] == 6 and len(report["extracted"]) == report["clustering"]["n_clusters"]
    assert [m["role"] for m in report["models"]] == ["pretrained", "lora"]
    assert report["models"][0]["sha256"] == ran["base_sha256"]
    # The LoRA's metadata names this base by its SHA-256: checked, and no warning.
    assert report["base_check"]["verdict"] == "same" and report["base_check"]["by"] == "sha256"


def test_the_flux_template_gives_both_prompts_its_distilled_guidance_and_the_bank_its_shift(host, ran):
    results, by_type, prompt = ran["results"], ran["by_type"], ran["prompt"]
    distilled = host.module("finextract_core.guidance").FLUX_DEV_DEFAULTS["distilled_guidance"]
    bank_inputs = prompt[by_type["FineXtractCandidateBank"]]["inputs"]
    for role in ("positive", "negative"):
        source, slot = bank_inputs[role]
        assert prompt[source]["class_type"] == "FluxGuidance"
        assert results[source][slot][0][1]["guidance"] == distilled
    # ModelSamplingFlux sits on the base before it branches: both inputs carry it, and the bank's key records it.
    for role in ("fine_tuned", "pretrained"):
        source, slot = bank_inputs[role]
        assert "model_sampling" in results[source][slot].object_patches
    key = host.module("finextract_core.bank").read_manifest(ran["bank_folder"])["key"]
    assert "model_sampling" in key and key["latent_shape"] == [16, 8, 8]
