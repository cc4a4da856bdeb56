"""SSCD rebuild: exact key layouts, identical descriptors to an independently built network, safe file loading.

The reference networks are torchvision's ResNet/ResNeXt classes (which the product never uses) with SSCD's GeM head;
the Classy Vision key names are produced here by a mapping written independently of the product's.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet
from torchvision.transforms.v2 import functional as TF

from finextract_core import sscd
from finextract_core.embeddings import Embeddings
from finextract_core.sscd_layouts import load_state_dict_strict, to_classy_layout
from finextract_core.sscd_network import RESNET50, RESNEXT101_32X4D, SSCDModel
from finextract_core.threads import torch_threads


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """On the shared 2-core machine, two intra-op threads per forward ran 30x slower than one."""
    with torch_threads(1):
        yield


class ReferenceGeM(nn.Module):
    def forward(self, x):
        return x.clamp(min=1e-6).pow(3.0).mean(dim=(2, 3)).pow(1.0 / 3.0)


class ReferenceSSCD(nn.Module):
    """SSCD's torchvision-backbone model: resnet with GeM as avgpool, fc = projection, then L2 normalisation."""

    def __init__(self, blocks, groups, width_per_group, dim):
        super().__init__()
        self.backbone = ResNet(Bottleneck, blocks, groups=groups, width_per_group=width_per_group, num_classes=dim)
        self.backbone.avgpool = ReferenceGeM()

    def forward(self, x):
        return F.normalize(self.backbone(x), dim=1)


def randomise(model: nn.Module, seed: int) -> nn.Module:
    """Random weights *and* BatchNorm statistics, so that every tensor of the file influences the descriptor."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif name.endswith(("bn.weight", "bn1.weight", "bn2.weight", "bn3.weight", "_module.1.weight")):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * 0.5 + 0.5)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * (2.0 / max(tensor[0].numel(), 1)) ** 0.5)
    return model.eval()


def classy_name(torchvision_key: str) -> str:
    """The Classy Vision name of a ``backbone.*`` torchvision ResNet key (written from the SSCD/Classy sources)."""
    parts = torchvision_key.split(".")
    assert parts[0] == "backbone"
    head = parts[1]
    if head == "fc":
        return "embeddings.1." + parts[2]
    if head == "conv1":
        return "backbone.initial_block._module.0." + parts[2]
    if head == "bn1":
        return "backbone.initial_block._module.1." + parts[2]
    stage = int(head[len("layer"):]) - 1
    block = f"backbone.blocks.{stage}.block{stage}-{parts[2]}"
    layer, rest = parts[3], ".".join(parts[4:])
    if layer == "downsample":
        return f"{block}.downsample.{rest}"
    position = {"conv1": "0", "bn1": "1", "conv2": "3", "bn2": "4", "conv3": "6"}
    if layer == "bn3":
        return f"{block}.bn.{rest}"
    return f"{block}.convolutional_block.{position[layer]}.{rest}"


@pytest.fixture(scope="module")
def resnet50_reference():
    return randomise(ReferenceSSCD([3, 4, 6, 3], groups=1, width_per_group=64, dim=512), seed=1)


@pytest.fixture(scope="module")
def resnext_reference():
    return randomise(ReferenceSSCD([3, 4, 23, 3], groups=32, width_per_group=4, dim=1024), seed=2)


@pytest.fixture(scope="module")
def inputs():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def assert_same_descriptors(model: nn.Module, reference: nn.Module, x: torch.Tensor) -> None:
    with torch.inference_mode():
        ours, theirs = model(x), reference(x)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-6)
    torch.testing.assert_close(ours.norm(dim=1), torch.ones(x.shape[0]), rtol=0, atol=1e-5)


def test_sscd_classy_and_torchvision_files_load_resnet50_with_identical_descriptors(resnet50_reference, inputs,
                                                                                    tmp_path):
    torchvision_layout = resnet50_reference.state_dict()
    classy_layout = {classy_name(k): v for k, v in torchvision_layout.items()}
    assert set(classy_layout) == set(SSCDModel(RESNET50).state_dict())  # exact key match, no extras

    torch.save(classy_layout, tmp_path / "sscd_disc_mixup.classy.pt")
    torch.save(torchvision_layout, tmp_path / "sscd_disc_mixup.torchvision.pt")
    save_file({k: v.contiguous() for k, v in classy_layout.items()}, str(tmp_path / "sscd_disc_mixup.safetensors"))
    for name in ("sscd_disc_mixup.classy.pt", "sscd_disc_mixup.torchvision.pt", "sscd_disc_mixup.safetensors"):
        model = sscd.load_sscd_model(str(tmp_path / name))
        assert model.architecture == RESNET50
        assert model.model_id == "sscd_disc_mixup"
        assert_same_descriptors(model, resnet50_reference, inputs)


def test_sscd_torchscript_tensors_are_read_without_running_the_archive(resnet50_reference, inputs, tmp_path,
                                                                     monkeypatch):
    # A torchvision-layout archive (as released for the ResNet50 models) scripted from the independent reference ...
    scripted = torch.jit.script(resnet50_reference)
    scripted.save(str(tmp_path / "sscd_disc_mixup.torchscript.pt"))
    # ... and a Classy-layout archive (the layout of sscd_disc_large's) traced from the rebuild holding those weights.
    classy = SSCDModel(RESNET50, "rebuild")
    load_state_dict_strict(classy, {classy_name(k): v for k, v in resnet50_reference.state_dict().items()})
    torch.jit.trace(classy.eval(), inputs, check_trace=False).save(str(tmp_path / "classy_layout.torchscript.pt"))

    def refuse(*args, **kwargs):
        raise AssertionError("torch.jit.load must not be called")

    monkeypatch.setattr(torch.jit, "load", refuse)
    for name in ("sscd_disc_mixup.torchscript.pt", "classy_layout.torchscript.pt"):
        loaded = sscd.load_sscd_model(str(tmp_path / name))
        assert loaded.architecture == RESNET50
        assert_same_descriptors(loaded, scripted, inputs)  # the TorchScript program and the rebuild agree
        assert_same_descriptors(loaded, resnet50_reference, inputs)


def test_sscd_resnext101_loads_from_classy_file_with_identical_descriptors(resnext_reference, inputs, tmp_path):
    classy_layout = {classy_name(k): v for k, v in resnext_reference.state_dict().items()}
    assert set(classy_layout) == set(SSCDModel(RESNEXT101_32X4D).state_dict())
    assert set(to_classy_layout(resnext_reference.state_dict())) == set(classy_layout)
    torch.save(classy_layout, tmp_path / "sscd_disc_large.classy.pt")
    model = sscd.load_sscd_model(str(tmp_path / "sscd_disc_large.classy.pt"))
    assert model.architecture == RESNEXT101_32X4D
    assert (model.model_id, model.architecture.embedding_dim) == ("sscd_disc_large", 1024)
    assert_same_descriptors(model, resnext_reference, inputs)


def test_sscd_missing_and_corrupt_files_name_the_download_address(tmp_path, resnet50_reference):
    with pytest.raises(FileNotFoundError, match=r"dl\.fbaipublicfiles\.com/sscd-copy-detection/<name>\.<format>\.pt"):
        sscd.load_sscd_model(str(tmp_path / "sscd_disc_large.torchscript.pt"))
    corrupt = tmp_path / "sscd_disc_mixup.classy.pt"
    corrupt.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    with pytest.raises(ValueError, match="sscd-copy-detection/<name>"):
        sscd.load_sscd_model(str(corrupt))
    extra = {classy_name(k): v for k, v in resnet50_reference.state_dict().items()}
    extra["embeddings.2.weight"] = torch.zeros(3)
    torch.save(extra, tmp_path / "extra.classy.pt")
    with pytest.raises(ValueError, match="1 unexpected"):
        sscd.load_sscd_model(str(tmp_path / "extra.classy.pt"))


def test_sscd_presets_match_torchvision_transforms():
    images = torch.rand(2, 300, 420, 3, generator=torch.Generator().manual_seed(3))
    chw = images.permute(0, 3, 1, 2)
    expected_paper = TF.normalize(TF.center_crop(TF.resize(chw, [256], antialias=True), [224]), [0.5] * 3, [0.5] * 3)
    torch.testing.assert_close(sscd.preprocess(images, "paper"), expected_paper, rtol=0, atol=1e-5)
    expected_sscd = TF.normalize(TF.resize(chw, [288], antialias=True), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert sscd.preprocess(images, "sscd").shape == (2, 3, 288, 403)
    torch.testing.assert_close(sscd.preprocess(images, "sscd"), expected_sscd, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="unknown SSCD preset"):
        sscd.preprocess(images, "imagenet")
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        sscd.preprocess(chw, "paper")


class TinyDescriptor(nn.Module):
    """Stands in for SSCDModel in the batching test: what matters is the chunking, not the network."""

    model_id = "tiny"

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=4)

    def forward(self, x):
        return F.normalize(self.conv(x).mean(dim=(2, 3)), dim=1)


def test_sscd_embed_images_is_batch_independent_and_labelled():
    torch.manual_seed(4)
    model = TinyDescriptor()
    images = torch.rand(5, 40, 50, 3)
    batched = sscd.embed_images(model, images, "sscd", batch_size=5)
    chunked = sscd.embed_images(model, images, "sscd", batch_size=2)
    single = sscd.embed_images(model, images[3:4], "sscd")
    assert isinstance(batched, Embeddings)
    assert (batched.model_id, batched.preset, batched.vectors.shape) == ("tiny", "sscd", (5, 8))
    np.testing.assert_allclose(batched.vectors, chunked.vectors, atol=1e-6)
    np.testing.assert_allclose(batched.vectors[3:4], single.vectors, atol=1e-6)
    with torch.inference_mode():
        expected = model(sscd.preprocess(images, "sscd"))
    np.testing.assert_allclose(batched.vectors, expected.numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="only used on CUDA"):
        sscd.embed_images(model, images, dtype=torch.float16, device="cpu")
