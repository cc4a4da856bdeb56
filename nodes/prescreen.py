"""Memorisation Pre-screen: how far a fine-tune's prediction departs from its base's on its own caption, from a few
denoiser evaluations (finextract_core/audit/prescreen.py says what is measured and where it comes from). The
finextract-audit command queues it to order many models before their extractions; in a graph it is a quick look.

Each model is evaluated on its own, by ComfyUI's own CFGGuider at cfg 1 (one pass on the caption), over one Euler
step from the noise level to 0, whose denoised prediction the sampler's callback hands over: ComfyUI loads and
patches each MODEL as for any sampler, so a LoRA on a shared base is exact here without the guider's hooks.
"""

from __future__ import annotations

import comfy.sample
import comfy.samplers
import torch
from comfy_api.latest import io

from ..finextract_core.audit.prescreen import (DEFAULT_SAMPLES, LEVELS, LevelDeparture, eps_departure,
                                               prescreen_noise, prescreen_score)
from .guider import MODEL_SAMPLING, pair_models

CATEGORY = "FineXtract/audit"


def denoised_at(model, conditioning, noise: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    """The model's denoised prediction D(x, sigma | conditioning) at x = sigma * noise (the model's latent space)."""
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(conditioning, conditioning)  # cfg 1 skips the unconditional pass: the negative is never used
    guider.set_cfg(1.0)
    captured = []
    guider.sample(noise, torch.zeros_like(noise), comfy.samplers.sampler_object("euler"), torch.tensor([sigma, 0.0]),
                  callback=lambda step, denoised, x, total: captured.append(denoised.detach().cpu()),
                  disable_pbar=True, seed=seed)
    return captured[0]


class MemorisationPrescreen(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FineXtractMemorisationPrescreen",
            display_name="Memorisation Pre-screen (FineXtract)",
            category=CATEGORY,
            description="How strongly the fine-tune's noise prediction departs from its base model's on its own "
                        "caption (Wen et al., ICLR 2024, measure memorisation by such a departure): "
                        f"{2 * len(LEVELS)} batched denoiser evaluations, to rank many models before extracting. A "
                        "ranking aid, not evidence: the extraction and its scores are the test.",
            inputs=[
                io.Model.Input("fine_tuned", tooltip="The fine-tuned model: a DreamBooth checkpoint, or the base "
                               "through LoraLoaderModelOnly."),
                io.Model.Input("pretrained", tooltip="The base model it was fine-tuned from."),
                io.Conditioning.Input("positive", tooltip="The fine-tune's caption (or the empty prompt when none "
                                      "is known), encoded with the base's text encoder."),
                io.Latent.Input("latent_image", tooltip="Gives the size only (EmptyLatentImage at the resolution "
                                "the model was trained at)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Seed of the noise draws: the same seed gives the same score."),
                io.Int.Input("samples", default=DEFAULT_SAMPLES, min=1, max=64,
                             tooltip="Noise draws per level (one batch): more is steadier and costs more."),
            ],
            outputs=[io.Float.Output(display_name="score", tooltip="RMS of eps_ft - eps_pre per element, mean over "
                                     "the noise levels: 0 when the fine-tune predicts what its base does."),
                     io.String.Output(display_name="details_json", tooltip="Each level's sigma and departure.")],
            is_output_node=True,  # queued alone by the audit, which reads the score from the node's UI values
        )

    @classmethod
    def execute(cls, fine_tuned, pretrained, positive, latent_image, seed, samples) -> io.NodeOutput:
        pair_models(fine_tuned, pretrained)  # the same MODEL twice, two families, or a LoRA that patches nothing
        shape = tuple(comfy.sample.fix_empty_latent_channels(fine_tuned, latent_image["samples"]).shape[1:])
        noise = prescreen_noise(seed, samples, shape)
        sampling = fine_tuned.get_model_object(MODEL_SAMPLING)
        sigmas = [float(sampling.percent_to_sigma(percent)) for percent in LEVELS]
        # Each model evaluates every level in turn, so a LoRA's patches are applied and removed once.
        tuned = [denoised_at(fine_tuned, positive, noise, sigma, seed) for sigma in sigmas]
        base = [denoised_at(pretrained, positive, noise, sigma, seed) for sigma in sigmas]
        result = prescreen_score([LevelDeparture(percent, sigma, eps_departure(t, b, sigma))
                                  for percent, sigma, t, b in zip(LEVELS, sigmas, tuned, base)], samples, seed)
        text = (f"memorisation pre-screen: {result.score:.4f} (" +
                ", ".join(f"{level.departure:.4f} at sigma {level.sigma:.3g}" for level in result.levels) + ")")
        return io.NodeOutput(result.score, result.to_json(),
                             ui={"finextract_prescreen": [result.to_dict()], "text": [text]})


NODES = [MemorisationPrescreen]
