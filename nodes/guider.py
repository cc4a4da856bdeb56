"""The ComfyUI side of model guidance: a CFGGuider whose branches run on two different models.

Two ways a fine-tuned MODEL relates to its pretrained MODEL in ComfyUI, both exact here:

(a) two separate checkpoints (DreamBooth): each branch runs on its own weights. The pretrained patcher rides along as
    an additional model of the guider's patcher, so ComfyUI's model management loads (and offloads) both and
    accounts for their memory.
(b) base + LoRA (LoraLoaderModelOnly): the two patchers share one torch module and differ only in weight patches
    that ComfyUI applies in place, so evaluating "both" in one loop would silently use one set of weights. The
    fine-tune's extra patches are turned into a conditioning hook on the fine-tuned branches, and the sampler runs
    the base patcher alone: ComfyUI swaps the LoRA weights in for the hooked rows and out for the others.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

import comfy.hooks
import comfy.model_patcher
import comfy.samplers

from ..finextract_core.guidance import Coefficients, GuidanceMode, coefficients, combine_denoised

LOG = logging.getLogger("finextract")

# Branch name -> the name of its conds inside the guider ("positive" keeps ComfyUI's ControlNet handling).
_COND_NAMES = {"ft_cond": "positive", "pre_uncond": "negative", "ft_uncond": "negative_ft"}
_PRETRAINED_KEY = "finextract_pretrained"


class ModelPairError(ValueError):
    """The two MODEL inputs cannot be used as a (fine-tuned, pretrained) pair; the message says what to do."""


@dataclass
class ModelPair:
    fine_tuned: comfy.model_patcher.ModelPatcher
    pretrained: comfy.model_patcher.ModelPatcher
    lora_hooks: comfy.hooks.HookGroup | None  # set in case (b): the fine-tune's own patches, as a hook group

    @property
    def shares_weights(self) -> bool:
        return self.lora_hooks is not None


def describe_family(patcher) -> str:
    model = patcher.model
    return f"{type(model.model_config).__name__} ({type(model).__name__}, latent {type(model.latent_format).__name__})"


def check_same_family(fine_tuned, pretrained) -> None:
    ft, pre = fine_tuned.model, pretrained.model
    same_classes = (
        type(ft) is type(pre)
        and type(ft.model_config) is type(pre.model_config)
        and type(ft.latent_format) is type(pre.latent_format)
    )
    if same_classes:
        ft_shapes = {k: tuple(v.shape) for k, v in ft.diffusion_model.state_dict().items()}
        pre_shapes = {k: tuple(v.shape) for k, v in pre.diffusion_model.state_dict().items()}
        if ft_shapes == pre_shapes:
            return
        detail = "their denoisers have different layers or shapes"
    else:
        detail = f"fine-tuned is {describe_family(fine_tuned)}, pretrained is {describe_family(pretrained)}"
    raise ModelPairError(
        f"The fine-tuned and pretrained MODELs are of different model families ({detail}). FineXtract compares a "
        "fine-tune with the exact model it was fine-tuned from: load the base checkpoint the fine-tune was trained on "
        "(for example SD 1.5 for an SD 1.5 DreamBooth, SDXL base for an SDXL LoRA)."
    )


def _extra_patches(fine_tuned, pretrained) -> dict[str, list[tuple]]:
    """Weight patches the fine-tuned patcher has on top of the pretrained one (both clones of one module)."""
    extra: dict[str, list[tuple]] = {}
    for key in set(fine_tuned.patches) | set(pretrained.patches):
        ft_entries = fine_tuned.patches.get(key, [])
        pre_entries = pretrained.patches.get(key, [])
        if any(not any(p is f for f in ft_entries) for p in pre_entries):
            raise ModelPairError(
                "The pretrained MODEL carries weight patches (a LoRA?) that the fine-tuned MODEL does not have. Connect "
                "the base model to 'pretrained' and the base model + LoRA to 'fine_tuned' (are the two inputs swapped?)."
            )
        own = [f for f in ft_entries if not any(f is p for p in pre_entries)]
        if own:
            extra[key] = own
    return extra


def _hooks_from_patches(extra: dict[str, list[tuple]]) -> comfy.hooks.HookGroup:
    """One WeightHook per LoRA strength, holding the already-converted patches so ComfyUI replays them exactly."""
    by_strength: dict[float, dict] = {}
    for key, entries in extra.items():
        for strength_patch, value, strength_model, offset, function in entries:
            if strength_model != 1.0:
                raise ModelPairError(
                    f"The fine-tuned MODEL scales the base weight of {key} by {strength_model}; only additive patches "
                    "(LoRA-style loaders) can be separated from a shared base. Load the fine-tune as a separate checkpoint."
                )
            patch_key = key if offset is None and function is None else (key, offset, function)
            by_strength.setdefault(strength_patch, {})[patch_key] = value
    group = comfy.hooks.HookGroup()
    for strength, weights in by_strength.items():
        hook = comfy.hooks.WeightHook(strength_model=strength, strength_clip=0.0)
        hook.weights = weights
        hook.need_weight_init = False
        group.add(hook)
    return group


def pair_models(fine_tuned, pretrained) -> ModelPair:
    """Check the two MODEL inputs and work out how to evaluate each branch exactly."""
    if fine_tuned is pretrained:
        raise ModelPairError(
            "The same MODEL is connected to both 'fine_tuned' and 'pretrained': model guidance needs the fine-tuned "
            "checkpoint (or base + LoRA) and the model it was fine-tuned from."
        )
    check_same_family(fine_tuned, pretrained)
    if not fine_tuned.is_clone(pretrained):
        return ModelPair(fine_tuned, pretrained, lora_hooks=None)
    extra = _extra_patches(fine_tuned, pretrained)
    if not extra:
        raise ModelPairError(
            "'fine_tuned' and 'pretrained' are the same weights: either both come from one loader with no LoRA "
            "between them, or the LoRA between them matches none of this base model's layers (ComfyUI's log then "
            "lists 'lora key not loaded': a LoRA trained for another model family, such as an SDXL LoRA on SD 1.5). "
            "Connect the fine-tuned checkpoint, or the base model the LoRA was trained on through "
            "LoraLoaderModelOnly, to 'fine_tuned'."
        )
    if fine_tuned.object_patches.keys() != pretrained.object_patches.keys():
        LOG.warning("finextract: the fine-tuned MODEL has object patches the pretrained one lacks; they are not applied "
                    "to the fine-tuned branch when the two share a base model")
    return ModelPair(fine_tuned, pretrained, lora_hooks=_hooks_from_patches(extra))


class Guider_ModelGuidance(comfy.samplers.CFGGuider):
    """Samples from w'*D_ft(c) + (1-w'+k)*D_pre(empty) - k*x (FineXtract) or one of its baselines."""

    def __init__(self, pair: ModelPair, mode: GuidanceMode | str, scale: float, k: float):
        self.pair = pair
        self.mode = GuidanceMode(mode)
        self.coef: Coefficients = coefficients(self.mode, scale, k)
        # Only a mode that needs the pretrained branch must split a shared base; cfg and direct run the fine-tune as is.
        self.hooked = pair.shares_weights and self.coef.needs("pre_uncond")
        self.separate_pretrained = not pair.shares_weights and self.coef.needs("pre_uncond")
        if self.hooked:
            patcher = pair.pretrained.clone()
            # MaxSpeed caches the patched weights once, so switching branches each step is a copy, not a re-patch.
            patcher.set_hook_mode(comfy.hooks.EnumHookMode.MaxSpeed)
        else:
            patcher = pair.fine_tuned.clone()
            if self.separate_pretrained:
                patcher.set_additional_models(_PRETRAINED_KEY, [pair.pretrained])
        super().__init__(patcher)
        self._pretrained_options = None

    @property
    def branches(self) -> list[str]:
        return [b for b in _COND_NAMES if self.coef.needs(b)]

    def set_conds(self, positive, negative):
        """``positive``: the caption (fine-tuned branch); ``negative``: the empty caption (pretrained branch, and the
        fine-tuned branch of cfg / model_guidance)."""
        sources = {"ft_cond": positive, "pre_uncond": negative, "ft_uncond": negative}
        conds = {}
        for branch in self.branches:
            cond = sources[branch]
            if self.hooked and branch.startswith("ft_"):
                cond = comfy.hooks.set_hooks_for_conditioning(cond, self.pair.lora_hooks)
            conds[_COND_NAMES[branch]] = cond
        self.inner_set_conds(conds)

    def outer_sample(self, *args, **kwargs):
        if not self.separate_pretrained:
            return super().outer_sample(*args, **kwargs)
        pretrained = self.pair.pretrained
        self._pretrained_options = comfy.model_patcher.create_model_options_clone(pretrained.model_options)
        pretrained.pre_run()
        try:
            return super().outer_sample(*args, **kwargs)
        finally:
            pretrained.cleanup()
            self._pretrained_options = None

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        # With hooks, one patcher serves every branch: ComfyUI groups the conds by hooks and applies the LoRA to
        # the fine-tuned rows only. Otherwise the pretrained branch runs on its own model.
        on_model = [b for b in self.branches if not (self.separate_pretrained and b == "pre_uncond")]
        outputs = comfy.samplers.calc_cond_batch(
            self.inner_model, [self.conds[_COND_NAMES[b]] for b in on_model], x, timestep, model_options)
        predictions = dict(zip(on_model, outputs))
        if self.separate_pretrained:
            predictions["pre_uncond"] = self._predict_pretrained(x, timestep, model_options)
        guided = combine_denoised(self.coef, predictions, x)
        if not torch.isfinite(guided).all():
            raise FloatingPointError(self._non_finite_message(predictions, timestep, model_options))
        return guided

    def _non_finite_message(self, predictions, timestep, model_options) -> str:
        """Names the step and the branch, so a NaN stops the run instead of becoming a black image."""
        sigma = float(timestep.flatten()[0])
        sigmas = model_options.get("transformer_options", {}).get("sample_sigmas")
        step = "?"
        if sigmas is not None:
            step = int((sigmas[:-1] - sigma).abs().argmin()) + 1
            step = f"{step} of {len(sigmas) - 1}"
        broken = [b for b, p in predictions.items() if not torch.isfinite(p).all()] or ["the guided combination"]
        return (f"Sampling produced NaN/inf at step {step} (sigma {sigma:.4g}) in {', '.join(broken)}. Check that the "
                "model files are not corrupt, try fp32 (--force-fp32) if the model runs in fp16, or lower the "
                "guidance scale.")

    def _predict_pretrained(self, x, timestep, model_options):
        options = self._pretrained_options
        sample_sigmas = model_options.get("transformer_options", {}).get("sample_sigmas")
        if sample_sigmas is not None:
            options.setdefault("transformer_options", {})["sample_sigmas"] = sample_sigmas
        return comfy.samplers.calc_cond_batch(
            self.pair.pretrained.model, [self.conds[_COND_NAMES["pre_uncond"]]], x, timestep, options)[0]


def build_guider(fine_tuned, pretrained, positive, negative, mode, scale, k) -> Guider_ModelGuidance:
    guider = Guider_ModelGuidance(pair_models(fine_tuned, pretrained), mode, scale, k)
    guider.set_conds(positive, negative)
    return guider
