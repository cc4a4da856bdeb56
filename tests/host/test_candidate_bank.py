"""The Candidate Bank and the nodes that read it, in-process on the real host, with the stand-in models (a base
checkpoint and a LoRA) and a random SSCD file: candidate i does not depend on the batch size, extending N keeps the
first candidates, shards of index ranges merge into one run's bank, the bank's run settings are the sampler's, only the
extracted candidates are decoded, and bad input is answered with advice.

Resuming after ComfyUI's /interrupt and after a killed server is tested over HTTP in test_candidate_bank_server.py.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from fixtures.bank_helpers import SSCD_NAME, assert_same_bank, shard_count, write_test_sscd
from fixtures.stand_in_models import write_stand_in_models
from tools.host.comfy_inprocess import host_module

bank_module = host_module("finextract_core.bank")
CandidateBank, merge_banks = bank_module.CandidateBank, bank_module.merge_banks

COUNT, STEPS = 4, 2
# Rows of a different batch size go through the CPU's kernels in another order: equal to rounding, not bit for bit.
BATCH_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def setup(host, tmp_path_factory):
    base = tmp_path_factory.mktemp("bank")
    write_stand_in_models(str(base / "models"))
    for sub in ("checkpoints", "loras"):
        host.folder_paths.add_model_folder_path(sub, str(base / "models" / sub))
    host.folder_paths.add_model_folder_path("sscd", str(base / "sscd"))
    # Outside ComfyUI's output folder: registered for banks as a server's owner would in extra_model_paths.yaml.
    host.folder_paths.add_model_folder_path("finextract_banks", str(base / "banks"))
    write_test_sscd(str(base / "sscd"))
    nodes = host.nodes.NODE_CLASS_MAPPINGS
    model, clip, vae = nodes["CheckpointLoaderSimple"]().load_checkpoint("base.safetensors")[:3]
    lora = nodes["LoraLoaderModelOnly"]().load_lora_model_only(model, "style.safetensors", 1.0)[0]
    encode = nodes["CLIPTextEncode"]()
    return {
        "nodes": nodes, "folder": base / "banks", "vae": vae,
        "inputs": dict(fine_tuned=lora, pretrained=model, positive=encode.encode(clip, "sks style")[0],
                       negative=encode.encode(clip, "")[0], mode="finextract", guidance_scale=5.0, k=0.0,
                       latent_image=nodes["EmptyLatentImage"]().generate(64, 64, 1)[0], seed=7, steps=STEPS,
                       sampler_name="ddim", scheduler="ddim_uniform", vae=vae, sscd_model=SSCD_NAME, preset="paper"),
    }


def run_bank(setup, name, num_candidates=COUNT, first_candidate=0, batch_size=COUNT, **changes):
    """The Candidate Bank's outputs: embeddings, bank, settings JSON, run settings."""
    node = setup["nodes"]["FineXtractCandidateBank"]
    inputs = {**setup["inputs"], **changes}
    return node.execute(**inputs, num_candidates=num_candidates, first_candidate=first_candidate,
                        batch_size=batch_size, bank_folder=str(setup["folder"] / name)).args


def make_bank(setup, name, **options):
    """(embeddings, bank) of a Candidate Bank run."""
    return run_bank(setup, name, **options)[:2]


@pytest.fixture(scope="module")
def reference(setup):
    """One uninterrupted run of COUNT candidates in a single batch."""
    embeddings, rows = make_bank(setup, "reference")
    return str(setup["folder"] / "reference"), embeddings, rows


def test_batch_size_does_not_change_a_candidate(setup, reference):
    folder, embeddings, _ = reference
    assert embeddings.vectors.shape == (COUNT, 512) and embeddings.space == "sscd_test/preset paper"
    assert shard_count(folder) == 1
    make_bank(setup, "one_by_one", batch_size=1)
    assert shard_count(str(setup["folder"] / "one_by_one")) == COUNT
    assert_same_bank(str(setup["folder"] / "one_by_one"), folder, COUNT, BATCH_TOLERANCE)
    latents = CandidateBank.read(folder).latents(list(range(COUNT)))
    assert (latents[0] - latents[1]).abs().max() > 0.1, "different candidates must come from different noise"


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_sde", "dpmpp_2m_sde"])
def test_stochastic_samplers_draw_step_noise_per_candidate(setup, sampler):
    """Ancestral samplers draw fresh noise at each step, SDE samplers from a Brownian tree: either way candidate i
    must not depend on its batch, and a resumed bank must equal an uninterrupted one."""
    folder = lambda name: str(setup["folder"] / f"{sampler}_{name}")  # noqa: E731
    make_bank(setup, f"{sampler}_whole", num_candidates=3, batch_size=2, sampler_name=sampler)  # batches 0-1, 2
    make_bank(setup, f"{sampler}_single", num_candidates=3, batch_size=1, sampler_name=sampler)
    assert_same_bank(folder("single"), folder("whole"), 3, BATCH_TOLERANCE)
    # Stopped after its first batch, then queued again: only candidate 2 is made, exactly as in the whole run.
    make_bank(setup, f"{sampler}_resumed", num_candidates=2, batch_size=2, sampler_name=sampler)
    assert shard_count(folder("resumed")) == 1
    make_bank(setup, f"{sampler}_resumed", num_candidates=3, batch_size=2, sampler_name=sampler)
    assert_same_bank(folder("resumed"), folder("whole"), 3)


def test_extending_n_keeps_the_first_candidates(setup, reference):
    folder = setup["folder"] / "extended"
    make_bank(setup, "extended", num_candidates=2, batch_size=2)
    first_shard = sorted(os.listdir(folder))
    first_bytes = {name: (folder / name).read_bytes() for name in first_shard if name.startswith("candidates-")}
    embeddings, _ = make_bank(setup, "extended", num_candidates=COUNT, batch_size=2)
    for name, content in first_bytes.items():
        assert (folder / name).read_bytes() == content, f"{name} was rewritten when N was raised"
    assert shard_count(str(folder)) == 2
    assert_same_bank(str(folder), reference[0], COUNT, BATCH_TOLERANCE)
    assert len(embeddings) == COUNT


def test_shards_of_index_ranges_merge_into_one_run(setup, reference):
    first_half, _ = make_bank(setup, "machine_a", num_candidates=2, first_candidate=0, batch_size=2)
    second_half, rows = make_bank(setup, "machine_b", num_candidates=2, first_candidate=2, batch_size=2)
    assert rows.candidates == (2, 3) and len(second_half) == 2
    merged = str(setup["folder"] / "merged")
    assert merge_banks(merged, [str(setup["folder"] / "machine_a"), str(setup["folder"] / "machine_b")]) == COUNT
    assert merge_banks(merged, [str(setup["folder"] / "machine_b")]) == 0, "nothing new: nothing copied"
    assert_same_bank(merged, reference[0], COUNT, BATCH_TOLERANCE)
    # The node finds everything in the merged bank and generates nothing.
    shards = shard_count(merged)
    embeddings, _ = make_bank(setup, "merged")
    assert shard_count(merged) == shards
    assert (embeddings.vectors[:2] == first_half.vectors).all()
    assert (embeddings.vectors[2:] == second_half.vectors).all()


def test_extracted_images_decode_only_the_centres(setup, reference):
    nodes, vae = setup["nodes"], setup["vae"]
    _, embeddings, rows = reference
    every = nodes["FineXtractDecodeBankCandidates"].execute(rows, vae, ", ".join(str(i) for i in range(COUNT))).args[0]
    assert every.shape == (COUNT, 64, 64, 3)
    latents = CandidateBank.read(reference[0]).latents(list(range(COUNT)))
    decoded = nodes["VAEDecode"]().decode(vae, {"samples": latents})
    assert torch.equal(every, decoded[0]), "a bank candidate decodes to the VAE's image of its stored latent"
    clusters, _, clusters_json = nodes["FineXtractCliqueClusterV2"].execute(embeddings, 2, "paper", 1).args
    images = nodes["FineXtractExtractedImages"]
    from_images, from_images_embeddings = images.execute(clusters, candidates=every).args
    # From the bank and its VAE instead of the images: only the centres are decoded, to the same images.
    from_bank, from_bank_embeddings = images.execute(clusters, bank=rows, vae=vae).args
    assert torch.equal(from_bank, from_images) and torch.equal(from_bank, every[list(clusters.centres)])
    assert (from_bank_embeddings.vectors == from_images_embeddings.vectors).all()
    # The deprecated decoder of pack 0.1.0 still reads Clique Cluster's JSON and positions.
    decode = nodes["FineXtractDecodeBankCandidates"]
    assert torch.equal(decode.execute(rows, vae, clusters_json).args[0], from_bank)
    assert torch.equal(decode.execute(rows, vae, "[3, 0]").args[0], every[[3, 0]])
    with pytest.raises(ValueError, match=r"outside the bank's 4 embeddings"):
        decode.execute(rows, vae, "1, 9")
    with pytest.raises(ValueError, match="clusters_json, or positions"):
        decode.execute(rows, vae, "")
    # Clusters of other embeddings than the bank's are refused, before anything is decoded.
    other, _ = make_bank(setup, "other_seed", seed=11)
    other_clusters, _, _ = nodes["FineXtractCliqueClusterV2"].execute(other, 2, "paper", 1).args
    with pytest.raises(ValueError, match="not made from this bank's embeddings"):
        images.execute(other_clusters, bank=rows, vae=vae)
    half, _ = make_bank(setup, "reference", num_candidates=2)
    half_clusters, _, _ = nodes["FineXtractCliqueClusterV2"].execute(half, 1, "paper", 1).args
    with pytest.raises(ValueError, match="the bank holds 4 candidates but 2 were clustered"):
        images.execute(half_clusters, bank=rows, vae=vae)


def test_the_banks_run_settings_are_the_samplers(setup):
    """Built in one place: the same inputs give the same settings, but for how the noise is drawn."""
    nodes = setup["nodes"]
    _, _, settings_json, settings = run_bank(setup, "settings", num_candidates=3, first_candidate=2, batch_size=3)
    sampler_inputs = {name: setup["inputs"][name] for name in ("fine_tuned", "pretrained", "positive", "negative",
                                                             "mode", "guidance_scale", "k", "seed", "steps",
                                                             "sampler_name", "scheduler")}
    latent = nodes["EmptyLatentImage"]().generate(64, 64, 3)[0]
    _, sampler_json, sampler_settings = nodes["FineXtractModelGuidanceSampler"].execute(
        **sampler_inputs, latent_image=latent, denoise=1.0).args
    assert json.loads(settings_json) == settings.to_dict() and json.loads(sampler_json) == sampler_settings.to_dict()
    differ = {name for name, value in settings.to_dict().items() if sampler_settings.to_dict()[name] != value}
    assert differ == {"noise", "first_candidate"}
    assert (settings.noise, sampler_settings.noise) == ("per-candidate-noise-v2", "ksampler-batch")
    assert settings.candidates == sampler_settings.candidates == 3 and settings.first_candidate == 2
    assert settings.fine_tune == "base + LoRA (shared weights)" and settings.latent_shape == (4, 8, 8)
    with open(os.path.join(setup["folder"], "settings", "bank.json")) as handle:
        key = json.load(handle)["key"]
    assert {name: key[name] for name in settings.candidate_key()} == settings.candidate_key()


def test_bad_input_is_answered_with_advice(setup, reference):
    nodes = setup["nodes"]
    _, embeddings, rows = reference
    images = nodes["FineXtractDecodeBankCandidates"].execute(rows, setup["vae"], "0, 1, 2, 3").args[0]
    cluster = nodes["FineXtractCliqueClusterV2"]
    clusters, summary, _ = cluster.execute(embeddings, COUNT + 1, "paper", 1).args
    assert clusters.result.n_clusters == COUNT and f"{COUNT} clusters instead of N0" in summary  # fewer than N0
    with pytest.raises(ValueError, match="N0"):
        cluster.execute(embeddings, 0, "paper", 1)
    # Embeddings of another preset (or model) are never compared with the bank's.
    (other_preset,) = nodes["FineXtractSSCDEmbed"].execute(images, SSCD_NAME, "sscd", 4).args
    with pytest.raises(ValueError, match="preset"):
        nodes["FineXtractExtractionMetrics"].execute(images, other_preset, images, embeddings, 0.6, 0.7)
    # A folder holding a bank of other settings is refused, naming what differs.
    with pytest.raises(bank_module.BankError, match=r"other settings \(seed: 7 there, 8 now\)"):
        make_bank(setup, "reference", seed=8)
    with pytest.raises(bank_module.BankError, match="other settings.*preset"):
        make_bank(setup, "reference", preset="sscd")
    blocker = setup["folder"] / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(bank_module.BankError, match="Cannot write the candidate bank.*Choose a bank_folder"):
        make_bank(setup, "a_file/bank")
    with pytest.raises(FileNotFoundError, match="models/sscd"):
        make_bank(setup, "no_sscd", sscd_model="(no SSCD file in models/sscd)")


def test_a_corrupt_or_foreign_shard_is_named(setup, reference):
    folder = setup["folder"] / "corrupt"
    corrupt = dict(num_candidates=2, batch_size=1, seed=9)  # other settings than the reference: its shards are foreign
    make_bank(setup, "corrupt", **corrupt)
    shard = sorted(name for name in os.listdir(folder) if name.startswith("candidates-"))[1]
    content = (folder / shard).read_bytes()
    (folder / shard).write_bytes(content[: len(content) // 2])  # a truncated copy
    with pytest.raises(bank_module.BankError, match=f"{shard} is unreadable.*Delete that file"):
        make_bank(setup, "corrupt", **corrupt)
    (folder / shard).unlink()
    make_bank(setup, "corrupt", **corrupt)  # only the deleted candidate is made again
    assert shard_count(str(folder)) == 2
    foreign = sorted(name for name in os.listdir(reference[0]) if name.startswith("candidates-"))[0]
    foreign_bytes = (setup["folder"] / "reference" / foreign).read_bytes()
    (folder / "candidates-00000099-0004.safetensors").write_bytes(foreign_bytes)
    with pytest.raises(bank_module.BankError, match="belongs to another bank"):
        make_bank(setup, "corrupt", **corrupt)


def test_bank_manifest_is_json_with_the_whole_key(reference):
    with open(os.path.join(reference[0], "bank.json")) as handle:
        manifest = json.load(handle)
    key = manifest["key"]
    for field in ("fine_tuned", "pretrained", "positive", "negative", "mode", "guidance_scale", "k", "seed", "steps",
                  "sampler", "scheduler", "latent_shape", "vae", "embedder", "embedder_weights", "preset", "scheme"):
        assert field in key, field
    assert key["fine_tuned"] != key["pretrained"], "the LoRA's patches must be part of the fine-tuned model's identity"
    assert key["latent_shape"] == [4, 8, 8]
