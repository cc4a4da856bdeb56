"""The example workflows in workflows/: exactly what the generator writes from a live server, their node types and
links agree with a real server's /object_info, ComfyUI serves them as the pack's templates, and each one, converted to
API form with the small stand-in models swapped in, runs on a real ComfyUI server and writes the audit report; a second
run writes the same bytes. The bank path records the sampler path's run settings, and the workflows saved before the
typed hand-offs (fixtures/old_workflows: main's workflows/ at f2600c4) still load and run on the deprecated nodes,
writing the same report as today's one-batch templates."""

from __future__ import annotations

import asyncio
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fixtures.stand_in_models import stand_in_prompt, write_workflow_stand_ins
from lab.demo import report_folders
from tools.host.comfy_server import PACK_FOLDER, REPO_ROOT, ComfyServer, execution_error
from tools.workflows.make_workflows import WORKFLOWS_DIR
from tools.workflows.workflow_api import EDITOR_ONLY_TYPES, input_type, ordered_inputs, replace_inputs, ui_to_api

OLD_WORKFLOWS_DIR = os.path.join(REPO_ROOT, "fixtures", "old_workflows")


def names_in(folder: str) -> list[str]:
    return sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(f"{folder}/*.json"))


WORKFLOW_NAMES = names_in(WORKFLOWS_DIR)
# ComfyUI's loaders detect Flux only at full size (12 B parameters) and need T5-XXL: no stand-in file can take the Flux
# template's loaders, so it runs in-process with in-memory stand-ins for them (tests/host/test_families_workflows.py).
SERVER_RUN_NAMES = [name for name in WORKFLOW_NAMES if name != "finextract_flux_lora"]
# Each template's Candidate Bank batch and the GPU its note says it fits (the notes give ComfyUI's own estimates).
BANK_BATCHES = {"finextract_flux_lora": (2, "fits a 24 GB GPU"),
                "finextract_sdxl_derivative_lora": (4, "fits a 12 GB GPU")}
OLD_WORKFLOW_NAMES = names_in(OLD_WORKFLOWS_DIR)
SMALL_RUN = {"n0": 2, "candidates": 6, "steps": 2, "size": 64}
REPORT_FILES = ["extracted_00.png", "extracted_01.png", "report.html", "report.json", "summary.png"]


def load_workflow(name: str, folder: str = WORKFLOWS_DIR) -> dict:
    with open(os.path.join(folder, f"{name}.json")) as f:
        return json.load(f)


def write_reference_images(folder: str) -> None:
    """Three distinct 64 px pictures standing in for an artist's own images."""
    os.makedirs(folder, exist_ok=True)
    ramp = np.linspace(0, 255, 64, dtype=np.float32)
    pictures = {
        "gradient.png": np.stack([np.tile(ramp, (64, 1)), np.tile(ramp[:, None], (1, 64)), np.full((64, 64), 90.0)],
                                 -1),
        "stripes.png": np.repeat(((np.arange(64) // 4) % 2 * 255.0)[None, :, None], 64, 0).repeat(3, -1),
        "checks.png": (((np.arange(64)[:, None] // 8 + np.arange(64)[None, :] // 8) % 2) * 255.0)[..., None]
        .repeat(3, -1),
    }
    for name, pixels in pictures.items():
        Image.fromarray(pixels.astype(np.uint8)).save(os.path.join(folder, name))


@pytest.fixture(scope="module")
def server(host, tmp_path_factory):  # host: the stand-in models take their shapes from ComfyUI's own modules
    base = str(tmp_path_factory.mktemp("workflow-base"))
    write_workflow_stand_ins(f"{base}/models")
    write_reference_images(f"{base}/input/references")
    os.makedirs(f"{base}/user/default", exist_ok=True)
    with open(f"{base}/user/default/comfy.settings.json", "w") as f:
        json.dump({"Comfy.TutorialCompleted": True}, f)  # no first-run template browser over the graph
    with ComfyServer(base, lab=False) as running:  # the pack alone, as users install it
        yield running


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


def test_a_host_without_the_lab_lists_the_packs_nodes_and_no_lab_node(host, object_info):
    """What users get in their node list: every node of the pack's extension, and none of the lab's."""
    from lab.nodes import NODES as LAB_NODES

    product = asyncio.run(host.module("nodes").FineXtractExtension().get_node_list())
    product_ids = {node.GET_SCHEMA().node_id for node in product}
    listed = {name for name, info in object_info.items() if info["python_module"].startswith("custom_nodes.")}
    assert listed == product_ids
    assert not product_ids & {node.GET_SCHEMA().node_id for node in LAB_NODES}
    assert not any(info["category"].startswith("FineXtract/world") for info in object_info.values())


def test_committed_workflows_are_what_the_generator_writes(tmp_path):
    """The generator run as users run it (its own server, a plain process) writes these very files, byte for byte."""
    done = subprocess.run([sys.executable, "-m", "tools.workflows.make_workflows", "--out", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert names_in(str(tmp_path)) == WORKFLOW_NAMES, "workflows/ and make_workflows.py list other workflows"
    for name in WORKFLOW_NAMES:
        generated = (tmp_path / f"{name}.json").read_bytes()
        with open(os.path.join(WORKFLOWS_DIR, f"{name}.json"), "rb") as f:
            assert f.read() == generated, f"workflows/{name}.json is not what make_workflows.py writes: run it"


def test_templates_use_the_bank_in_batches_that_fit_a_consumer_gpu(object_info):
    for name in WORKFLOW_NAMES:
        workflow = load_workflow(name)
        nodes = ui_to_api(workflow, object_info).values()
        types = [node["class_type"] for node in nodes]
        if name.endswith("_one_batch"):
            assert "FineXtractCandidateBank" not in types and "FineXtractModelGuidanceSampler" in types
            continue
        banks = [node["inputs"] for node in nodes if node["class_type"] == "FineXtractCandidateBank"]
        assert banks and "FineXtractModelGuidanceSampler" not in types, f"{name} does not sample through the bank"
        batch, fits = BANK_BATCHES.get(name, (8, "fits a 12 GB GPU"))
        for bank in banks:
            assert (bank["num_candidates"], bank["first_candidate"], bank["batch_size"]) == (500, 0, batch)
        assert len({bank["bank_folder"] for bank in banks}) == len(banks), "one bank folder per setting"
        assert any(fits in note["widgets_values"][0] for note in workflow["nodes"] if note["type"] == "Note")
    assert {"finextract_dreambooth_one_batch", "finextract_lora_one_batch"} <= set(WORKFLOW_NAMES)


@pytest.mark.parametrize("folder, name", [(WORKFLOWS_DIR, name) for name in WORKFLOW_NAMES] +
                         [(OLD_WORKFLOWS_DIR, name) for name in OLD_WORKFLOW_NAMES])
def test_node_types_exist_and_link_types_match(object_info, folder, name):
    workflow = load_workflow(name, folder)
    nodes = {node["id"]: node for node in workflow["nodes"]}
    for node in nodes.values():
        assert node["type"] in object_info or node["type"] in EDITOR_ONLY_TYPES, f"unknown node type {node['type']}"
    assert any(node["type"] == "Note" and "sscd_disc_large" in node["widgets_values"][0] for node in nodes.values()), \
        "each workflow names the SSCD file it needs in a note"
    for link_id, from_id, from_slot, to_id, to_slot, link_type in workflow["links"]:
        source, target = nodes[from_id], nodes[to_id]
        given = object_info[source["type"]]["output"][from_slot]
        target_input = target["inputs"][to_slot]
        declared = dict(ordered_inputs(object_info[target["type"]]))[target_input["name"]]
        assert target_input["link"] == link_id and link_id in source["outputs"][from_slot]["links"]
        assert given == link_type == input_type(declared), (
            f"link {link_id}: {source['type']} gives {given}, {target['type']}.{target_input['name']} takes "
            f"{declared[0]}")
    ui_to_api(workflow, object_info)  # every widget value maps to a widget input
    deprecated = {node["type"] for node in nodes.values() if object_info.get(node["type"], {}).get("deprecated")}
    if folder == WORKFLOWS_DIR:
        assert not deprecated, f"a template uses deprecated nodes: {deprecated}"


def test_workflows_are_served_as_the_packs_templates(server):
    listed = server.get("/api/workflow_templates")
    assert sorted(listed.get(PACK_FOLDER, [])) == WORKFLOW_NAMES
    for name in WORKFLOW_NAMES:
        assert server.get(f"/api/workflow_templates/{PACK_FOLDER}/{name}.json") == load_workflow(name)


def small_prompt(server, object_info, name: str, folder: str = WORKFLOWS_DIR) -> dict:
    """The workflow in API form on the stand-in models, small enough to run in seconds on a CPU."""
    prompt = stand_in_prompt(name, object_info, folder=folder, **SMALL_RUN)
    for node in prompt.values():
        if node["class_type"] in ("FineXtractCliqueClusterV2", "FineXtractCliqueCluster"):
            node["inputs"]["min_clique_size"] = 1  # 6 candidates of a random model need not form two pairs
        if node["class_type"] == "FineXtractCaptionInverter":
            node["inputs"].update(iterations=3, restarts=1)
    if name == "finextract_audit_my_images":
        prompt = replace_inputs(prompt, {"My reference images": {
            "folder": os.path.join(server.base, "input", "references"), "size": 64}})
    return prompt


def run_small(server, object_info, name: str, folder: str = WORKFLOWS_DIR) -> tuple[dict, list[str]]:
    prompt = small_prompt(server, object_info, name, folder)
    entry = server.run(prompt, timeout=300)
    assert execution_error(entry) is None, execution_error(entry)
    return entry, report_folders(prompt, os.path.join(server.base, "output"))


def read_report(folder: str) -> dict:
    with open(os.path.join(folder, "report.json")) as f:
        return json.load(f)


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def check_report(server, entry: dict, name: str, folders: list[str]) -> dict:
    """What every run's report holds; returns the last report."""
    models = os.path.join(server.base, "models")
    for folder in folders:
        report = read_report(folder)
        assert sorted(os.listdir(folder)) == REPORT_FILES
        assert report["clustering"]["n_candidates"] == SMALL_RUN["candidates"]
        assert report["sampling"]["steps"] == SMALL_RUN["steps"] and report["embedder"]["model_id"] == "stand_in_sscd"
        for model in report["models"]:
            assert model["sha256"] == sha256(os.path.join(models, model["folder"], model["file"]))
        roles = sorted(model["role"] for model in report["models"])
        assert roles == (["lora", "pretrained"] if "LoRA" in report["sampling"]["fine_tune"] else
                         ["fine_tuned", "pretrained"])
        html = open(os.path.join(folder, "report.html"), encoding="utf-8").read()
        assert "not a proof" in html and "<script" not in html
    if name == "finextract_audit_my_images":
        assert len(report["references"]) == 3 and report["metrics"]["AS"] is not None
        assert {row["name"] for row in report["references"]} == {"checks.png", "gradient.png", "stripes.png"}
    if name == "finextract_sdxl_derivative_lora":  # Model Evidence ran on the base and shows its base check
        (shown,) = [output["text"][0] for output in entry["outputs"].values() if "text" in output
                    and "base fit:" in output["text"][0]]
        assert "base check:" in shown and report["base_check"] is not None
    if name == "finextract_recover_caption":  # the inverter ran and shows its caption, ranked captions and tokens
        (shown,) = [output["text"][0] for output in entry["outputs"].values() if "text" in output
                    and "single tokens:" in output["text"][0]]
        assert shown.split("\n")[0].strip(), "the inverter gave an empty caption"
    report_ui = [output for output in entry["outputs"].values() if "finextract_report" in output]
    assert len(report_ui) == len(folders) and all(output["images"] for output in report_ui)
    return report


@pytest.mark.parametrize("name", SERVER_RUN_NAMES)
def test_workflow_runs_and_writes_the_audit_report(server, object_info, name):
    entry, folders = run_small(server, object_info, name)
    report = check_report(server, entry, name, folders)
    bank = not name.endswith("_one_batch")
    assert report["sampling"]["noise"] == ("per-candidate-noise-v2" if bank else "ksampler-batch")


def test_bank_path_records_the_samplers_run_settings(server, object_info):
    """The same DreamBooth attack through the Candidate Bank and through one batch: the reports' run settings are the
    same fields with the same values, but for how each candidate's noise follows from the seed."""
    _, (bank_folder,) = run_small(server, object_info, "finextract_dreambooth")
    _, (batch_folder,) = run_small(server, object_info, "finextract_dreambooth_one_batch")
    bank, batch = read_report(bank_folder), read_report(batch_folder)
    assert bank["sampling"].keys() == batch["sampling"].keys()
    assert {key for key in bank["sampling"] if bank["sampling"][key] != batch["sampling"][key]} == {"noise"}
    assert bank["sampling"]["candidates"] == SMALL_RUN["candidates"] and bank["sampling"]["mode"] == "finextract"
    assert bank["models"] == batch["models"] and bank["embedder"] == batch["embedder"]
    assert bank["clustering"]["n_candidates"] == batch["clustering"]["n_candidates"]


@pytest.mark.parametrize("name", OLD_WORKFLOW_NAMES)
def test_workflows_saved_before_the_typed_handoffs_still_run(server, object_info, name):
    entry, folders = run_small(server, object_info, name, OLD_WORKFLOWS_DIR)
    check_report(server, entry, name, folders)
    if name in ("finextract_dreambooth", "finextract_lora"):  # today's template of the same graph: the same report
        # ...with the clustering method the old file saved (the default has since become ranked_cliques).
        (saved,) = [node["inputs"]["method"] for node in small_prompt(server, object_info, name, OLD_WORKFLOWS_DIR)
                    .values() if node["class_type"] == "FineXtractCliqueCluster"]
        prompt = small_prompt(server, object_info, f"{name}_one_batch")
        for node in prompt.values():
            if node["class_type"] == "FineXtractCliqueClusterV2":
                node["inputs"]["method"] = saved
        entry = server.run(prompt, timeout=300)
        assert execution_error(entry) is None, execution_error(entry)
        (today,) = report_folders(prompt, os.path.join(server.base, "output"))
        (old,) = folders
        for file in REPORT_FILES:
            with open(os.path.join(old, file), "rb") as a, open(os.path.join(today, file), "rb") as b:
                assert a.read() == b.read(), f"{file} differs between the old {name} and {name}_one_batch"


def combo_options(spec: list) -> list:
    return spec[0] if isinstance(spec[0], list) else spec[1]["options"]


def test_report_lists_the_loaders_files_and_refuses_any_other_name(server, object_info):
    loader = lambda node, name: combo_options(object_info[node]["input"]["required"][name])  # noqa: E731
    models = loader("CheckpointLoaderSimple", "ckpt_name") + loader("UNETLoader", "unet_name")
    assert "dreambooth.safetensors" in models and "style.safetensors" in loader("LoraLoaderModelOnly", "lora_name")
    for report_node in ("FineXtractAuditReportV2", "FineXtractAuditReport"):
        report = object_info[report_node]["input"]["required"]
        assert combo_options(report["pretrained_file"]) == ["(none)", *dict.fromkeys(models)]
        assert combo_options(report["fine_tuned_file"]) == ["(none)", *dict.fromkeys(models)]
        assert combo_options(report["lora_file"]) == ["(none)", *loader("LoraLoaderModelOnly", "lora_name")]
    mistyped = {"Audit report: FineXtract": {"pretrained_file": "base.safetensor"}}
    message = "pretrained_file 'base.safetensor' is not in models/{checkpoints,diffusion_models}: pick the file its " \
              "loader shows"
    # Refused before anything runs (ComfyUI itself does not check V3 combo values), with what to do.
    with pytest.raises(RuntimeError, match="400.*" + re.escape(message)):
        server.queue(replace_inputs(small_prompt(server, object_info, "finextract_dreambooth_one_batch"), mistyped))
    # With the bank, an output node itself, ComfyUI runs the bank (its batches are kept for the next run) and names
    # the report's error in its answer, as for any graph with several outputs.
    answer = server.post("/prompt", {"prompt": replace_inputs(small_prompt(server, object_info,
                                                                           "finextract_dreambooth"), mistyped),
                                     "client_id": server.client_id})
    (report_errors,) = [errors for errors in answer["node_errors"].values()
                        if errors["class_type"] == "FineXtractAuditReportV2"]
    assert message in json.dumps(report_errors)
    entry = server.wait(answer["prompt_id"], timeout=300)
    assert not [output for output in entry["outputs"].values() if "finextract_report" in output]


def test_second_run_writes_identical_report(server, object_info):
    """The bank-path audit twice from nothing (bank and report deleted, a fresh server): the same bytes."""
    name = "finextract_audit_my_images"
    _, (folder,) = run_small(server, object_info, name)
    first = {file: open(os.path.join(folder, file), "rb").read() for file in sorted(os.listdir(folder))}
    shutil.rmtree(folder)
    shutil.rmtree(os.path.join(server.base, "output", "finextract", "lora_audit_bank"))
    # A second server on the same files: nothing can come from a cache, every node runs again. (Clearing the first
    # server's cache with /free races with the next prompt in ComfyUI's worker.)
    with ComfyServer(server.base, log_path=os.path.join(server.base, "comfyui-second-run.log")) as fresh:
        entry, _ = run_small(fresh, object_info, name)
    cached = [data["nodes"] for kind, data in entry["status"]["messages"] if kind == "execution_cached"]
    assert cached == [[]], f"nodes were taken from the cache, not run again: {cached}"
    second = {file: open(os.path.join(folder, file), "rb").read() for file in sorted(os.listdir(folder))}
    assert second.keys() == first.keys()
    for file in first:
        assert second[file] == first[file], f"{file} differs between two runs of the same workflow"
