"""The pack's own "pick the file its loader shows" messages reach whoever posts a prompt, on a real server of any
ComfyUI version: 0.3.75 does not check V3 combo values, current ComfyUI does, in its own words ("Value not in list"),
except for the inputs a node's validate_inputs takes. Every file input of the pack is taken by its node's
validate_inputs, so a name the list does not show (a typo, a deleted file, a path that climbs out of the folder) is
refused before anything runs, with the pack's advice, and a listed name still runs.

Run on another tree with FINEXTRACT_COMFYUI / FINEXTRACT_PYTHON (docs/compatibility.md).
"""

from __future__ import annotations

import os

import pytest

from fixtures.bank_helpers import validation_errors
from fixtures.stand_in_models import stand_in_prompt, write_workflow_stand_ins
from tools.host.comfy_server import REPO_ROOT, ComfyServer, execution_error

SMALL_RUN = {"n0": 2, "candidates": 4, "steps": 2, "size": 64}
OLD_WORKFLOWS = os.path.join(REPO_ROOT, "fixtures", "old_workflows")
# A name no list shows, and one that climbs out of its folder to a file that exists.
BAD_NAMES = ("missing.safetensors", "../checkpoints/base.safetensors")


@pytest.fixture(scope="module")
def server(host, tmp_path_factory):  # host: the stand-in models take their shapes from ComfyUI's own modules
    base = str(tmp_path_factory.mktemp("file-messages"))
    write_workflow_stand_ins(f"{base}/models")
    with ComfyServer(base, lab=False) as running:
        yield running


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


def prompt_with(object_info, workflow: str, class_type: str, changes: dict, folder: str | None = None) -> dict:
    prompt = stand_in_prompt(workflow, object_info, **SMALL_RUN, **({"folder": folder} if folder else {}))
    (node,) = [node for node in prompt.values() if node["class_type"] == class_type]
    node["inputs"].update(changes)
    return prompt


def clip_embed_prompt(object_info, clip_weights: str) -> dict:
    """The one-batch DreamBooth workflow with CLIP Embed in place of SSCD Embed."""
    prompt = stand_in_prompt("finextract_dreambooth_one_batch", object_info, **SMALL_RUN)
    (node,) = [node for node in prompt.values() if node["class_type"] == "FineXtractSSCDEmbed"]
    node.update(class_type="FineXtractOpenCLIPEmbed", inputs={
        "images": node["inputs"]["images"], "clip_weights": clip_weights, "architecture": "ViT-B-32",
        "quick_gelu": False, "batch_size": 4})
    return prompt


CASES = {
    "SSCD Embed": ("finextract_dreambooth_one_batch", "FineXtractSSCDEmbed", "sscd_model",
                   "SSCD weights '{name}' not found. Put an SSCD file in", None),
    "Candidate Bank": ("finextract_lora", "FineXtractCandidateBank", "sscd_model",
                       "SSCD weights '{name}' not found. Put an SSCD file in", None),
    "Audit Report": ("finextract_dreambooth_one_batch", "FineXtractAuditReportV2", "pretrained_file",
                     "pretrained_file '{name}' is not in models/{{checkpoints,diffusion_models}}: pick the file its "
                     "loader shows", None),
    "Audit Report (deprecated)": ("finextract_lora", "FineXtractAuditReport", "lora_file",
                                  "lora_file '{name}' is not in models/{{loras}}: pick the file its loader shows",
                                  OLD_WORKFLOWS),
}


@pytest.mark.parametrize("name", BAD_NAMES)
@pytest.mark.parametrize("case", list(CASES))
def test_a_file_the_list_does_not_show_is_refused_in_the_packs_words(server, object_info, case, name):
    workflow, class_type, input_name, words, folder = CASES[case]
    errors = validation_errors(server, prompt_with(object_info, workflow, class_type, {input_name: name}, folder))
    assert any(error["type"] == "custom_validation_failed" and words.format(name=name) in error["details"]
               for error in errors), errors
    assert not [error for error in errors if error["type"] == "value_not_in_list"], \
        f"ComfyUI's own words must not replace the pack's: {errors}"


@pytest.mark.parametrize("name", BAD_NAMES)
def test_clip_embed_names_where_its_weights_go(server, object_info, name):
    errors = validation_errors(server, clip_embed_prompt(object_info, name))
    assert any(error["type"] == "custom_validation_failed"
               and f"CLIP weights '{name}' not found: put open_clip weights in" in error["details"]
               and "models/open_clip" in error["details"] for error in errors), errors
    assert not [error for error in errors if error["type"] == "value_not_in_list"], errors


@pytest.mark.parametrize("name", BAD_NAMES)
@pytest.mark.parametrize("input_name, other, folders", [("lora_file", "model_file", "loras"),
                                                        ("model_file", "lora_file", "checkpoints,diffusion_models")])
def test_model_evidence_names_the_loaders_list(server, input_name, other, folders, name):
    prompt = {"1": {"class_type": "FineXtractModelEvidence", "inputs": {input_name: name, other: "(none)"}}}
    errors = validation_errors(server, prompt)
    assert any(error["type"] == "custom_validation_failed"
               and f"{input_name} '{name}' is not in models/{{{folders}}}: pick a file from the list" in error["details"]
               for error in errors), errors
    assert not [error for error in errors if error["type"] == "value_not_in_list"], errors


def test_listed_files_still_run(server, object_info):
    # 4 candidates of a random model need not form two pairs: single-candidate clusters count here.
    prompt = prompt_with(object_info, "finextract_dreambooth_one_batch", "FineXtractCliqueClusterV2",
                         {"min_clique_size": 1})
    entry = server.run(prompt, timeout=300)
    assert execution_error(entry) is None, execution_error(entry)
