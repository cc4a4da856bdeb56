"""CLIP embedder through open_clip with random weights (no network): file loading, preprocessing, provenance, and
the message when open_clip is not installed."""
import json
import sys

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torchvision.transforms.v2 import functional as TF

from finextract_core import clip_embed
from finextract_core.embeddings import Embeddings

TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_architecture(tmp_path_factory):
    config_file = tmp_path_factory.mktemp("open_clip_configs") / "finextract-tiny-vit.json"
    config_file.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(str(config_file))
    return "finextract-tiny-vit"


def test_clip_embedder_loads_local_weights_and_labels_embeddings(tiny_architecture, tmp_path):
    torch.manual_seed(0)
    reference, _, transform = open_clip.create_model_and_transforms(tiny_architecture, pretrained=None)
    reference.eval()
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(weights))

    embedder = clip_embed.load_clip_embedder(tiny_architecture, str(weights))
    assert embedder.model_id == f"open_clip:{tiny_architecture}:{clip_embed.file_sha256_prefix(str(weights))}"
    assert embedder.preprocessing.preset == "open_clip:64px:bicubic:openai"

    images = torch.rand(3, 80, 96, 3, generator=torch.Generator().manual_seed(1))
    embeddings = clip_embed.embed_images_clip(embedder, images, batch_size=2)
    assert isinstance(embeddings, Embeddings)
    assert embeddings.vectors.shape == (3, 32)
    assert (embeddings.model_id, embeddings.preset) == (embedder.model_id, "open_clip:64px:bicubic:openai")

    # Ground truth: open_clip's own model on torchvision's tensor transforms with the same configuration.
    chw = images.permute(0, 3, 1, 2)
    expected_input = TF.normalize(
        TF.center_crop(TF.resize(chw, [64], interpolation=TF.InterpolationMode.BICUBIC, antialias=True), [64])
        .clamp(0, 1), list(open_clip.OPENAI_DATASET_MEAN), list(open_clip.OPENAI_DATASET_STD))
    with torch.inference_mode():
        expected = F.normalize(reference.encode_image(expected_input), dim=1)
    np.testing.assert_allclose(embeddings.vectors, expected.numpy(), atol=1e-5)


def test_clip_embedder_random_weights_and_errors(tiny_architecture, tmp_path):
    embedder = clip_embed.load_clip_embedder(tiny_architecture, None, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert embedder.model_id == f"open_clip:{tiny_architecture}:untrained"
    assert embedder.preprocessing.preset == "open_clip:64px:bicubic:half"
    with pytest.raises(FileNotFoundError, match="CLIP weight file not found"):
        clip_embed.load_clip_embedder(tiny_architecture, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        clip_embed.load_clip_embedder("no-such-arch", None)
    with pytest.raises(ValueError, match="only used on CUDA"):
        clip_embed.embed_images_clip(embedder, torch.rand(1, 64, 64, 3), dtype=torch.float16)


def test_without_open_clip_the_message_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # what an absent package looks like to import
    with pytest.raises(ImportError, match=r"needs the optional package open-clip-torch.*pip install.*restart ComfyUI"):
        clip_embed.load_clip_embedder("ViT-B-32", None)
