"""The Candidate Bank on a Flux-shaped model (ComfyUI's Flux dev class at a reduced size, base + a diffusers-format
LoRA, a 16-channel VAE): candidate i does not depend on the batch size, a stopped run resumes to the same candidates,
and Flux's 16-channel latents, its latent format's scale and shift, and the shifted sigmas of ModelSamplingFlux pass
through the bank's key and seeding unchanged: a bank candidate equals ComfyUI's own SamplerCustomAdvanced run on the
Model Guidance Guider with that candidate's noise and ModelSamplingFlux's sigmas.
"""

from __future__ import annotations

import pytest
import torch

from fixtures import tiny_dits
from fixtures.bank_helpers import SSCD_NAME, assert_same_bank, shard_count, write_test_sscd
from tools.host.comfy_inprocess import host_module

bank_module = host_module("finextract_core.bank")
COUNT, STEPS, SIZE = 3, 2, 64
BATCH_TOLERANCE = 1e-4  # another batch size sums in another order on the CPU: equal to rounding


@pytest.fixture(scope="module")
def setup(host, tmp_path_factory):
    import comfy.sd

    folder = tmp_path_factory.mktemp("flux-bank")
    host.folder_paths.add_model_folder_path("sscd", str(folder / "sscd"))
    host.folder_paths.add_model_folder_path("finextract_banks", str(folder / "banks"))
    write_test_sscd(str(folder / "sscd"))
    nodes = host.nodes.NODE_CLASS_MAPPINGS
    base, weights = tiny_dits.patcher("flux", seed=1)
    lora = tiny_dits.lora_file("flux", tiny_dits.lora_factors("flux", weights, seed=3), "transformer")
    with_lora = comfy.sd.load_lora_for_models(base, None, lora, 1.0, 0.0)[0]
    # The shift for this resolution, on the audited model's path, as a Flux workflow has it.
    shifted = nodes["ModelSamplingFlux"]().patch(with_lora, 1.15, 0.5, SIZE, SIZE)[0]
    latent = nodes["EmptySD3LatentImage"].execute(SIZE, SIZE, 1).args[0]
    inputs = dict(fine_tuned=shifted, pretrained=base, positive=tiny_dits.conditioning("flux", 5, guidance=1.0),
                  negative=tiny_dits.conditioning("flux", 6, guidance=1.0, tokens=3), mode="finextract",
                  guidance_scale=3.0, k=0.0, latent_image=latent, seed=11, steps=STEPS, sampler_name="euler",
                  scheduler="simple", vae=tiny_dits.taesd16_vae(), sscd_model=SSCD_NAME, preset="paper")
    return {"nodes": nodes, "folder": folder / "banks", "inputs": inputs, "unshifted": with_lora}


def run_bank(setup, name, num_candidates=COUNT, batch_size=COUNT, **changes):
    node = setup["nodes"]["FineXtractCandidateBank"]
    return node.execute(**{**setup["inputs"], **changes}, num_candidates=num_candidates, first_candidate=0,
                        batch_size=batch_size, bank_folder=str(setup["folder"] / name)).args


def test_flux_candidates_do_not_depend_on_the_batch_and_resume(setup):
    folder = lambda name: str(setup["folder"] / name)  # noqa: E731
    *_, settings = run_bank(setup, "whole", batch_size=2)  # batches 0-1, 2
    assert settings.latent_shape == (16, SIZE // 8, SIZE // 8)
    assert settings.model_family == "Flux (Flux, latent Flux)" and settings.fine_tune == "base + LoRA (shared weights)"
    run_bank(setup, "one_by_one", batch_size=1)
    assert shard_count(folder("one_by_one")) == COUNT
    assert_same_bank(folder("one_by_one"), folder("whole"), COUNT, BATCH_TOLERANCE)
    # Stopped after its first batch, then queued again: the rest is made, as in the uninterrupted run.
    run_bank(setup, "resumed", num_candidates=2, batch_size=2)
    run_bank(setup, "resumed", batch_size=2)
    assert shard_count(folder("resumed")) == 2
    assert_same_bank(folder("resumed"), folder("whole"), COUNT)
    latents = bank_module.CandidateBank.read(folder("whole")).latents(list(range(COUNT)))
    assert (latents[0] - latents[1]).abs().max() > 0.1, "different candidates must come from different noise"


def test_ancestral_step_noise_is_per_candidate_on_flux(setup):
    folder = lambda name: str(setup["folder"] / name)  # noqa: E731
    run_bank(setup, "ancestral_whole", batch_size=2, sampler_name="euler_ancestral")
    run_bank(setup, "ancestral_single", batch_size=1, sampler_name="euler_ancestral")
    assert_same_bank(folder("ancestral_single"), folder("ancestral_whole"), COUNT, BATCH_TOLERANCE)


class _CandidateNoise:
    """A NOISE for SamplerCustomAdvanced that gives the bank's initial noise of the candidates ``indices``."""

    def __init__(self, seed, indices, shape):
        self.seed, self.indices, self.shape = seed, indices, shape

    def generate_noise(self, input_latent):
        return bank_module.candidate_noise(self.seed, self.indices, self.shape)


def test_a_bank_candidate_is_comfyuis_own_run_with_its_noise_and_shifted_sigmas(setup):
    """Ground truth outside the bank's code: ComfyUI's SamplerCustomAdvanced (its own latent format handling, the
    sigmas of BasicScheduler on the shifted model) on the Model Guidance Guider node, with candidate 1's noise."""
    nodes, inputs = setup["nodes"], setup["inputs"]
    run_bank(setup, "reference")
    shape = (16, SIZE // 8, SIZE // 8)
    guider = nodes["FineXtractModelGuidanceGuider"].execute(
        *(inputs[name] for name in ("fine_tuned", "pretrained", "positive", "negative", "mode", "guidance_scale",
                                    "k"))).args[0]
    sigmas = nodes["BasicScheduler"].execute(inputs["fine_tuned"], "simple", STEPS, 1.0).args[0]
    unshifted = nodes["BasicScheduler"].execute(setup["unshifted"], "simple", STEPS, 1.0).args[0]
    assert (sigmas - unshifted).abs().max() > 1e-3, "the shift must change the sigmas, or this test is blind to it"
    sampler = nodes["KSamplerSelect"].execute("euler").args[0]
    latent = {"samples": torch.zeros((1, *shape))}
    own = nodes["SamplerCustomAdvanced"].execute(_CandidateNoise(11, [1], shape), guider, sampler, sigmas,
                                                 latent).args[0]["samples"]
    stored = bank_module.CandidateBank.read(str(setup["folder"] / "reference")).latents([1])
    error = (stored - own).abs().max().item()
    assert error <= BATCH_TOLERANCE * own.abs().max().item(), f"bank candidate 1 differs from ComfyUI's run by {error}"


def test_another_shift_is_another_bank(setup):
    """The shift is in the bank's key: a bank of the same settings at another shift is refused, naming the field;
    a model with its own schedule (no ModelSamplingFlux) has no such field."""
    nodes = setup["nodes"]
    run_bank(setup, "shift", num_candidates=1)
    other = nodes["ModelSamplingFlux"]().patch(setup["unshifted"], 2.0, 0.5, SIZE, SIZE)[0]
    with pytest.raises(bank_module.BankError, match="model_sampling"):
        run_bank(setup, "shift", num_candidates=1, fine_tuned=other)
    run_bank(setup, "own_schedule", num_candidates=1, fine_tuned=setup["unshifted"])
    key = bank_module.read_manifest(str(setup["folder"] / "own_schedule"))["key"]
    assert "model_sampling" not in key and key["latent_shape"] == [16, SIZE // 8, SIZE // 8]
    assert "model_sampling" in bank_module.read_manifest(str(setup["folder"] / "shift"))["key"]
