"""Bad input through the real host: each case gives a message that says what is wrong and what to do.

In-process (the pack's nodes on ComfyUI's own loaders and models): model pairs that cannot be guided, empty and
single-image inputs to embedding, clustering and metrics, embeddings of different models, unreadable SSCD files and
a NaN in a prediction inside the Candidate Bank. Through a real server: truncated safetensors files in ComfyUI's
loaders and in the pack's own SSCD loader, after which the server goes on serving.

Covered elsewhere: N0 > N and embeddings of another preset against a bank (test_candidate_bank.py), a bank folder that
cannot be written and resuming without losing candidates (test_candidate_bank.py, test_candidate_bank_server.py),
the same MODEL in both inputs on a server (test_server_end_to_end.py), and the pairing errors on SD 1.x and SDXL
patchers (test_guidance_one_step.py).
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from fixtures import tiny_models
from fixtures.bank_helpers import SSCD_NAME, bank_prompt, shard_count, write_test_sscd
from tools.host.comfy_server import ComfyServer, execution_error
from fixtures.stand_in_models import attack_prompt, write_stand_in_models

OTHER_SSCD = "sscd_other.safetensors"  # the same weights under another name: another model as far as anyone knows
TRUNCATED_SSCD = "sscd_truncated.safetensors"
NOT_SAFETENSORS_SSCD = "sscd_not_a_model.safetensors"
TRUNCATED = "truncated.safetensors"
STRAY_LORA = "stray_lora.safetensors"


def write_bad_files(models: str) -> None:
    """Next to the stand-in models and the test SSCD: truncated copies, a file that is no safetensors at all, a copy of
    the SSCD under another name, and a LoRA whose keys name no layer of the base."""
    sscd = os.path.join(models, "sscd")
    write_test_sscd(sscd)
    shutil.copyfile(os.path.join(sscd, SSCD_NAME), os.path.join(sscd, OTHER_SSCD))
    for folder, source, target in (("sscd", SSCD_NAME, TRUNCATED_SSCD), ("checkpoints", "base.safetensors", TRUNCATED),
                                   ("loras", "style.safetensors", TRUNCATED)):
        with open(os.path.join(models, folder, source), "rb") as handle:
            content = handle.read()
        with open(os.path.join(models, folder, target), "wb") as handle:
            handle.write(content[: len(content) // 2])  # an interrupted download or copy
    with open(os.path.join(sscd, NOT_SAFETENSORS_SSCD), "wb") as handle:
        handle.write(b"<html>404 Not Found</html>")
    save_file({"lora_unet_not_a_layer.lora_up.weight": torch.zeros(4, 2),
               "lora_unet_not_a_layer.lora_down.weight": torch.zeros(2, 4)},
              os.path.join(models, "loras", STRAY_LORA))


@pytest.fixture(scope="module")
def world(host, tmp_path_factory):
    base = tmp_path_factory.mktemp("bad-input")
    models = str(base / "models")
    write_stand_in_models(models)
    write_bad_files(models)
    for sub in ("checkpoints", "loras", "diffusion_models", "sscd"):
        host.folder_paths.add_model_folder_path(sub, os.path.join(models, sub))
    # Outside ComfyUI's output folder: registered for banks as a server's owner would in extra_model_paths.yaml.
    host.folder_paths.add_model_folder_path("finextract_banks", str(base))
    nodes = host.nodes.NODE_CLASS_MAPPINGS
    model, clip, vae = nodes["CheckpointLoaderSimple"]().load_checkpoint("base.safetensors")[:3]
    encode = nodes["CLIPTextEncode"]()
    images = torch.rand(3, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    return {"base": base, "nodes": nodes, "model": model, "vae": vae, "images": images,
            "positive": encode.encode(clip, "sks style")[0], "negative": encode.encode(clip, "")[0]}


def sample(world, fine_tuned, pretrained):
    return world["nodes"]["FineXtractModelGuidanceSampler"].execute(
        fine_tuned, pretrained, world["positive"], world["negative"], "finextract", 5.0, 0.0,
        {"samples": torch.zeros(1, 4, 8, 8)}, 0, 2, "ddim", "ddim_uniform", 1.0)


def test_model_pairs_that_cannot_be_guided_say_what_to_connect(world):
    nodes, model = world["nodes"], world["model"]
    sdxl, _ = tiny_models.sdxl_patcher(seed=21)
    with pytest.raises(ValueError, match=r"different model families \(fine-tuned is SDXL.*pretrained is SD15.*"
                                         r"load the base checkpoint the fine-tune was trained on"):
        sample(world, sdxl, model)
    with pytest.raises(ValueError, match="same MODEL is connected to both 'fine_tuned' and 'pretrained'"):
        sample(world, model, model)
    # ComfyUI loads a LoRA whose keys match no layer without complaint (its log says 'lora key not loaded').
    stray = nodes["LoraLoaderModelOnly"]().load_lora_model_only(model, STRAY_LORA, 1.0)[0]
    with pytest.raises(ValueError, match="matches none of this base model's layers.*lora key not loaded.*"
                                         "base model the LoRA was trained on"):
        sample(world, stray, model)


@pytest.fixture
def references_folder(host, tmp_path, monkeypatch):
    """tmp_path, outside ComfyUI's input folder: allowed for references as a server's owner would allow it."""
    monkeypatch.setenv(host.module("nodes.paths").ALLOWED_FOLDERS_VARIABLE, str(tmp_path))
    return tmp_path


def test_empty_inputs_are_refused_before_any_work(world, references_folder):
    nodes, images = world["nodes"], world["images"]
    empty = images[:0]
    with pytest.raises(ValueError, match="'images' is an empty image batch.*connect at least one image"):
        nodes["FineXtractSSCDEmbed"].execute(empty, SSCD_NAME, "paper", 4)
    (embeddings,) = nodes["FineXtractSSCDEmbed"].execute(images, SSCD_NAME, "paper", 4).args
    with pytest.raises(ValueError, match="'extracted' is an empty image batch"):
        nodes["FineXtractExtractionMetrics"].execute(images, embeddings, empty, embeddings, 0.6, 0.7)
    with pytest.raises(ValueError, match="'references' is an empty image batch"):
        nodes["FineXtractExtractionMetrics"].execute(empty, embeddings, images, embeddings, 0.6, 0.7)
    clusters = nodes["FineXtractCliqueClusterV2"].execute(embeddings, 1, "paper", 1).args[0]
    with pytest.raises(ValueError, match="'candidates' is an empty image batch"):
        nodes["FineXtractExtractedImages"].execute(clusters, candidates=empty)
    with pytest.raises(ValueError, match="no images .* in .*: put the reference images there"):
        nodes["FineXtractLoadReferenceImages"].execute(str(references_folder), 64)


def test_single_images_are_scored_and_clustered(world, references_folder):
    nodes, images = world["nodes"], world["images"]
    Image.fromarray((images[0].numpy() * 255).round().astype(np.uint8)).save(references_folder / "only.png")
    references, names = nodes["FineXtractLoadReferenceImages"].execute(str(references_folder), 64).args
    assert references.shape == (1, 64, 64, 3) and names == "only.png"
    embed = nodes["FineXtractSSCDEmbed"]
    (reference,) = embed.execute(references, SSCD_NAME, "paper", 4).args
    (extracted,) = embed.execute(images[1:2], SSCD_NAME, "paper", 4).args
    score, loose, strict, table, _, grid, _ = nodes["FineXtractExtractionMetrics"].execute(
        references, reference, images[1:2], extracted, 0.6, 0.7).args
    cosine = float(reference.vectors[0].astype(np.float64) @ extracted.vectors[0].astype(np.float64))
    assert score == pytest.approx(cosine, abs=1e-12)  # one reference, one extracted image: AS is their similarity
    assert (loose, strict) == (float(cosine > 0.6), float(cosine > 0.7))
    assert table.splitlines()[1] == f"0,0,{cosine:.6f},{int(cosine > 0.6)},{int(cosine > 0.7)}"
    assert grid.shape == (1, 256, 768, 3)
    cluster = nodes["FineXtractCliqueClusterV2"]
    # One candidate is one cluster, whatever N0 and min_clique_size ask for, and the summary says why.
    for n0, min_clique_size in ((1, 2), (2, 1), (1, 1)):
        clusters, summary, _ = cluster.execute(extracted, n0, "best_threshold", min_clique_size).args
        assert "there are 1 candidates: each candidate is its own cluster" in summary
        alone, alone_embeddings = nodes["FineXtractExtractedImages"].execute(clusters, candidates=images[1:2]).args
        assert torch.equal(alone, images[1:2]) and np.array_equal(alone_embeddings.vectors, extracted.vectors)


def test_embeddings_of_another_model_are_never_compared(world):
    nodes, images = world["nodes"], world["images"]
    (ours,) = nodes["FineXtractSSCDEmbed"].execute(images, SSCD_NAME, "paper", 4).args
    (theirs,) = nodes["FineXtractSSCDEmbed"].execute(images, OTHER_SSCD, "paper", 4).args
    assert np.array_equal(ours.vectors, theirs.vectors)  # same numbers, other provenance: still refused
    with pytest.raises(ValueError, match="sscd_test/preset paper .* vs sscd_other/preset paper .*embed both with "
                                         "the same model and preset"):
        nodes["FineXtractExtractionMetrics"].execute(images, ours, images, theirs, 0.6, 0.7)


@pytest.mark.parametrize("name", [TRUNCATED_SSCD, NOT_SAFETENSORS_SSCD, "sscd_deleted.safetensors"])
def test_unreadable_sscd_files_say_where_to_get_one(world, name):
    with pytest.raises((ValueError, FileNotFoundError),
                       match=rf"{name}.*(incomplete or not an SSCD model|not found).*dl\.fbaipublicfiles\.com"):
        world["nodes"]["FineXtractSSCDEmbed"].execute(world["images"], name, "paper", 4)


def test_nan_in_a_prediction_stops_the_bank_naming_the_step(world):
    nodes = world["nodes"]
    fine_tuned = nodes["UNETLoader"]().load_unet("dreambooth.safetensors", "default")[0]
    weight = next(fine_tuned.model.diffusion_model.parameters())
    with torch.no_grad():
        weight.view(-1)[0] = float("nan")  # one corrupt weight in a freshly loaded fine-tune
    folder = str(world["base"] / "nan-bank")
    with pytest.raises(FloatingPointError, match=r"NaN/inf at step 1 of 2 \(sigma [\d.]+\) in ft_cond.*not corrupt"):
        nodes["FineXtractCandidateBank"].execute(
            fine_tuned, world["model"], world["positive"], world["negative"], "finextract", 5.0, 0.0,
            {"samples": torch.zeros(1, 4, 8, 8)}, 3, 2, "ddim", "ddim_uniform", world["vae"], SSCD_NAME, "paper",
            2, 0, 2, folder)
    assert shard_count(folder) == 0, "a batch that produced NaN must not be stored as candidates"


# ----------------------------------------------------------------------------------------------- on a real server
@pytest.fixture(scope="module")
def server(host, tmp_path_factory):  # host: tiny_models builds shapes with ComfyUI's own modules
    base = str(tmp_path_factory.mktemp("bad-input-server"))
    write_stand_in_models(f"{base}/models")
    write_bad_files(f"{base}/models")
    with ComfyServer(base) as running:
        yield running


def test_truncated_files_are_reported_and_the_server_goes_on(server):
    # ComfyUI's own loaders, on the loader node: the words are the reader's (safetensors', or on GPU hosts of current
    # ComfyUI its own reader's), which the pack does not own.
    prompt = attack_prompt(["lora", 0], "truncated_checkpoint")
    prompt["base"]["inputs"]["ckpt_name"] = TRUNCATED
    message = execution_error(server.run(prompt))
    assert message is not None and message.startswith("CheckpointLoaderSimple:"), message
    prompt = attack_prompt(["lora", 0], "truncated_lora")
    prompt["lora"]["inputs"]["lora_name"] = TRUNCATED
    message = execution_error(server.run(prompt))
    assert message is not None and message.startswith("LoraLoaderModelOnly:"), message
    # The pack's own SSCD loader names the file, what is wrong with it and where to get a good one.
    folder = os.path.join(server.base, "output", "banks", "truncated_sscd")
    message = execution_error(server.run(bank_prompt(folder, 2, 2, 2, sscd_model=TRUNCATED_SSCD)))
    assert message is not None and message.startswith("FineXtractCandidateBank:"), message
    assert TRUNCATED_SSCD in message and "incomplete" in message and "dl.fbaipublicfiles.com" in message, message
    # Still serving: the same bank with a good SSCD file runs to the end.
    entry = server.run(bank_prompt(folder, 2, 2, 2))
    assert execution_error(entry) is None, execution_error(entry)
    assert shard_count(folder) == 1
