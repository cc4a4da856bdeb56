"""Shared by the candidate bank tests: a centred random SSCD file, the bank's API prompt for a real server, and
comparing two banks candidate by candidate."""

from __future__ import annotations

import os

import torch
from safetensors.torch import save_file

from finextract_core.bank import CandidateBank
from demo_models import attack_prompt, centred_random_sscd

SSCD_NAME = "sscd_test.safetensors"
BANK_ID = "FineXtractCandidateBank"


def write_test_sscd(folder: str) -> str:
    """The demo's seeded, centred random SSCD (see demo_models.centred_random_sscd) as a file in ``folder``."""
    os.makedirs(folder, exist_ok=True)
    save_file(centred_random_sscd(), os.path.join(folder, SSCD_NAME))
    return SSCD_NAME


def bank_prompt(folder: str, count: int, batch: int, steps: int, sscd_model: str = SSCD_NAME) -> dict:
    """The demo LoRA attack (loaders and text encoders of demo_models.attack_prompt) with the Candidate Bank in place of the sampler."""
    prompt = attack_prompt(["lora", 0], "unused", guidance_scale=5.0, k=0.0, steps=steps)
    sample = prompt.pop("sample")["inputs"]
    del prompt["decode"], prompt["save"]
    inputs = {name: sample[name] for name in ("fine_tuned", "pretrained", "positive", "negative", "mode",
                                              "guidance_scale", "k", "latent_image", "seed", "steps",
                                              "sampler_name", "scheduler")}
    prompt["bank"] = {"class_type": BANK_ID, "inputs": {
        **inputs, "vae": ["base", 2], "sscd_model": sscd_model, "preset": "paper", "num_candidates": count,
        "first_candidate": 0, "batch_size": batch, "bank_folder": folder}}
    return prompt


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
