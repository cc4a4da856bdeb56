"""The evidence reader on files laid out as each trainer writes them, checked against the values written.

Each file is built by fixtures/trainer_files.py from stated training settings (the folders, captions, base file,
clip skip); each test checks the reader's values against those settings, not against the reader's own output.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from finextract_core.evidence import DEFAULT_N0, read_evidence
from finextract_core.evidence_header import EvidenceError, read_header
from finextract_core.hashing import FileHashes
from fixtures import trainer_files as tf

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A DreamBooth subject: 12 photos captioned "<instance prompt>, <what varies>" in kohya's "<repeats>_<tokens>" folder,
# and 30 regularisation images of the class.
SUBJECT = tf.Subset("10_sks dog", 10, tuple(f"a photo of sks dog, {place}" for place in
                                           ["on grass", "on a sofa", "at the beach", "in snow"] * 3))
SECOND = tf.Subset("5_sks dog running", 5, ("a photo of sks dog running, park",) * 4)
REGULARISATION = tf.Subset("1_dog", 1, ("a photo of a dog",) * 30)


@pytest.fixture
def base_file(tmp_path):
    """The base checkpoint the LoRAs record: an SD 1.x-shaped checkpoint a little over 1 MiB (the legacy hash reads
    64 KiB at 1 MiB)."""
    folder = tmp_path / "bases"
    folder.mkdir()
    path = tf.write(folder / "v1-5-pruned-emaonly.safetensors", tf.checkpoint_tensors(tf.SD1_CHECKPOINT_SHAPES, 7),
                    None)
    with open(path, "rb") as f:
        data = f.read()
    return path, hashlib.sha256(data).hexdigest(), hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def kohya_lora(tmp_path, base_file, **settings):
    path, sha256, legacy = base_file
    metadata = tf.kohya_metadata("sd1", [SUBJECT, SECOND], [REGULARISATION], base_name=os.path.basename(path),
                                 base_sha256=sha256, base_legacy=legacy, **settings)
    return tf.write_kohya_lora(tmp_path / "subject.safetensors", "sd1", metadata), metadata


def test_kohya_lora_gives_caption_n0_base_and_settings_with_their_keys(tmp_path, base_file):
    path, _ = kohya_lora(tmp_path, base_file, clip_skip=2)
    evidence = read_evidence(path, hashes=FileHashes(None))
    report = evidence.to_dict()
    assert [lead["value"] for lead in report["trainers"]] == ["kohya-ss/sd-scripts"]
    assert report["kind"]["value"] == "lora"
    assert (report["family"]["value"], report["family"]["source"]) == ("sd1", "tensors")
    assert {(lead["source"], lead["value"]) for lead in report["family"]["leads"]} == {
        ("ss_base_model_version", "sd1"), ("modelspec.architecture", "sd1"), ("tensors", "sd1")}
    # N0: 12 + 4 images in the two training folders; not ss_num_train_images (12*10 + 4*5 = 140), not the 30 reg images
    assert (report["n0"]["value"], report["n0"]["source"]) == (16, "ss_dataset_dirs")
    assert report["n0"]["subsets"] == {"10_sks dog": 12, "5_sks dog running": 4}
    # The caption: the tags every photo of the largest subset shares, agreeing with its folder name's class tokens
    assert report["caption"]["value"] == "a photo of sks dog"
    assert report["caption"]["sources"] == ["ss_tag_frequency"]
    texts = [c["value"] for c in report["caption"]["candidates"]]
    assert texts[:2] == ["a photo of sks dog", "a photo of sks dog running, park"]  # both tags in all 4 captions
    assert "sks dog" in texts and "dog" not in texts and "a photo of a dog" not in texts  # the reg folder is no caption
    base_path, sha256, legacy = base_file
    assert report["base"]["name"] == {"value": "v1-5-pruned-emaonly.safetensors", "source": "ss_sd_model_name"}
    assert (report["base"]["sha256"]["value"], report["base"]["sha256"]["source"]) == (sha256, "ss_new_sd_model_hash")
    assert report["base"]["legacy_hash"]["value"] == legacy
    sampling = report["sampling"]
    assert (sampling["resolution"]["value"], sampling["resolution"]["source"]) == ([512, 512], "ss_resolution")
    assert sampling["resolution"]["raw"] == "(512, 512)"
    assert (sampling["clip_skip"]["value"], sampling["clip_skip"]["source"]) == (2, "ss_clip_skip")
    assert (sampling["prediction_type"]["value"], sampling["prediction_type"]["source"]) == (
        "epsilon", "modelspec.prediction_type")
    assert report["network"]["dim"]["value"] == 4 and report["network"]["rank_in_tensors"] == 4
    assert report["network"]["layers"] == len(tf.SD1_KOHYA_LAYERS) and report["network"]["text_encoder_layers"] == 1
    assert report["integrity"]["sshs_model_hash"]["value"] is True
    with open(path, "rb") as f:
        assert report["file"]["sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert report["problems"] == []
    assert "lead, never proof" in report["trust"]


def test_kohya_without_clip_skip_reads_none_as_unset_and_the_subset_caption_follows_the_captions_order(
        tmp_path, base_file):
    path, metadata = kohya_lora(tmp_path, base_file, clip_skip=None)
    assert metadata["ss_clip_skip"] == "None"  # kohya writes str(None)
    evidence = read_evidence(path)
    assert evidence.clip_skip is None and evidence.sha256 is None  # no hashes asked for: header only
    assert evidence.sshs_model_hash.value is None and "not checked" in evidence.sshs_model_hash.note


def test_kohya_no_metadata_lora_falls_back_to_tensors_caption_inverter_and_default_n0(tmp_path, base_file):
    path, metadata = kohya_lora(tmp_path, base_file, no_metadata=True)
    assert "ss_tag_frequency" not in metadata and "ss_dataset_dirs" not in metadata
    report = read_evidence(path).to_dict()
    assert report["family"]["value"] == "sd1"
    assert report["caption"]["value"] is None and "Caption Inverter" in report["caption"]["fallback"]
    assert (report["n0"]["value"], report["n0"]["source"]) == (DEFAULT_N0, "default")
    assert "guess" in report["n0"]["note"]
    assert report["base"]["name"] is None and report["base"]["sha256"] is None
    assert report["network"]["dim"]["value"] == 4  # the minimum keys kohya keeps
    assert report["problems"] == []


def test_kohya_sdxl_lora_and_trigger_phrase(tmp_path):
    metadata = tf.kohya_metadata("sdxl", [tf.Subset("20_ohwx woman", 20, ("ohwx woman",) * 8)],
                                 base_name="stabilityai/stable-diffusion-xl-base-1.0", resolution=(1024, 1024),
                                 trigger_phrase="ohwx")
    path = tf.write_kohya_lora(tmp_path / "sdxl.safetensors", "sdxl", metadata)
    evidence = read_evidence(path)
    assert evidence.family.value == "sdxl" and "2048" in evidence.family.note
    assert evidence.caption.text == "ohwx woman"
    assert set(evidence.caption.sources) == {"ss_tag_frequency", "ss_dataset_dirs (folder name)"}
    assert evidence.caption_candidates[-1].text == "ohwx" and evidence.caption_candidates[-1].sources == (
        "modelspec.trigger_phrase",)
    assert evidence.n0.value == 8
    assert evidence.base_name.note == "a Hugging Face model id or a diffusers folder"
    assert evidence.resolution.value == [1024, 1024]


def test_modelspec_alone_is_read(tmp_path):
    metadata = {"modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": "stable-diffusion-v2-768-v/lora",
                "modelspec.resolution": "768x768", "modelspec.encoder_layer": "1",
                "modelspec.trigger_phrase": "zkz style"}
    layers = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (1024, 320)}
    path = tf.write(tmp_path / "sd2v.safetensors", tf.lora_tensors(layers, 8, "kohya", 1), metadata)
    evidence = read_evidence(path)
    assert (evidence.family.value, evidence.family.source) == ("sd2", "tensors")
    assert [(lead.source, lead.value) for lead in evidence.family_leads] == [("modelspec.architecture", "sd2"),
                                                                               ("tensors", "sd2")]
    assert (evidence.prediction_type.value, evidence.prediction_type.source) == ("v", "modelspec.architecture")
    assert (evidence.resolution.value, evidence.resolution.source) == ([768, 768], "modelspec.resolution")
    assert (evidence.clip_skip.value, evidence.clip_skip.source) == (1, "modelspec.encoder_layer")
    assert (evidence.caption.text, evidence.caption.sources) == ("zkz style", ("modelspec.trigger_phrase",))
    assert evidence.n0_is_default and evidence.problems == ()


def test_ai_toolkit_vocabulary_and_trigger_word(tmp_path):
    path = tf.write(tmp_path / "ait.safetensors", tf.lora_tensors(tf.SD1_KOHYA_LAYERS, 16, "kohya", 2),
                    tf.ai_toolkit_metadata("p3r5on"))
    evidence = read_evidence(path)
    assert [lead.value for lead in evidence.trainers] == ["ai-toolkit"]
    assert [(lead.source, lead.raw, lead.value) for lead in evidence.family_leads] == [
        ("ss_base_model_version", "sd_1.5", "sd1"), ("tensors", None, "sd1")]
    # ai-toolkit's tag frequency holds its trigger word with a count of 1, not image counts: a trigger, no folder name
    assert [(c.text, c.priority) for c in evidence.caption_candidates] == [("p3r5on", 3)]
    assert evidence.n0_is_default and evidence.problems == ()


def test_ai_toolkit_sdxl_vocabulary(tmp_path):
    path = tf.write(tmp_path / "ait-xl.safetensors", tf.lora_tensors(tf.SDXL_KOHYA_LAYERS, 4, "kohya", 3),
                    tf.ai_toolkit_metadata("ohwx", "sdxl_1.0"))
    evidence = read_evidence(path)
    assert [lead.value for lead in evidence.family_leads] == ["sdxl", "sdxl"] and evidence.problems == ()


def test_simpletuner_trained_words_tag_frequency_and_modelspec(tmp_path):
    captions = ["ohwx man, portrait"] * 4 + ["ohwx man, outdoors"] * 3 + ["ohwx man, studio"] * 3
    metadata = tf.simpletuner_metadata(["ohwx man"], captions, "subject-photos")
    path = tf.write(tmp_path / "st.safetensors", tf.lora_tensors(tf.SDXL_PEFT_LAYERS, 16, "peft", 4), metadata)
    evidence = read_evidence(path)
    assert {lead.value for lead in evidence.trainers} == {"SimpleTuner", "diffusers (PEFT)"}
    assert evidence.kind.value == "lora" and "PEFT" in evidence.kind.note
    assert [(lead.source, lead.value) for lead in evidence.family_leads] == [("modelspec.architecture", "sdxl"),
                                                                               ("tensors", "sdxl")]
    assert evidence.caption.text == "ohwx man"
    assert set(evidence.caption.sources) == {"ss_tag_frequency", "trained_words"}
    assert evidence.resolution.value == [1024, 1024]
    assert evidence.network["dim"].value == 16 and evidence.network["dim"].source == "lora_adapter_metadata (unet.r)"
    assert evidence.n0_is_default and evidence.problems == ()


def test_diffusers_peft_file_without_caption_gets_family_from_tensors(tmp_path):
    metadata = {"format": "pt", "lora_adapter_metadata": tf.peft_adapter_metadata("unet", 4, 4)}
    path = tf.write(tmp_path / "pytorch_lora_weights.safetensors", tf.lora_tensors(tf.SD1_PEFT_LAYERS, 4, "peft", 5),
                    metadata)
    report = read_evidence(path).to_dict()
    assert [lead["value"] for lead in report["trainers"]] == ["diffusers (PEFT)"]
    assert report["family"]["value"] == "sd1" and report["family"]["leads"] == [report["family"]["leads"][0]]
    assert "768" in report["family"]["note"]
    assert report["caption"]["value"] is None and report["caption"]["fallback"]
    assert report["n0"]["source"] == "default"
    assert (report["network"]["dim"]["value"], report["network"]["alpha"]["value"]) == (4, 4)
    assert report["problems"] == []


def test_files_without_any_metadata_checkpoints_and_unets(tmp_path):
    bare = tf.write(tmp_path / "extracted.safetensors", tf.lora_tensors(tf.SDXL_KOHYA_LAYERS, 4, "kohya", 6), None)
    evidence = read_evidence(bare)
    assert (evidence.kind.value, evidence.family.value, evidence.trainers) == ("lora", "sdxl", ())
    assert evidence.caption is None and evidence.n0.value == DEFAULT_N0
    checkpoint = tf.write(tmp_path / "ckpt.safetensors", tf.checkpoint_tensors(tf.SD1_CHECKPOINT_SHAPES, 1), None)
    evidence = read_evidence(checkpoint)
    assert (evidence.kind.value, evidence.family.value) == ("checkpoint", "sd1")
    assert "text encoder" in evidence.kind.note and "VAE" in evidence.kind.note
    sdxl = tf.write(tmp_path / "xl.safetensors", tf.checkpoint_tensors(tf.SDXL_CHECKPOINT_SHAPES, 1), None)
    assert read_evidence(sdxl).family.value == "sdxl"
    unet_shapes = {k.removeprefix("model.diffusion_model."): v for k, v in tf.SD1_CHECKPOINT_SHAPES.items()
                   if k.startswith("model.diffusion_model.")}
    unet = tf.write(tmp_path / "unet.safetensors", tf.checkpoint_tensors(unet_shapes, 1), None)
    assert (read_evidence(unet).kind.value, read_evidence(unet).family.value) == ("unet", "sd1")
    flux = tf.write(tmp_path / "flux.safetensors", tf.lora_tensors(
        {"lora_unet_double_blocks_0_img_attn_qkv": (3072, 9216)}, 2, "kohya", 1), {"ss_base_model_version": "flux1"})
    evidence = read_evidence(flux)
    assert evidence.family.value == "flux" and evidence.problems == ()


def test_lying_metadata_is_reported_and_the_tensors_family_used(tmp_path, base_file):
    honest_path, honest = kohya_lora(tmp_path, base_file)
    lies = {**tf.kohya_metadata("sdxl", [SUBJECT], base_name="sd_xl_base_1.0.safetensors"),
            "ss_num_train_images": "9999"}
    lies["sshs_model_hash"] = read_header(honest_path).metadata["sshs_model_hash"]  # copied from another file
    liar = tf.write(tmp_path / "liar.safetensors", tf.lora_tensors(tf.SD1_KOHYA_LAYERS, 4, "kohya", 99), lies)
    evidence = read_evidence(liar, hashes=FileHashes(None))
    assert (evidence.family.value, evidence.family.source) == ("sd1", "tensors")
    problems = {p.source: p.message for p in evidence.problems}
    assert "claims SDXL (sdxl_base_v1-0) but the tensors show SD 1.x" in problems["ss_base_model_version"]
    assert "claims SDXL (stable-diffusion-xl-v1-base/lora)" in problems["modelspec.architecture"]
    assert "tensors are not the ones this metadata was written with" in problems["sshs_model_hash"]
    assert "is 9999, but ss_dataset_dirs gives 120" in problems["ss_num_train_images"]
    assert evidence.sshs_model_hash.value is False
    # The claims themselves are still shown, with their keys, as leads
    assert evidence.base_name.value == "sd_xl_base_1.0.safetensors" and evidence.n0.value == 12
    # a checkpoint that calls itself a LoRA
    fake_kind = tf.write(tmp_path / "kind.safetensors", tf.checkpoint_tensors(tf.SD1_CHECKPOINT_SHAPES, 3),
                         {"modelspec.architecture": "stable-diffusion-v1/lora"})
    assert any("says the file is a lora but its tensors are those of a checkpoint" in p.message
               for p in read_evidence(fake_kind).problems)


def test_malformed_json_values_are_reported_never_raised(tmp_path, base_file):
    _, metadata = kohya_lora(tmp_path, base_file)
    broken = {**metadata, "ss_tag_frequency": '{"10_sks dog": {"a photo of sks dog": 12', "ss_dataset_dirs": "[1, 2]",
              "ss_datasets": "not json", "ss_new_sd_model_hash": "abc", "ss_resolution": "big",
              "modelspec.prediction_type": "sideways", "lora_adapter_metadata": "{"}
    path = tf.write(tmp_path / "broken.safetensors", tf.lora_tensors(tf.SD1_KOHYA_LAYERS, 4, "kohya", 1), broken)
    evidence = read_evidence(path)
    problems = {p.source: p.message for p in evidence.problems}
    assert problems["ss_tag_frequency"].startswith("is not valid JSON")
    assert problems["ss_dataset_dirs"].startswith("holds a JSON list, not the dict")
    assert problems["ss_datasets"].startswith("is not valid JSON")
    assert problems["lora_adapter_metadata"].startswith("is not valid JSON")
    assert "not a SHA-256" in problems["ss_new_sd_model_hash"] and "not a resolution" in problems["ss_resolution"]
    assert "sideways" in problems["modelspec.prediction_type"]
    assert len(evidence.problems) == len(problems)  # each malformed value reported once
    assert evidence.n0.source == "default" and evidence.base_sha256 is None
    assert evidence.resolution.source == "modelspec.resolution"  # the other resolution key still counts
    assert evidence.caption is None  # every caption source was malformed: the fallback applies
    json.loads(evidence.to_json())


def test_non_string_metadata_values_are_reported(tmp_path):
    header = json.dumps({"__metadata__": {"ss_network_dim": 4, "format": "pt"},
                         "w.lora_down.weight": {"dtype": "F16", "shape": [1, 2], "data_offsets": [0, 4]}}).encode()
    path = tmp_path / "nonstring.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    evidence = read_evidence(str(path))
    assert [(p.source, "not a string" in p.message) for p in evidence.problems] == [("ss_network_dim", True)]


def test_unreadable_files_are_refused_with_what_they_are(tmp_path):
    def refused(name: str, content: bytes) -> str:
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(EvidenceError) as caught:
            read_evidence(str(path))
        return str(caught.value)

    good = tf.write(tmp_path / "good.safetensors", tf.lora_tensors(tf.SD1_KOHYA_LAYERS, 4, "kohya", 1), {"a": "b"})
    with open(good, "rb") as f:
        content = f.read()
    header_length = int.from_bytes(content[:8], "little")
    assert "truncated" in refused("cut-header.safetensors", content[: 8 + header_length // 2])
    assert "damaged header: it is not valid JSON" in refused(
        "bad-json.safetensors", content[:8] + b"{" + b"x" * (header_length - 1) + content[8 + header_length:])
    assert "PyTorch checkpoint" in refused("model.ckpt", b"PK\x03\x04" + b"\0" * 100)
    assert "never unpickles" in refused("old.pt", b"\x80\x02}q\x00" + b"\0" * 20)
    assert "HTML or JSON" in refused("page.safetensors", b"<!DOCTYPE html><html>404 Not Found</html>")
    assert "too short" in refused("empty.safetensors", b"")
    assert "GGUF" in refused("q.safetensors", b"GGUF" + b"\0" * 40)
    with pytest.raises(EvidenceError, match="is a folder"):
        read_evidence(str(tmp_path))
    # A file whose header is whole but whose tensors are cut short: read, marked incomplete, with the problem named
    cut = tmp_path / "cut-data.safetensors"
    cut.write_bytes(content[: len(content) - 100])
    evidence = read_evidence(str(cut))
    assert evidence.complete is False
    assert any(p.source == "file" and "truncated" in p.message for p in evidence.problems)


def test_base_is_matched_against_local_checkpoints_by_hash_and_name(tmp_path, base_file):
    path, _ = kohya_lora(tmp_path, base_file)
    base_path, sha256, _ = base_file
    folder = os.path.dirname(base_path)
    renamed = os.path.join(folder, "renamed-copy.safetensors")  # the same bytes under another name
    with open(base_path, "rb") as source, open(renamed, "wb") as target:
        target.write(source.read())
    other = tf.write(os.path.join(folder, "other.safetensors"), tf.checkpoint_tensors(tf.SD1_CHECKPOINT_SHAPES, 8),
                     None)
    candidates = [(os.path.basename(p), p) for p in (base_path, renamed, other)]
    evidence = read_evidence(path, hashes=FileHashes(None), bases=candidates)
    matches = [(m.name, m.by, m.sha256, m.family) for m in evidence.base_matches]
    assert matches == [("renamed-copy.safetensors", ("sha256",), sha256, "sd1"),
                       ("v1-5-pruned-emaonly.safetensors", ("sha256", "name"), sha256, "sd1")]
    # header only: names still match
    by_name = read_evidence(path, bases=candidates)
    assert [(m.name, m.by) for m in by_name.base_matches] == [("v1-5-pruned-emaonly.safetensors", ("name",))]


def test_same_file_gives_the_same_bytes_and_the_command_prints_one_line_per_file(tmp_path, base_file):
    path, _ = kohya_lora(tmp_path, base_file)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    cache = tmp_path / "hashes.jsonl"
    command = [sys.executable, "-m", "finextract_core.evidence", path, str(broken), "--bases",
               os.path.dirname(base_file[0]), "--hash-cache", str(cache)]
    runs = [subprocess.run(command, cwd=REPO_ROOT, capture_output=True, timeout=120) for _ in range(2)]
    assert runs[0].stdout == runs[1].stdout and runs[0].returncode == runs[1].returncode == 1
    lines = runs[0].stdout.decode().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["caption"]["value"] == "a photo of sks dog" and first["n0"]["value"] == 16
    assert first["base"]["local_matches"][0]["by"] == ["sha256", "name"]
    assert lines[0] == json.dumps(first, sort_keys=True)  # stable key order
    assert second["file"]["name"] == str(broken) and "PyTorch checkpoint" in second["error"]
    assert read_evidence(path, name=path, hashes=FileHashes(None),
                         bases=[(os.path.basename(base_file[0]), base_file[0])]).to_json() == lines[0]


def test_reader_never_loads_tensors(tmp_path, monkeypatch):
    """Only the header's bytes are read: a file whose tensor bytes are unreadable zeros still gives its evidence, and
    no safetensors / torch loader is called."""
    path = tf.write(tmp_path / "x.safetensors", tf.lora_tensors(tf.SD1_KOHYA_LAYERS, 4, "kohya", 1),
                    {"ss_base_model_version": "sd_v1"})
    import safetensors.torch

    def refuse(*args, **kwargs):
        raise AssertionError("the evidence reader loaded tensors")
    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(safetensors, "safe_open", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert read_evidence(path).family.value == "sd1"


def test_tensors_that_contradict_themselves_are_reported(tmp_path):
    """A merge of an SD 1.x LoRA with an SDXL layer: the family most cross-attention layers read, and the mix named."""
    layers = {**tf.SD1_KOHYA_LAYERS,
              "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": tf.SDXL_KOHYA_LAYERS[
                  "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"]}
    evidence = read_evidence(tf.write(tmp_path / "merge.safetensors", tf.lora_tensors(layers, 4, "kohya", 1), None))
    assert evidence.family.value == "sd1"  # two layers (to_k, to_v) read 768, one reads 2048
    [problem] = evidence.problems
    assert problem.source == "tensors" and "768 in 2 tensor(s)" in problem.message and "2048 in 1" in problem.message
