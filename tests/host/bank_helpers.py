"""Shared by the candidate bank tests: a centred random SSCD file, and comparing two banks candidate by candidate."""

from __future__ import annotations

import os

import torch
from safetensors.torch import save_file

from finextract_core import sscd
from finextract_core.bank import CandidateBank

SSCD_NAME = "sscd_test.safetensors"


def write_test_sscd(folder: str, image_size: int = 64) -> str:
    """A ResNet50 SSCD with seeded random weights, its projection centred on the mean feature of random images: a
    random trunk gives every image nearly the same pooled feature, centring keeps how an image differs from a typical
    one, so different candidates get clearly different descriptors."""
    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(0)
    model = sscd.SSCDModel(sscd.RESNET50, "sscd_test").eval()
    with torch.no_grad():
        typical = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(100))
        typical = torch.nn.functional.interpolate(typical, size=(image_size, image_size), mode="bicubic").clamp(0, 1)
        pooled = model.embeddings[0](model.backbone(sscd.preprocess(typical.permute(0, 2, 3, 1), "paper")))
        projection = model.embeddings[1]
        projection.bias.copy_(-projection.weight @ pooled.mean(dim=0))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(folder, SSCD_NAME))
    return SSCD_NAME


def shard_count(folder: str) -> int:
    return sum(name.startswith("candidates-") for name in os.listdir(folder)) if os.path.isdir(folder) else 0


def assert_same_bank(folder: str, reference: str, count: int, tolerance: float = 0.0) -> None:
    """Both banks hold candidates 0..count-1, each once, with the same latents and embeddings (exactly, or within
    ``tolerance`` of the values' scale where batch composition changes the CPU's summation order)."""
    bank, expected = CandidateBank.read(folder), CandidateBank.read(reference)
    assert bank.indices == expected.indices == set(range(count))
    assert bank.stored_rows == count, f"{bank.stored_rows} stored rows for {count} candidates: some were generated twice"
    wanted = list(range(count))
    for name, actual, target in (("latents", bank.latents(wanted), expected.latents(wanted)),
                                 ("embeddings", torch.from_numpy(bank.embeddings(wanted).vectors.copy()),
                                  torch.from_numpy(expected.embeddings(wanted).vectors.copy()))):
        error = (actual - target).abs().max().item()
        assert error <= tolerance * target.abs().max().item(), f"{name} differ by {error:.3g}"
