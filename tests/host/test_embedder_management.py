"""SSCD Embed, CLIP Embed and the Candidate Bank's per-batch embedding load their embedder through ComfyUI's model
management, in-process on the real (CPU) host: the embedder is a ModelPatcher that model management lists as loaded
while it embeds, whose memory it counts (the weights' bytes, computed here from the file), that it unloads when
another model needs the room, and that leaves it once the node loads another file. The embeddings are those of the
core's own functions on a model loaded without ComfyUI, bit for bit.

On a GPU the same calls move the weights onto the card and back (load_device != offload_device); on this CPU both
devices are the CPU, so what is checked is model management's bookkeeping, not a transfer.
"""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fixtures.stand_in_models import TINY_CLIP_ARCHITECTURE, centred_random_sscd, write_stand_in_models, write_tiny_open_clip
from tools.host.comfy_inprocess import host_module

sscd_core = host_module("finextract_core.sscd")
clip_core = host_module("finextract_core.clip_embed")
embedding_nodes = host_module("nodes.embedding")
# A name no other test's SSCD folder holds: the node must find this test's file, whichever folders are registered.
SSCD_NAME = "managed_sscd.safetensors"


def model_management():
    import comfy.model_management  # the host's: ComfyUI is on sys.path once the host is loaded

    return comfy.model_management


def is_loaded(patcher) -> bool:
    return any(loaded is patcher for loaded in model_management().loaded_models())


def images(count: int = 6, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, size, size, 3, generator=torch.Generator().manual_seed(seed))


def unload_everything() -> None:
    """What loading a model that needs all the room does: model management frees every other model."""
    management = model_management()
    management.free_memory(1e30, management.get_torch_device())


@pytest.fixture(scope="module")
def folders(host, tmp_path_factory):
    base = tmp_path_factory.mktemp("embedders")
    write_sscd(base / "sscd")
    host.folder_paths.add_model_folder_path("sscd", str(base / "sscd"))
    return base


def write_sscd(folder) -> None:
    folder.mkdir(exist_ok=True)
    save_file(centred_random_sscd(), str(folder / SSCD_NAME))


def file_bytes(path: str) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in load_file(path).values())


def test_sscd_embed_is_loaded_counted_and_unloaded_by_model_management(host, folders):
    node = host.nodes.NODE_CLASS_MAPPINGS["FineXtractSSCDEmbed"]
    batch = images()
    (vectors,) = node.execute(batch, SSCD_NAME, "paper", 4).args
    patcher = embedding_nodes.load_sscd(SSCD_NAME)
    assert is_loaded(patcher), "the embedder is registered with model management once it has embedded"
    assert patcher.load_device == model_management().get_torch_device()
    assert patcher.offload_device == model_management().unet_offload_device()
    path = str(folders / "sscd" / SSCD_NAME)
    assert host.folder_paths.get_full_path("sscd", SSCD_NAME) == path
    # Model management counts the weights (and buffers) the file holds, nothing else.
    assert patcher.model_size() == file_bytes(path)

    direct = sscd_core.load_sscd_model(path)
    expected = sscd_core.embed_images(direct, batch, "paper", batch_size=4)
    assert vectors.model_id == expected.model_id and vectors.preset == expected.preset
    assert np.array_equal(vectors.vectors, expected.vectors), "model management must not change the embeddings"

    unload_everything()
    assert not is_loaded(patcher), "model management unloads the embedder when another model needs the room"
    (again,) = node.execute(batch, SSCD_NAME, "paper", 4).args
    assert is_loaded(patcher) and embedding_nodes.load_sscd(SSCD_NAME) is patcher, "loaded again, not rebuilt"
    assert np.array_equal(again.vectors, expected.vectors)


def test_a_replaced_embedder_leaves_model_management(host, folders):
    node = host.nodes.NODE_CLASS_MAPPINGS["FineXtractSSCDEmbed"]
    path = str(folders / "sscd" / SSCD_NAME)
    node.execute(images(2), SSCD_NAME, "paper", 2)
    old = embedding_nodes.load_sscd(SSCD_NAME)
    assert is_loaded(old)
    # The same name with other weights (a file replaced on disk): the node builds a new patcher, and the old one,
    # no longer held by the node, is gone from model management's list.
    weights = load_file(path)
    save_file({name: tensor * 0.5 if tensor.is_floating_point() else tensor for name, tensor in weights.items()},
              path)
    try:
        old_patcher = weakref.ref(old)
        del old
        node.execute(images(2), SSCD_NAME, "paper", 2)
        new = embedding_nodes.load_sscd(SSCD_NAME)
        gc.collect()
        assert old_patcher() is None, "nothing holds the replaced embedder"
        assert [loaded for loaded in model_management().loaded_models()
                if isinstance(loaded.model, sscd_core.SSCDModel)] == [new]
    finally:
        write_sscd(folders / "sscd")


def test_clip_embed_is_loaded_through_model_management(host, tmp_path):
    path = write_tiny_open_clip(str(tmp_path / "open_clip"), "managed.safetensors", seed=2)
    host.folder_paths.add_model_folder_path("open_clip", str(tmp_path / "open_clip"))

    node = host.nodes.NODE_CLASS_MAPPINGS["FineXtractOpenCLIPEmbed"]
    batch = images(5, size=40)
    (vectors,) = node.execute(batch, "managed.safetensors", TINY_CLIP_ARCHITECTURE, False, 2).args
    (patcher,) = [loaded for loaded in model_management().loaded_models()
                  if isinstance(loaded.model, clip_core.ClipImageEmbedder) and loaded.model.model_id == vectors.model_id]
    # The image tower only: the text tower's weights are in the file but never loaded.
    assert 0 < patcher.model_size() < file_bytes(path)
    direct = clip_core.load_clip_embedder(TINY_CLIP_ARCHITECTURE, path)
    expected = clip_core.embed_images_clip(direct, batch, batch_size=2)
    assert vectors.model_id == expected.model_id
    assert np.array_equal(vectors.vectors, expected.vectors), "model management must not change the embeddings"
    unload_everything()
    assert not is_loaded(patcher)


def test_the_bank_embeds_each_batch_through_model_management(host, folders, tmp_path, monkeypatch):
    write_stand_in_models(str(tmp_path / "models"))
    for sub in ("checkpoints", "loras"):
        host.folder_paths.add_model_folder_path(sub, str(tmp_path / "models" / sub))
    # Outside ComfyUI's output folder: registered for banks as a server's owner would in extra_model_paths.yaml.
    monkeypatch.setitem(host.folder_paths.folder_names_and_paths, "finextract_banks", ([str(tmp_path)], set()))
    nodes = host.nodes.NODE_CLASS_MAPPINGS
    model, clip, vae = nodes["CheckpointLoaderSimple"]().load_checkpoint("base.safetensors")[:3]
    lora = nodes["LoraLoaderModelOnly"]().load_lora_model_only(model, "style.safetensors", 1.0)[0]
    encode = nodes["CLIPTextEncode"]()
    unload_everything()
    patcher = embedding_nodes.load_sscd(SSCD_NAME)
    assert not is_loaded(patcher)
    embeddings = nodes["FineXtractCandidateBank"].execute(
        fine_tuned=lora, pretrained=model, positive=encode.encode(clip, "sks style")[0],
        negative=encode.encode(clip, "")[0], mode="finextract", guidance_scale=5.0, k=0.0,
        latent_image=nodes["EmptyLatentImage"]().generate(64, 64, 1)[0], seed=7, steps=2, sampler_name="ddim",
        scheduler="ddim_uniform", vae=vae, sscd_model=SSCD_NAME, preset="paper", num_candidates=4,
        first_candidate=0, batch_size=2, bank_folder=str(tmp_path / "output-bank")).args[0]
    loaded = model_management().loaded_models()
    assert any(item is patcher for item in loaded), "the bank's embedder is loaded by model management"
    assert any(item.model is model.model for item in loaded), "beside the UNet it sampled with"
    # The bank's rows are the core's embeddings of the decoded candidates.
    decoded = nodes["VAEDecode"]().decode(vae, {"samples": host_module("finextract_core.bank").CandidateBank.read(
        str(tmp_path / "output-bank")).latents(list(range(4)))})[0]
    expected = sscd_core.embed_images(sscd_core.load_sscd_model(str(folders / "sscd" / SSCD_NAME)), decoded, "paper",
                                      batch_size=2)
    assert np.allclose(embeddings.vectors, expected.vectors, atol=1e-6)
