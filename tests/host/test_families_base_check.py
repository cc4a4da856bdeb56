"""SDXL derivatives: two SDXL-architecture bases (ComfyUI's SDXL class, small UNets, different weights, as SDXL base and
Pony are) pass the family check alike, so a LoRA trained on one passes silently on the other. The LoRA's metadata
(kohya's ss_new_sd_model_hash, the SHA-256 of the base file it was trained on, and ss_sd_model_name) names its base:
the Model Evidence node (base MODEL connected) and the Audit Report (base and LoRA files picked) warn when the base
connected is not that one, and say nothing alarming when it is.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fixtures import tiny_models

TRAINED_ON, OTHER = "pony_style_base.safetensors", "illustrious_style_base.safetensors"
LORA = "derivative_lora.safetensors"


def sha256_of(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def setup(host, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl-derivatives")
    for sub in ("checkpoints", "loras"):
        (folder / sub).mkdir()
        host.folder_paths.add_model_folder_path(sub, str(folder / sub))
    bases = {}
    for name, seed in ((TRAINED_ON, 31), (OTHER, 32)):
        patcher, weights = tiny_models.sdxl_patcher(seed=seed)
        path = str(folder / "checkpoints" / name)
        save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in weights.items()}, path)
        bases[name] = (patcher, weights, sha256_of(path))
    trained_on = bases[TRAINED_ON]
    # What kohya's train_network.py records about its base (every value a string).
    metadata = {"ss_network_module": "networks.lora", "ss_base_model_version": "sdxl_base_v1-0",
                "ss_sd_model_name": TRAINED_ON, "ss_new_sd_model_hash": trained_on[2],
                "ss_tag_frequency": json.dumps({"10_sks style": {"sks style": 10}})}
    save_file(tiny_models.attention_lora(trained_on[1], seed=33), str(folder / "loras" / LORA), metadata=metadata)
    return {"nodes": host.nodes.NODE_CLASS_MAPPINGS, "bases": bases}


def evidence_with_base(setup, base: str) -> tuple[str, dict]:
    outputs = setup["nodes"]["FineXtractModelEvidence"].execute(LORA, "(none)", base_model=setup["bases"][base][0])
    return outputs.ui["text"][0], json.loads(outputs.args[3])


def test_the_family_check_cannot_tell_the_two_bases_apart(host, setup):
    guider = host.module("nodes.guider")
    trained_on, other = setup["bases"][TRAINED_ON][0], setup["bases"][OTHER][0]
    guider.check_same_family(trained_on, other)  # no error: same classes, config and shapes
    assert not torch.equal(trained_on.model.diffusion_model.input_blocks[0][0].weight,
                           other.model.diffusion_model.input_blocks[0][0].weight)


def test_model_evidence_warns_when_the_base_model_is_not_the_one_the_lora_names(setup):
    text, record = evidence_with_base(setup, OTHER)
    check = record["base_check"]
    assert check["verdict"] == "different" and check["by"] == "weights"
    assert f"WARNING: the base MODEL is not {TRAINED_ON}" in text and "load " + TRAINED_ON in text
    # Every layer compared differs: two trainings of one architecture, not a dtype's rounding.
    assert "32 of 32 layers compared differ" in check["message"]
    # The key fit alone would not have caught it: every LoRA key finds its layer on the other base.
    assert record["base_fit"]["not_loaded_count"] == 0 and record["base_fit"]["keys_loaded"] > 0


def test_model_evidence_confirms_the_base_the_lora_names(setup):
    text, record = evidence_with_base(setup, TRAINED_ON)
    check = record["base_check"]
    assert check["verdict"] == "same" and check["connected"] == TRAINED_ON
    assert check["connected_sha256"] == setup["bases"][TRAINED_ON][2] and "WARNING" not in text
    assert "found by sha256" in check["message"]


def write_report(host, setup, pretrained_file: str, prefix: str) -> tuple[dict, str, str]:
    """The Audit Report node's own path (file lookup, hashing, the base check, the report) on hand-made results."""
    clustering, embeddings = host.module("finextract_core.clustering"), host.module("finextract_core.embeddings")
    settings = host.module("finextract_core.run_settings").RunSettings(
        mode="finextract", guidance_scale=5.0, k=0.0, seed=0, steps=2, sampler="ddim", scheduler="ddim_uniform",
        denoise=1.0, latent_shape=(4, 8, 8), candidates=2, first_candidate=0, noise="per-candidate-noise-v2",
        model_family="SDXL (SDXL, latent SDXL)", fine_tune="base + LoRA (shared weights)", pack_version="test")
    clusters = clustering.ClusterResult(
        method="ranked_cliques", n_candidates=2, n_clusters=1, min_clique_size=1, threshold=0.5, background=0.1,
        ranked_by="memorisation score", centres=(0,), members=((0, 1),), sizes=(2,), mean_similarities=(0.9,),
        scores=(0.5,), tightness=(0.9,), separation=(0.5,), notes=())
    extracted = torch.full((1, 8, 8, 3), 0.5)
    out = host.module("nodes.report").write_audit_report(
        extracted, settings, clusters, embeddings.Embeddings(np.eye(1), "sscd_test", "paper"), prefix,
        pretrained_file, "(none)", LORA)
    path = out.args[0]
    with open(os.path.join(os.path.dirname(path), "report.json")) as f:
        report = json.load(f)
    with open(path, encoding="utf-8") as f:
        return report, f.read(), out.ui["text"][0]


def test_the_report_warns_when_the_pretrained_file_is_not_the_loras_base(host, setup):
    report, html, text = write_report(host, setup, OTHER, "finextract/test_base_check_other")
    check = report["base_check"]
    assert check["verdict"] == "different" and check["by"] == "sha256"
    assert check["recorded_sha256"] == setup["bases"][TRAINED_ON][2]
    assert check["connected_sha256"] == setup["bases"][OTHER][2] == report["models"][0]["sha256"]
    assert f"records its base as '{TRAINED_ON}'" in check["message"] and "WARNING" in text
    assert "<b>Base model.</b> WARNING" in html


def test_the_report_records_a_matching_base_without_a_warning(host, setup):
    report, html, text = write_report(host, setup, TRAINED_ON, "finextract/test_base_check_same")
    assert report["base_check"]["verdict"] == "same" and report["base_check"]["by"] == "sha256"
    assert "WARNING" not in text and "<b>Base model.</b>" not in html and "Base check (same)" in html
