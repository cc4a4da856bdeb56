"""The sampling nodes: Model Guidance Guider (a GUIDER for SamplerCustomAdvanced) and Model Guidance Sampler (an
all-in-one KSampler), both around Guider_ModelGuidance (guider.py); the KSampler loop they share with the bank, and
the one place their run settings are made."""

from __future__ import annotations

import inspect

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
from comfy_api.latest import io

from ..finextract_core import __version__
from ..finextract_core.guidance import (
    CFG_DEFAULT_SCALE,
    DREAMBOOTH_DEFAULTS,
    FLUX_DEV_DEFAULTS,
    LORA_DEFAULTS,
    GuidanceMode,
)
from ..finextract_core.run_settings import RunSettings
from .guider import Guider_ModelGuidance, build_guider, describe_family
from .types import RUN_SETTINGS

CATEGORY = "FineXtract/sampling"
# The sampler's noise: ComfyUI's KSampler noise, one generator seeded with the seed for the whole batch, so candidate
# i depends on the batch it is in (the Candidate Bank's per-candidate scheme does not).
KSAMPLER_NOISE = "ksampler-batch"
_DOWNSCALE_RATIO_KEYS = ("downscale_ratio_spacial", "downscale_ratio_temporal")


def _guidance_inputs() -> list:
    return [
        io.Model.Input("fine_tuned", tooltip="The fine-tuned model under audit: a DreamBooth checkpoint, or the base "
                       "model through LoraLoaderModelOnly for a LoRA."),
        io.Model.Input("pretrained", tooltip="The model it was fine-tuned from (the same base checkpoint)."),
        io.Conditioning.Input("positive", tooltip="The training caption (for example 'sks style'), encoded with the "
                              "fine-tuned model's CLIP. Ignored by model_guidance. Flux dev: through FluxGuidance "
                              f"{FLUX_DEV_DEFAULTS['distilled_guidance']} (the distilled model's plain conditional "
                              "prediction, which Eq. 13 guides; a higher value adds a second CFG inside it)."),
        io.Conditioning.Input("negative", tooltip="The empty prompt, encoded with the pretrained model's CLIP: the "
                              "unconditional branch. Flux dev: through FluxGuidance "
                              f"{FLUX_DEV_DEFAULTS['distilled_guidance']} too (without it ComfyUI uses 3.5)."),
        io.Combo.Input("mode", options=[m.value for m in GuidanceMode], default=GuidanceMode.FINEXTRACT.value,
                       tooltip="finextract: Eq. 13, fine-tuned(caption) guided away from pretrained(empty). "
                       "model_guidance: Eq. 6, no caption. Baselines on the same sampler and seeds: cfg "
                       "(classifier-free guidance on the fine-tuned model) and direct (fine-tuned model with the "
                       "caption, no guidance)."),
        io.Float.Input("guidance_scale", default=DREAMBOOTH_DEFAULTS["scale"], min=0.0, max=100.0, step=0.1,
                       round=0.01, tooltip=f"w' (w for model_guidance). Paper defaults: {DREAMBOOTH_DEFAULTS['scale']} "
                       f"for DreamBooth, {LORA_DEFAULTS['scale']} for LoRA fine-tunes, {CFG_DEFAULT_SCALE} for the cfg "
                       f"baseline; {FLUX_DEV_DEFAULTS['scale']} for a Flux dev LoRA (the paper's best on Flux dev, "
                       "Appendix H: real guidance between the two models, the distilled guidance at 1)."),
        io.Float.Input("k", default=DREAMBOOTH_DEFAULTS["k"], min=-1.0, max=1.0, step=0.01, round=0.001,
                       tooltip=f"Correction term scale of Eq. 13 (finextract only). Paper defaults: "
                       f"{DREAMBOOTH_DEFAULTS['k']} for DreamBooth, {LORA_DEFAULTS['k']} for LoRA fine-tunes."),
    ]


def sampling_inputs() -> list:
    """seed, steps, sampler_name, scheduler: shared with the candidate bank."""
    return [
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                     tooltip="Noise seed; the same seed gives the same candidates in every mode."),
        io.Int.Input("steps", default=50, min=1, max=10000, tooltip="Sampling steps (the paper: 50 DDIM steps)."),
        io.Combo.Input("sampler_name", options=comfy.samplers.SAMPLER_NAMES, default="ddim",
                       tooltip="Sampling algorithm; keep it fixed when comparing modes."),
        io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="ddim_uniform",
                       tooltip="Noise schedule; keep it fixed when comparing modes."),
    ]


class ModelGuidanceGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FineXtractModelGuidanceGuider",
            display_name="Model Guidance Guider (FineXtract)",
            category=CATEGORY,
            description="A GUIDER for SamplerCustomAdvanced that samples the fine-tuning data of a DreamBooth or LoRA "
                        "model with model guidance (FineXtract, ICML 2025) or one of its baselines.",
            inputs=_guidance_inputs(),
            outputs=[io.Guider.Output()],
        )

    @classmethod
    def execute(cls, fine_tuned, pretrained, positive, negative, mode, guidance_scale, k) -> io.NodeOutput:
        return io.NodeOutput(build_guider(fine_tuned, pretrained, positive, negative, mode, guidance_scale, k))


class ModelGuidanceSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FineXtractModelGuidanceSampler",
            display_name="Model Guidance Sampler (FineXtract)",
            category=CATEGORY,
            description="KSampler with model guidance between a fine-tuned and its pretrained model: generates the "
                        "candidates from which the fine-tuning images are extracted.",
            inputs=_guidance_inputs() + [
                io.Latent.Input("latent_image",
                                tooltip="The latent batch to denoise (EmptyLatentImage for new candidates)."),
                *sampling_inputs(),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="1.0 samples from pure noise; lower values start from latent_image."),
            ],
            # Slot 1 stays the JSON text it was before the typed output existed, so saved workflows keep their links.
            outputs=[io.Latent.Output(),
                     io.String.Output(display_name="settings_json", tooltip="The run settings as JSON, to read."),
                     RUN_SETTINGS.Output(display_name="run_settings",
                                         tooltip="Everything that determined the candidates, for the Audit Report.")],
        )

    @classmethod
    def execute(cls, fine_tuned, pretrained, positive, negative, mode, guidance_scale, k, latent_image, seed, steps,
                sampler_name, scheduler, denoise) -> io.NodeOutput:
        guider = build_guider(fine_tuned, pretrained, positive, negative, mode, guidance_scale, k)
        samples = sample_with_guider(guider, latent_image, seed, steps, sampler_name, scheduler, denoise)
        settings = describe_run(guider, mode, guidance_scale, k, seed, steps, sampler_name, scheduler, denoise,
                                latent_shape=tuple(samples["samples"].shape[1:]),
                                candidates=int(samples["samples"].shape[0]), first_candidate=0, noise=KSAMPLER_NOISE)
        return io.NodeOutput(samples, settings.to_json(), settings)


def describe_run(guider: Guider_ModelGuidance, mode: str, guidance_scale: float, k: float, seed: int, steps: int,
                 sampler_name: str, scheduler: str, denoise: float, *, latent_shape: tuple[int, ...], candidates: int,
                 first_candidate: int, noise: str) -> RunSettings:
    """The run settings of a sampling node's inputs (the sampler's and the Candidate Bank's alike)."""
    return RunSettings(
        mode=mode, guidance_scale=guidance_scale, k=k, seed=seed, steps=steps, sampler=sampler_name,
        scheduler=scheduler, denoise=denoise, latent_shape=tuple(int(d) for d in latent_shape), candidates=candidates,
        first_candidate=first_candidate, noise=noise, model_family=describe_family(guider.pair.fine_tuned),
        fine_tune="base + LoRA (shared weights)" if guider.pair.shares_weights else "separate checkpoints",
        pack_version=__version__)


def sample_with_guider(guider, latent, seed, steps, sampler_name, scheduler, denoise, noise=None,
                       step_noise=None) -> dict:
    """KSampler's noise, sigmas, progress bar, cancel and output latent, with our guider in place of CFG.

    ``noise`` replaces KSampler's initial noise and ``step_noise`` the noise that ancestral and SDE samplers draw at
    each step (the candidate bank makes both per candidate, so a candidate does not depend on its batch).
    """
    patcher = guider.model_patcher
    # Newer ComfyUI's empty latents say how far they are downscaled; its KSampler passes that on and drops it after.
    reads_ratios = _DOWNSCALE_RATIO_KEYS[0] in inspect.signature(comfy.sample.fix_empty_latent_channels).parameters
    ratios = [latent.get(key) for key in _DOWNSCALE_RATIO_KEYS] if reads_ratios else []
    samples = comfy.sample.fix_empty_latent_channels(patcher, latent["samples"], *ratios)
    if noise is None:
        noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))
    # KSampler computes the sigmas for (steps, denoise) and drops the penultimate one where a sampler asks for it.
    sigmas = comfy.samplers.KSampler(patcher, steps=steps, device=patcher.load_device, sampler=sampler_name,
                                     scheduler=scheduler, denoise=denoise).sigmas
    callback = latent_preview.prepare_callback(patcher, steps)
    sampler = comfy.samplers.sampler_object(sampler_name)
    if step_noise is not None and "noise_sampler" in inspect.signature(sampler.sampler_function).parameters:
        sampler.extra_options = {**sampler.extra_options, "noise_sampler": step_noise}  # never mutate the shared default
    samples = guider.sample(noise, samples, sampler, sigmas,
                            denoise_mask=latent.get("noise_mask"), callback=callback,
                            disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    out = {key: value for key, value in latent.items() if not (reads_ratios and key in _DOWNSCALE_RATIO_KEYS)}
    # Where KSampler puts its output: the intermediate device, and on ComfyUI versions that have one, its dtype.
    intermediate_dtype = getattr(comfy.model_management, "intermediate_dtype", None)
    out["samples"] = samples.to(device=comfy.model_management.intermediate_device(),
                                dtype=intermediate_dtype() if intermediate_dtype else None)
    return out


NODES = [ModelGuidanceGuider, ModelGuidanceSampler]
