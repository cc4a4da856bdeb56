"""Model guidance in a world whose denoisers are exact, wrapped as ComfyUI models and sampled by the pack's sampler.

Pretrained distribution p = N(0, I) in a 16-d latent (4 x 2 x 2); fine-tuning data q = five points. The fine-tuned
model follows the paper's Eq. 3-4 at every noise level: its score is (1 - lambda) score_p + lambda score_q, so its
denoiser is D_ft = (1 - lambda) D_p + lambda D_q, with the exact denoisers
    D_p(x, s) = x / (1 + s^2)            and      D_q(x, s) = sum_j softmax_j(-|x - q_j|^2 / 2 s^2) q_j.
Model guidance at w = 1/lambda gives w D_ft + (1 - w) D_p = D_q exactly, so an ODE sampler must end on the points;
the fine-tuned model alone ends on a blend of its noise and the points.
"""

from __future__ import annotations

import functools

import torch

LAMBDA = 0.25
POINTS = 5
LATENT = (4, 2, 2)
# A sample "lands" on a training point when it is within this distance of it; the points are ~4 apart.
TOLERANCE = 0.05


class ClosedFormDenoiser(torch.nn.Module):
    """Exact eps prediction of (1 - lam) p + lam q in ComfyUI's UNet calling convention (the caption is ignored)."""

    def __init__(self, lam: float = 0.0, seed: int = 0, **_unet_config):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        points = torch.randn(POINTS, *LATENT, generator=gen) * 1.5
        self.register_buffer("points", points)
        self.register_buffer("lam", torch.tensor(float(lam)))
        self.dtype = torch.float32  # ComfyUI asks its denoisers for their dtype

    def forward(self, xc, timesteps, context=None, transformer_options={}, **kwargs):
        sigma = transformer_options["sigmas"].to(xc).view(-1, 1, 1, 1)
        x = xc * (sigma ** 2 + 1).sqrt()  # undo ComfyUI's EPS input scaling
        d_p = x / (1 + sigma ** 2)
        flat, points = x.flatten(1), self.points.flatten(1)
        logits = -torch.cdist(flat, points) ** 2 / (2 * sigma.view(-1, 1) ** 2)
        d_q = (logits.softmax(dim=1) @ points).view_as(x)
        denoised = (1 - self.lam) * d_p + self.lam * d_q
        return (x - denoised) / sigma


@functools.cache
def toy_config_class():
    """One model-config class for both toy models: they are one family, as a base and its fine-tune are."""
    import comfy.latent_formats
    import comfy.supported_models_base

    class ToyConfig(comfy.supported_models_base.BASE):
        latent_format = comfy.latent_formats.LatentFormat  # scale 1: latents are the data

    return ToyConfig


def closed_form_model(lam: float):
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher

    config = toy_config_class()({"lam": lam, "seed": 0})
    model = comfy.model_base.BaseModel(config, unet_model=ClosedFormDenoiser)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def landed_fraction(samples: torch.Tensor, points: torch.Tensor) -> float:
    distances = torch.cdist(samples.flatten(1), points.flatten(1)).min(dim=1).values
    return (distances < TOLERANCE).float().mean().item()


def test_model_guidance_at_inverse_lambda_samples_the_fine_tuning_points(host):
    pretrained, fine_tuned = closed_form_model(0.0), closed_form_model(LAMBDA)
    points = fine_tuned.model.diffusion_model.points
    context = [[torch.zeros(1, 1, 8), {}]]  # any caption: the toy models ignore it
    latent = {"samples": torch.zeros(64, *LATENT)}
    sample = host.module("nodes.sampling").sample_with_guider

    def run(mode, scale, k=0.0):
        guider = host.module("nodes.guider").build_guider(fine_tuned, pretrained, context, context, mode, scale, k)
        return sample(guider, latent, seed=3, steps=40, sampler_name="euler", scheduler="karras", denoise=1.0)["samples"]

    guided = {mode: landed_fraction(run(mode, 1 / LAMBDA), points) for mode in ("model_guidance", "finextract")}
    alone = landed_fraction(run("direct", 1.0), points)
    assert guided["model_guidance"] >= 0.95, guided
    assert guided["finextract"] >= 0.95, guided  # Eq. 13 with k = 0 on a caption-blind model is Eq. 6
    assert alone <= 0.2, f"the fine-tuned model alone landed {alone:.0%} of its samples on the points"
    # Under-guiding (w = 1) is the fine-tuned model itself: guidance strength is what moves samples onto the data.
    assert landed_fraction(run("model_guidance", 1.0), points) == alone


def test_nan_prediction_stops_with_the_step_named(host):
    import pytest

    pretrained, fine_tuned = closed_form_model(0.0), closed_form_model(LAMBDA)
    fine_tuned.model.diffusion_model.points[0, 0, 0, 0] = float("nan")  # a corrupt weight in the fine-tune
    context = [[torch.zeros(1, 1, 8), {}]]
    guider = host.module("nodes.guider").build_guider(fine_tuned, pretrained, context, context, "finextract", 3.0, -0.02)
    with pytest.raises(FloatingPointError, match=r"NaN/inf at step 1 of 10 .* in ft_cond"):
        host.module("nodes.sampling").sample_with_guider(guider, {"samples": torch.zeros(2, *LATENT)}, seed=0, steps=10,
                                               sampler_name="euler", scheduler="normal", denoise=1.0)


def test_sampler_node_reports_its_settings(host):
    import json

    sampler = host.nodes.NODE_CLASS_MAPPINGS["FineXtractModelGuidanceSampler"]
    context = [[torch.zeros(1, 1, 8), {}]]
    latent, settings_json, settings = sampler.execute(
        closed_form_model(LAMBDA), closed_form_model(0.0), context, context, "finextract", 4.0, -0.02,
        {"samples": torch.zeros(3, *LATENT)}, 5, 6, "euler", "karras", 1.0).args
    assert latent["samples"].shape == (3, *LATENT)
    assert json.loads(settings_json) == settings.to_dict() == {
        "mode": "finextract", "guidance_scale": 4.0, "k": -0.02, "seed": 5, "steps": 6, "sampler": "euler",
        "scheduler": "karras", "denoise": 1.0, "candidates": 3, "first_candidate": 0, "noise": "ksampler-batch",
        "latent_shape": list(LATENT), "model_family": "ToyConfig (BaseModel, latent LatentFormat)",
        "fine_tune": "separate checkpoints", "pack_version": host.module("finextract_core").__version__,
    }
