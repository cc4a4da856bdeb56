"""Model Evidence (FineXtract) on the real host: the file's leads as outputs, the base matched among ComfyUI's
checkpoints by SHA-256, and the base fit counted by ComfyUI's own key maps, checked against a LoRA built to match
the stand-in base in part (the counts are known by construction) and against what ComfyUI's own LoraLoader logs as
'lora key not loaded'."""

from __future__ import annotations

import hashlib
import json
import logging
import os

import pytest
import torch
from safetensors.torch import save_file

from fixtures import tiny_models
from fixtures import trainer_files as tf
from fixtures.stand_in_models import write_stand_in_models
from tools.host.comfy_server import ComfyServer, execution_error

PARTIAL = "evidence_partial.safetensors"
PEFT = "evidence_peft.safetensors"
TRUNCATED = "evidence_truncated.safetensors"
SUBJECT = tf.Subset("10_zwx cat", 10, ("zwx cat, sitting", "zwx cat, sleeping", "zwx cat, on a chair"))


def _layer(name: str, width_in: int, width_out: int, seed: int) -> dict[str, torch.Tensor]:
    return tf.lora_tensors({name: (width_in, width_out)}, 4, "kohya", seed)


def write_evidence_loras(models: str, caption_subset: tf.Subset = SUBJECT) -> dict:
    """Next to the stand-in models, in models/loras: a kohya LoRA that fits the stand-in base in part (every attention
    projection of its UNet and one CLIP-L layer, which a layer of the base takes; one SDXL-only UNet layer and one
    layer of SDXL's second text encoder, which none does), a diffusers PEFT LoRA on two of the same layers, and a
    truncated copy. Returns the partial LoRA's keys by part and the base's SHA-256."""
    write_stand_in_models(models)
    with open(os.path.join(models, "checkpoints", "base.safetensors"), "rb") as f:
        data = f.read()
    base_sha256, base_legacy = hashlib.sha256(data).hexdigest(), hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    parts = {
        "unet": tiny_models.attention_lora(tiny_models.sd15_unet(seed=1), seed=11),  # the base's own UNet layers
        "text_encoder": _layer("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 768, 768, 12),
        "foreign_unet": _layer("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 2048, 640, 13),
        "foreign_text_encoder": _layer("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 1280, 1280, 14),
    }
    metadata = tf.kohya_metadata("sd1", [caption_subset], base_name="v1-5-pruned-emaonly.safetensors",
                                 base_sha256=base_sha256, base_legacy=base_legacy, clip_skip=1)
    tensors = {k: v.contiguous() for part in parts.values() for k, v in part.items()}
    save_file(tensors, os.path.join(models, "loras", PARTIAL), metadata={**metadata, "sshs_model_hash": "0" * 64})
    peft_layers = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (768, 320),
                   "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (320, 320)}
    save_file(tf.lora_tensors(peft_layers, 4, "peft", 15), os.path.join(models, "loras", PEFT),
              metadata={"format": "pt", "lora_adapter_metadata": tf.peft_adapter_metadata("unet", 4, 4)})
    with open(os.path.join(models, "loras", PARTIAL), "rb") as f:
        content = f.read()
    with open(os.path.join(models, "loras", TRUNCATED), "wb") as f:
        f.write(content[: len(content) - 1000])
    return {"parts": {k: sorted(v) for k, v in parts.items()}, "base_sha256": base_sha256}


@pytest.fixture(scope="module")
def world(host, tmp_path_factory):
    models = str(tmp_path_factory.mktemp("evidence") / "models")
    written = write_evidence_loras(models)
    for sub in ("checkpoints", "loras", "diffusion_models"):
        host.folder_paths.add_model_folder_path(sub, os.path.join(models, sub))
    nodes = host.nodes.NODE_CLASS_MAPPINGS
    model, clip = nodes["CheckpointLoaderSimple"]().load_checkpoint("base.safetensors")[:2]
    return {"nodes": nodes, "model": model, "clip": clip, "host": host, **written}


@pytest.fixture(autouse=True)
def hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FINEXTRACT_HASH_CACHE", str(tmp_path / "hashes.jsonl"))


def evidence_node(world, lora_file="(none)", model_file="(none)", **bases):
    return world["nodes"]["FineXtractModelEvidence"].execute(lora_file, model_file, **bases)


def logged_not_loaded(caplog, load) -> set[str]:
    """The keys ComfyUI's own loader reports as 'lora key not loaded' while ``load`` runs."""
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load()
    prefix = "lora key not loaded: "
    return {r.getMessage()[len(prefix):] for r in caplog.records if r.getMessage().startswith(prefix)}


def test_outputs_carry_the_files_caption_n0_and_base(world):
    output = evidence_node(world, lora_file=PARTIAL)
    caption, n0, base_name, evidence_json, evidence = output.args
    assert caption == "zwx cat" and n0 == 3
    # The base recorded as v1-5-pruned-emaonly.safetensors is the user's base.safetensors by its SHA-256
    assert base_name == "base.safetensors"
    report = json.loads(evidence_json)
    assert report["base"]["local_matches"][0] == {"name": "base.safetensors", "by": ["sha256"],
                                                  "sha256": world["base_sha256"], "family": "sd1"}
    assert report["family"]["value"] == "sd1" and report["sampling"]["clip_skip"]["value"] == 1
    assert report["base_fit"] is None
    # The zero sshs_model_hash this file carries does not match its tensors
    assert any(p["source"] == "sshs_model_hash" for p in report["problems"])
    evidence_type = world["host"].module("finextract_core.evidence").Evidence
    assert isinstance(evidence, evidence_type) and evidence.to_json() == evidence_json
    assert "caption: 'zwx cat'" in output.ui["text"][0]


def test_base_fit_counts_the_keys_a_layer_of_the_base_takes(world, caplog):
    parts = world["parts"]
    model, clip = world["model"], world["clip"]
    unet_layers = len(parts["unet"]) // 3  # down, up and alpha per layer
    assert unet_layers == 3 * 8  # q, k, v, out of attn1 and attn2 in each of the stand-in's 3 transformer blocks

    fit = json.loads(evidence_node(world, lora_file=PARTIAL, base_model=model).args[3])["base_fit"]
    assert (fit["keys"], fit["keys_loaded"], fit["layers_patched"]) == (sum(map(len, parts.values())),
                                                                          len(parts["unet"]), unet_layers)
    assert fit["not_loaded_examples"] == parts["foreign_unet"]
    assert fit["unchecked_count"] == len(parts["text_encoder"]) + len(parts["foreign_text_encoder"])
    assert fit["keys_checked"] == len(parts["unet"]) + len(parts["foreign_unet"])
    assert fit["share_loaded"] == pytest.approx(len(parts["unet"]) / fit["keys_checked"])
    assert fit["base_family"] == "sd1" and fit["base"].startswith("SD15")
    # ComfyUI's own loader on the same file and model: the keys it logs as not loaded are exactly the rest
    logged = logged_not_loaded(caplog, lambda: world["nodes"]["LoraLoaderModelOnly"]().load_lora_model_only(
        model, PARTIAL, 1.0))
    assert logged == set(parts["foreign_unet"] + parts["text_encoder"] + parts["foreign_text_encoder"])

    output = evidence_node(world, lora_file=PARTIAL, base_model=model, base_clip=clip)
    fit = json.loads(output.args[3])["base_fit"]
    assert fit["keys_loaded"] == len(parts["unet"]) + len(parts["text_encoder"])
    assert fit["layers_patched"] == unet_layers + 1 and fit["unchecked_count"] == 0
    assert fit["not_loaded_examples"] == sorted(parts["foreign_text_encoder"] + parts["foreign_unet"])
    logged = logged_not_loaded(caplog, lambda: world["nodes"]["LoraLoader"]().load_lora(model, clip, PARTIAL, 1.0,
                                                                                          1.0))
    assert logged == set(fit["not_loaded_examples"])
    assert f"base fit: {fit['keys_loaded']} of {fit['keys']} LoRA keys loaded" in output.ui["text"][0]
    assert "WARNING: 6 keys match no layer of this base" in output.ui["text"][0]


def test_a_peft_lora_is_counted_as_comfyui_loads_it(world, caplog):
    """Whatever this ComfyUI makes of diffusers' PEFT names, the node's count is what its loader does."""
    output = evidence_node(world, lora_file=PEFT, base_model=world["model"])
    fit = json.loads(output.args[3])["base_fit"]
    logged = logged_not_loaded(caplog, lambda: world["nodes"]["LoraLoaderModelOnly"]().load_lora_model_only(
        world["model"], PEFT, 1.0))
    assert set(fit["not_loaded_examples"]) == logged and fit["not_loaded_count"] == len(logged)
    assert fit["keys_loaded"] == fit["keys"] - len(logged)
    report = json.loads(output.args[3])
    assert report["family"]["value"] == "sd1" and report["caption"]["value"] is None
    assert output.args[:3] == ("", 10, "")  # no caption, the default N0, no base recorded


def test_family_mismatch_with_the_base_model_is_shown(world):
    sdxl, _ = tiny_models.sdxl_patcher(seed=3)
    text = evidence_node(world, lora_file=PARTIAL, base_model=sdxl).ui["text"][0]
    assert "WARNING: the file is SD 1.x, the base MODEL is SDXL" in text


def test_a_checkpoint_file_and_bad_choices_get_clear_messages(world):
    caption, n0, base_name, evidence_json, _ = evidence_node(world, model_file="base.safetensors").args
    report = json.loads(evidence_json)
    assert (report["kind"]["value"], report["family"]["value"]) == ("checkpoint", "sd1")
    assert (caption, n0) == ("", 10)
    with pytest.raises(ValueError, match="is a checkpoint, not a LoRA: the base fit counts a LoRA's keys"):
        evidence_node(world, model_file="base.safetensors", base_model=world["model"])
    with pytest.raises(ValueError, match="pick one file"):
        evidence_node(world)
    with pytest.raises(ValueError, match="pick one file"):
        evidence_node(world, lora_file=PARTIAL, model_file="base.safetensors")
    node = world["nodes"]["FineXtractModelEvidence"]
    assert "is not in models/{loras}" in node.validate_inputs("missing.safetensors", "(none)")
    assert node.validate_inputs(PARTIAL, "(none)") is True
    # A truncated LoRA: its metadata is read, but it cannot be fitted to a base
    report = json.loads(evidence_node(world, lora_file=TRUNCATED).args[3])
    assert report["file"]["complete"] is False
    with pytest.raises(ValueError, match="truncated, so ComfyUI cannot load it"):
        evidence_node(world, lora_file=TRUNCATED, base_model=world["model"])


# ----------------------------------------------------------------------------------------------- on a real server
@pytest.fixture(scope="module")
def server(host, tmp_path_factory):  # host: tiny_models builds shapes with ComfyUI's own modules
    base = str(tmp_path_factory.mktemp("evidence-server"))
    written = write_evidence_loras(f"{base}/models")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FINEXTRACT_HASH_CACHE", f"{base}/hashes.jsonl")
        with ComfyServer(base, lab=False) as running:
            yield running, written


def evidence_prompt(lora_file: str) -> dict:
    return {"base": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "base.safetensors"}},
            "evidence": {"class_type": "FineXtractModelEvidence", "inputs": {
                "lora_file": lora_file, "model_file": "(none)", "base_model": ["base", 0], "base_clip": ["base", 1]}}}


def test_the_node_runs_in_a_prompt_and_again_when_its_file_changes(server):
    running, written = server
    info = running.get("/object_info/FineXtractModelEvidence")["FineXtractModelEvidence"]
    assert info["category"] == "FineXtract/evidence" and info["output_node"] is True
    assert info["output"] == ["STRING", "INT", "STRING", "STRING", "FINEXTRACT_EVIDENCE"]
    entry = running.run(evidence_prompt(PARTIAL))
    assert execution_error(entry) is None, execution_error(entry)
    text = entry["outputs"]["evidence"]["text"][0]
    keys = sum(map(len, written["parts"].values()))
    loaded = len(written["parts"]["unet"]) + len(written["parts"]["text_encoder"])
    assert "caption: 'zwx cat'" in text and f"base fit: {loaded} of {keys} LoRA keys loaded" in text
    # The same file name with new contents: the node runs again instead of answering from ComfyUI's cache
    write_evidence_loras(os.path.join(running.base, "models"), tf.Subset("4_qqx bird", 4, ("qqx bird",) * 5))
    path = os.path.join(running.base, "models", "loras", PARTIAL)
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    entry = running.run(evidence_prompt(PARTIAL))
    assert "caption: 'qqx bird'" in entry["outputs"]["evidence"]["text"][0]
    # A name no loader lists is refused before anything runs, with what to do
    with pytest.raises(RuntimeError, match=r"lora_file 'missing.safetensors' is not in models/\{loras\}"):
        running.queue(evidence_prompt("missing.safetensors"))
