"""The proving-ground world inside the real ComfyUI host: MODEL, LoRA through ComfyUI's loader, the guider on a pair."""
import os

import numpy as np
import pytest
import torch

from fixtures.tiny_world import TINY_WORLD as TINY
from lab import nodes
from lab.world import store
from lab.world.similarity import highpass_embeddings
from lab.world.text import concept_caption
from lab.world.training import FineTuneSettings, lora_layer_names, merge_lora

CAPTION = concept_caption(0)
STYLES = {"dreambooth": FineTuneSettings(steps=3, lr=1e-2), "lora": FineTuneSettings(steps=3, lr=5e-2, rank=2)}
LOCON = FineTuneSettings(steps=3, lr=5e-2, rank=2, lora_layers="locon")  # a LoRA on convolutions too
FINE_TUNES = {**STYLES, "locon": LOCON}


@pytest.fixture(scope="module")
def world(host, tmp_path_factory):
    built = store.build_or_load(str(tmp_path_factory.mktemp("world")), TINY)
    images = np.random.default_rng(0).uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
    paths = {style: store.build_or_load_fine_tune(built, images, CAPTION, settings, seed=0)
             for style, settings in FINE_TUNES.items()}
    return built, paths


def load(nodes, world, fine_tune=""):
    return nodes.WorldLoader.execute(world.folder, fine_tune).args


def comfy_eps(patcher, x, step, context):
    """The eps the ComfyUI MODEL predicts at integer training step ``step`` for the clean-scale input x_t."""
    sampling = patcher.model.model_sampling
    sigma = sampling.sigmas[step].view(1)
    x_comfy = x * (1 + sigma ** 2).sqrt()  # ComfyUI's EPS models take x0 + sigma eps
    denoised = patcher.model.apply_model(x_comfy, sigma.expand(x.shape[0]), c_crossattn=context)
    return (x_comfy - denoised) / sigma


def test_world_loads_as_a_comfy_model_with_the_training_schedule(world):
    built, _ = world
    patcher, text_encoder = load(nodes, built)
    abar = TINY.schedule.alphas_cumprod()
    assert torch.allclose(patcher.model.model_sampling.sigmas, ((1 - abar) / abar).sqrt().float(), rtol=1e-6)
    x, context = torch.randn(2, 3, 32, 32), text_encoder.encode(CAPTION).expand(2, -1, -1)
    with torch.no_grad():
        expected = built.unet(x, torch.tensor([400.0, 400.0]), context)
        assert torch.allclose(comfy_eps(patcher, x, 400, context), expected, atol=1e-4)


@pytest.mark.parametrize("kind", ["lora", "locon"])
def test_world_lora_loads_with_comfy_lora_loader_and_changes_the_prediction(world, kind):
    import comfy.sd
    import comfy.utils

    built, paths = world
    pretrained, text_encoder = load(nodes, built)
    lora = comfy.utils.load_torch_file(paths[kind], safe_load=True)
    patched, _ = comfy.sd.load_lora_for_models(pretrained, None, lora, 1.0, 0.0)
    layers = FINE_TUNES[kind].lora_layers
    assert set(patched.patches) == {f"diffusion_model.{p}.weight" for p in lora_layer_names(built.unet, layers)}
    x, context = torch.randn(2, 3, 32, 32), text_encoder.encode(CAPTION).expand(2, -1, -1)
    merged = merge_lora(built.unet, lora)
    patched.patch_model()
    try:
        with torch.no_grad():
            assert torch.allclose(comfy_eps(patched, x, 600, context), merged(x, torch.tensor([600.0] * 2), context),
                                  atol=1e-4)
    finally:
        patched.unpatch_model()
    with torch.no_grad():
        assert not torch.allclose(comfy_eps(pretrained, x, 600, context), merged(x, torch.tensor([600.0] * 2), context),
                                  atol=1e-4)
    with pytest.raises(ValueError, match="is a LoRA"):
        load(nodes, built, paths[kind])


@pytest.mark.parametrize("style", sorted(STYLES))
def test_the_guider_samples_a_world_pair(host, world, style):
    import comfy.sd
    import comfy.utils

    built, paths = world
    pretrained, text_encoder = load(nodes, built)
    if style == "lora":
        lora = comfy.utils.load_torch_file(paths["lora"], safe_load=True)
        fine_tuned = comfy.sd.load_lora_for_models(pretrained, None, lora, 1.0, 0.0)[0]
    else:
        fine_tuned = load(nodes, built, os.path.basename(paths["dreambooth"]))[0]
    positive = nodes.WorldTextEncode.execute(text_encoder, CAPTION).args[0]
    negative = nodes.WorldTextEncode.execute(text_encoder, "").args[0]
    guider = host.module("nodes.guider").build_guider(fine_tuned, pretrained, positive, negative, "finextract", 3.0,
                                                      -0.02)
    assert guider.pair.shares_weights == (style == "lora")
    latent = {"samples": torch.zeros(3, 3, 32, 32)}
    samples = host.module("nodes.sampling").sample_with_guider(guider, latent, 0, 3, "ddim", "ddim_uniform", 1.0)
    images = nodes.WorldDecode.execute(samples).args[0]
    assert images.shape == (3, 32, 32, 3) and torch.isfinite(images).all()


def test_world_embed_reads_comfy_images_channel_last():
    """IMAGE is (B, H, W, C); the descriptor works on (B, C, H, W): a transposed layout would mix rows and colours."""

    pictures = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    embedded = nodes.WorldEmbed.execute(pictures.movedim(1, -1)).args[0]
    assert np.allclose(embedded.vectors, highpass_embeddings(pictures).vectors)
    assert embedded.model_id.startswith("world_highpass") and len(embedded) == 3
    # An image and a brightness/contrast change of it have the same fine detail: similarity 1.
    same = nodes.WorldEmbed.execute(torch.cat([pictures[:1], 0.5 * pictures[:1] + 0.2]).movedim(1, -1)).args[0]
    assert float(same.vectors[0] @ same.vectors[1]) == pytest.approx(1.0, abs=1e-5)
