"""The pack's sampler behaves as KSampler does, and non-finite guidance values are refused before any work.

Ground truth for the first: ComfyUI's own KSampler node. Direct mode is the fine-tuned model with the caption and no
guidance, which is KSampler at cfg 1 on it, so the two must give the same latent bit for bit (noise from the seed
and batch_index, sigmas, per-step noise of an ancestral sampler, a noise mask), on the same device, in the same dtype
and with the same keys (newer ComfyUI casts to its intermediate dtype and drops an empty latent's downscale ratio).
"""

from __future__ import annotations

import math

import pytest
import torch

from fixtures.guidance_checks import conditioning, sd15_models

STEPS = 3


@pytest.fixture(scope="module")
def models(host, tmp_path_factory):
    built = sd15_models(tmp_path_factory.mktemp("sampler-output"))
    return built["base"], built["dreambooth"]


@pytest.mark.parametrize("sampler_name", ["euler_ancestral", "dpmpp_2m"])
def test_direct_mode_gives_ksamplers_latent(host, models, sampler_name):
    base, dreambooth = models
    nodes = host.nodes.NODE_CLASS_MAPPINGS
    caption, empty = conditioning(768, 5), conditioning(768, 6)
    mask = torch.zeros(1, 8, 8)
    mask[:, :, 4:] = 1.0  # denoise the right half only
    start = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    # EmptyLatentImage of newer ComfyUI adds the downscale ratio, which its KSampler reads and drops.
    latent = {"samples": start, "batch_index": [5, 9], "noise_mask": mask, "downscale_ratio_spacial": 8}
    expected = nodes["KSampler"]().sample(dreambooth, 11, STEPS, 1.0, sampler_name, "karras", caption, empty,
                                          latent, denoise=0.8)[0]
    ours = nodes["FineXtractModelGuidanceSampler"].execute(
        dreambooth, base, caption, empty, "direct", 1.0, 0.0, latent, 11, STEPS, sampler_name, "karras", 0.8).args[0]
    assert ours.keys() == expected.keys()
    assert ours["samples"].dtype == expected["samples"].dtype and ours["samples"].device == expected["samples"].device
    assert torch.equal(ours["samples"], expected["samples"]), (ours["samples"] - expected["samples"]).abs().max()
    assert torch.allclose(ours["samples"][..., :4], start[..., :4], atol=1e-5), "the noise mask was not honoured"
    assert not torch.equal(ours["samples"][..., 4:], start[..., 4:]), "nothing was sampled"


@pytest.mark.parametrize(("name", "scale", "k"), [("guidance_scale", math.nan, 0.0), ("guidance_scale", math.inf, 0.0),
                                                  ("k", 3.0, math.nan), ("k", 3.0, -math.inf)])
def test_non_finite_guidance_values_are_refused_naming_the_input(host, models, name, scale, k):
    base, dreambooth = models
    nodes = host.nodes.NODE_CLASS_MAPPINGS
    caption, empty = conditioning(768, 5), conditioning(768, 6)
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    value = scale if name == "guidance_scale" else k
    message = rf"'{name}' is {value}: it must be a finite number .* check what feeds '{name}'"
    with pytest.raises(ValueError, match=message):
        nodes["FineXtractModelGuidanceSampler"].execute(dreambooth, base, caption, empty, "finextract", scale, k,
                                                        latent, 0, STEPS, "ddim", "ddim_uniform", 1.0)
    # Up front: before the models are even looked at (the same MODEL twice would be refused otherwise).
    with pytest.raises(ValueError, match=message):
        nodes["FineXtractModelGuidanceGuider"].execute(base, base, caption, empty, "finextract", scale, k)
