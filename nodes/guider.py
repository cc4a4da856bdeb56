"""The ComfyUI side of model guidance: a CFGGuider whose branches run on two different models.

Three ways the fine-tuned branch and the pretrained branch are evaluated, all exact:

(a) two separate checkpoints (DreamBooth): each branch runs on its own weights. The pretrained patcher rides along as
    an additional model of the guider's patcher, so ComfyUI's model management loads (and offloads) both and
    accounts for their memory.
(b) base + LoRA or LoCon (LoraLoaderModelOnly): the two patchers share one torch module and differ only in weight
    patches that ComfyUI applies in place, so evaluating "both" in one loop would silently use one set of weights.
    The sampler runs the base alone, in one forward over every row as CFG does, and the fine-tune's low-rank
    patches are added to the fine-tuned rows as a side branch beside each layer (lora_branch.py).
(c) base + another adapter (LoHa, LoKr, OFT, DoRA, full weight differences): the fine-tune's extra patches become a
    conditioning hook on the fine-tuned branches, and ComfyUI swaps them into the weights for the hooked rows.

Shared patches (a style LoRA loaded on both inputs) stay in the base in (b) and (c): only the fine-tune's own
patches, found by content, go to the branch or the hook. The guidance itself is CFG between two predictions
(finextract_core.guidance), so the CFG patches a model carries (RescaleCFG's formula, pre- and post-CFG functions)
are replayed on it, as ComfyUI's own cfg_function and Guider_PerpNeg do.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

import comfy.hooks
import comfy.model_patcher
import comfy.patcher_extension
import comfy.samplers
import comfy.weight_adapter

from ..finextract_core.guidance import (
    FLUX_DEV_DEFAULTS,
    GuidanceMode,
    apply_correction,
    cfg_combination,
    guidance_form,
)
from .lora_branch import WRAPPER_KEY, NoLowRankForm, SideBranch, side_branch_for

LOG = logging.getLogger("finextract")

# Branch name -> the name of its conds inside the guider ("positive" keeps ComfyUI's ControlNet handling).
_COND_NAMES = {"ft_cond": "positive", "pre_uncond": "negative", "ft_uncond": "negative_ft"}
_PRETRAINED_KEY = "finextract_pretrained"
# The model options through which nodes such as RescaleCFG, CFGZeroStar or APG patch CFG; the guider replays them.
_CFG_FUNCTION = "sampler_cfg_function"
_PRE_CFG_FUNCTIONS = "sampler_pre_cfg_function"
_POST_CFG_FUNCTIONS = "sampler_post_cfg_function"
_CFG_PATCHES = (_CFG_FUNCTION, _PRE_CFG_FUNCTIONS, _POST_CFG_FUNCTIONS)
_NO_CFG1_SHORTCUT = "disable_cfg1_optimization"
# The object that holds the sigma schedule (ModelSamplingFlux, ModelSamplingSD3 and the like replace it).
MODEL_SAMPLING = "model_sampling"
# Replaces ComfyUI's batching of the model calls, which the guider does itself: refused.
_CALC_COND_BATCH_FUNCTION = "sampler_calc_cond_batch_function"


class ModelPairError(ValueError):
    """The two MODEL inputs cannot be used as a (fine-tuned, pretrained) pair; the message says what to do."""


@dataclass
class ModelPair:
    fine_tuned: comfy.model_patcher.ModelPatcher
    pretrained: comfy.model_patcher.ModelPatcher
    # Set when the two share a base (LoRA): the fine-tune's own patches, as a side branch (b) or a hook group (c).
    side_branch: SideBranch | None = None
    lora_hooks: comfy.hooks.HookGroup | None = None
    hook_reason: str = ""  # why a shared-base pair takes the hook path

    @property
    def shares_weights(self) -> bool:
        return self.side_branch is not None or self.lora_hooks is not None


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


def _same_content(a, b) -> bool:
    """Two patch values hold the same numbers: the same LoRA file loaded by two loader nodes gives equal, not
    identical, tensors."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b.to(a.device)))
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same_content, a, b))
    if isinstance(a, comfy.weight_adapter.WeightAdapterBase) or isinstance(b, comfy.weight_adapter.WeightAdapterBase):
        return type(a) is type(b) and _same_content(a.weights, b.weights)
    return a == b


def _same_patch(a: tuple, b: tuple) -> bool:
    """Patch entries (strength, value, strength_model, offset, function) that change a weight identically."""
    return (a is b or (a[0] == b[0] and a[2] == b[2] and a[3] == b[3] and a[4] is b[4]
                       and _same_content(a[1], b[1])))


def _is_additive(entry: tuple) -> bool:
    """Adds a difference that does not depend on the weight it is added to, so its order among patches is free."""
    value, strength_model, function = entry[1], entry[2], entry[4]
    if strength_model != 1.0 or function is not None:
        return False
    if isinstance(value, comfy.weight_adapter.LoRAAdapter):
        return value.weights[4] is None  # DoRA renormalises the merged weight
    return isinstance(value, tuple) and len(value) == 2 and value[0] == "diff"


def _extra_patches(fine_tuned, pretrained) -> dict[str, list[tuple]]:
    """Weight patches the fine-tuned patcher has on top of the pretrained one (both clones of one module)."""
    extra: dict[str, list[tuple]] = {}
    for key in sorted(set(fine_tuned.patches) | set(pretrained.patches)):
        ft_entries = fine_tuned.patches.get(key, [])
        shared = [False] * len(ft_entries)
        for pre_entry in pretrained.patches.get(key, []):
            match = next((i for i, f in enumerate(ft_entries) if not shared[i] and _same_patch(pre_entry, f)), None)
            if match is None:
                raise ModelPairError(
                    "The pretrained MODEL carries weight patches (a LoRA?) that the fine-tuned MODEL does not have, or "
                    "has at another strength. Connect the base model (with any LoRA shared by both, at the same "
                    "strength) to 'pretrained' and the same plus the audited LoRA to 'fine_tuned' (are the two "
                    "inputs swapped?)."
                )
            shared[match] = True
        own = [f for f, is_shared in zip(ft_entries, shared) if not is_shared]
        if not own:
            continue
        # The base gets the shared patches first and the fine-tune's own on top: exact only if the fine-tune applied
        # them in that order too, or if every patch on this weight is a plain difference (order-free).
        first_own = shared.index(False)
        if any(shared[first_own:]) and not all(map(_is_additive, ft_entries)):
            raise ModelPairError(
                f"On {key} the fine-tuned MODEL applies its own patches before a shared one that depends on the weight "
                "(a DoRA or a scaled merge), so the pair cannot be split exactly. Load the shared LoRA first and the "
                "audited LoRA after it on the 'fine_tuned' input."
            )
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


def pair_models(fine_tuned, pretrained, allow_side_branch: bool = True) -> ModelPair:
    """Check the two MODEL inputs and work out how to evaluate each branch exactly.

    ``allow_side_branch=False`` puts every shared-base pair on the hook path (tests and benchmarks compare the two).
    """
    if fine_tuned is pretrained:
        raise ModelPairError(
            "The same MODEL is connected to both 'fine_tuned' and 'pretrained': model guidance needs the fine-tuned "
            "checkpoint (or base + LoRA) and the model it was fine-tuned from."
        )
    check_same_family(fine_tuned, pretrained)
    if not fine_tuned.is_clone(pretrained):
        return ModelPair(fine_tuned, pretrained)
    own_injections = set(getattr(fine_tuned, "injections", {})) - set(getattr(pretrained, "injections", {}))
    if own_injections:
        raise ModelPairError(
            f"The fine-tuned MODEL changes the base's forward pass itself ({', '.join(sorted(own_injections))}: a LoRA "
            "loaded in bypass mode, for example), which model guidance cannot keep to the fine-tuned rows of a shared "
            "base. Load the LoRA with LoraLoaderModelOnly instead."
        )
    extra = _extra_patches(fine_tuned, pretrained)
    if not extra:
        raise ModelPairError(
            "'fine_tuned' and 'pretrained' are the same weights: either both come from one loader with no LoRA "
            "between them, or the LoRA between them matches none of this base model's layers (ComfyUI's log then "
            "lists 'lora key not loaded': a LoRA trained for another model family, such as an SDXL LoRA on SD 1.5). "
            "Connect the fine-tuned checkpoint, or the base model the LoRA was trained on through "
            "LoraLoaderModelOnly, to 'fine_tuned'."
        )
    # The schedule (model_sampling) is taken from the fine-tuned MODEL by the guider; other object patches are not.
    own_objects = fine_tuned.object_patches.keys() - {MODEL_SAMPLING}
    if own_objects != pretrained.object_patches.keys() - {MODEL_SAMPLING}:
        LOG.warning("finextract: the fine-tuned MODEL has object patches the pretrained one lacks; they are not applied "
                    "to the fine-tuned branch when the two share a base model")
    reason = "the side branch was turned off"
    if any(p.get_additional_models_with_key("multigpu") for p in (fine_tuned, pretrained)):
        # ComfyUI then runs parts of a batch on other devices' copies of the model, at the same time: ComfyUI carries
        # hooks over to those copies, the side branch's layer hooks are on this copy only.
        reason, allow_side_branch = "the model is spread over several GPUs (MultiGPU)", False
    if allow_side_branch:
        try:
            return ModelPair(fine_tuned, pretrained, side_branch=side_branch_for(fine_tuned.model, extra))
        except NoLowRankForm as no_form:
            reason = str(no_form)
    LOG.info("finextract: the fine-tune's patches run as conditioning hooks: %s", reason)
    return ModelPair(fine_tuned, pretrained, lora_hooks=_hooks_from_patches(extra), hook_reason=reason)


def _describe_functions(functions) -> str:
    return ", ".join(getattr(f, "__qualname__", repr(f)) for f in functions)


def _cfg_patches(options: dict) -> dict[str, list]:
    """The CFG patches in a model's options, each as a list of functions."""
    found = {}
    for key in _CFG_PATCHES:
        value = options.get(key)
        if value:
            found[key] = list(value) if isinstance(value, list) else [value]
    return found


def check_cfg_patches(fine_tuned, pretrained, uses_pretrained: bool) -> None:
    """Refuses CFG patches the guider cannot honour, naming them: a replaced batching of the model calls, and CFG
    patches on the pretrained MODEL alone (they patch the guided result, which the fine-tuned MODEL's options carry)."""
    for role, patcher in (("fine-tuned", fine_tuned), ("pretrained", pretrained)):
        function = patcher.model_options.get(_CALC_COND_BATCH_FUNCTION)
        if function is not None and (role == "fine-tuned" or uses_pretrained):
            raise ModelPairError(
                f"The {role} MODEL carries a patch that replaces how ComfyUI batches the model calls "
                f"({_CALC_COND_BATCH_FUNCTION}: {_describe_functions([function])}, set by a node such as "
                "SkipLayerGuidanceDiTSimple). Model guidance makes its own model calls and cannot apply it: remove that node "
                "from the MODEL's path."
            )
    if not uses_pretrained:
        return
    ft_patches = _cfg_patches(fine_tuned.model_options)
    for key, functions in _cfg_patches(pretrained.model_options).items():
        missing = [f for f in functions if f not in ft_patches.get(key, [])]
        if missing:
            raise ModelPairError(
                f"The pretrained MODEL carries a CFG patch that the fine-tuned MODEL lacks ({key}: "
                f"{_describe_functions(missing)}). Model guidance applies CFG patches to the guided result, which is "
                "the fine-tuned model's: put the patch node (RescaleCFG, CFGZeroStar, ...) on the 'fine_tuned' path, "
                "or on the base before it branches to both inputs."
            )


class Guider_ModelGuidance(comfy.samplers.CFGGuider):
    """Samples from w'*D_ft(c) + (1-w'+k)*D_pre(empty) - k*x (FineXtract) or one of its baselines."""

    def __init__(self, pair: ModelPair, mode: GuidanceMode | str, scale: float, k: float):
        self.pair = pair
        self.mode = GuidanceMode(mode)
        self.form = guidance_form(self.mode, scale, k)
        options = pair.fine_tuned.model_options
        # As ComfyUI at cfg 1: the uncond prediction is skipped when its weight is zero, unless a patch asks for it.
        skip_uncond = self.form.uncond_weight == 0.0 and not options.get(_NO_CFG1_SHORTCUT, False)
        self.branches = [self.form.cond] + ([] if skip_uncond else [self.form.uncond])
        uses_pretrained = "pre_uncond" in self.branches
        check_cfg_patches(pair.fine_tuned, pair.pretrained, uses_pretrained)
        # Only a mode that needs the pretrained branch must split a shared base; cfg and direct run the fine-tune as is.
        self.side_branch = pair.side_branch if uses_pretrained else None
        self.hooked = pair.lora_hooks is not None and uses_pretrained
        self.separate_pretrained = not pair.shares_weights and uses_pretrained
        if pair.shares_weights and uses_pretrained:
            patcher = pair.pretrained.clone()
            # The base runs every branch, but the CFG patches to replay are the fine-tuned MODEL's.
            for key in (*_CFG_PATCHES, _NO_CFG1_SHORTCUT):
                patcher.model_options.pop(key, None)
                if key in options:
                    value = options[key]
                    patcher.model_options[key] = list(value) if isinstance(value, list) else value
            # The sampling schedule is the fine-tuned MODEL's, as on the DreamBooth path (a ModelSamplingFlux /
            # ModelSamplingSD3 shift put on the LoRA's path only would otherwise be lost on the shared base).
            schedule = pair.fine_tuned.get_model_object(MODEL_SAMPLING)
            if schedule is not pair.pretrained.get_model_object(MODEL_SAMPLING):
                patcher.add_object_patch(MODEL_SAMPLING, schedule)
            if self.side_branch is not None:
                patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY,
                                             self.side_branch.apply_model_wrapper)
            else:
                # MaxSpeed caches the patched weights once, so switching branches each step is a copy, not a re-patch.
                patcher.set_hook_mode(comfy.hooks.EnumHookMode.MaxSpeed)
        else:
            patcher = pair.fine_tuned.clone()
            if self.separate_pretrained:
                patcher.set_additional_models(_PRETRAINED_KEY, [pair.pretrained])
        super().__init__(patcher)
        self._pretrained_options = None

    @property
    def lora_path(self) -> str | None:
        """How the fine-tuned rows get the LoRA in this run: "side branch", "conditioning hooks", or None."""
        if self.side_branch is not None:
            return "side branch"
        return "conditioning hooks" if self.hooked else None

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
        with contextlib.ExitStack() as running:
            if self.side_branch is not None:
                running.enter_context(self.side_branch.attached())
            if self.separate_pretrained:
                running.enter_context(self._pretrained_loaded())
            return super().outer_sample(*args, **kwargs)

    @contextlib.contextmanager
    def _pretrained_loaded(self):
        pretrained = self.pair.pretrained
        self._pretrained_options = comfy.model_patcher.create_model_options_clone(pretrained.model_options)
        pretrained.pre_run()
        try:
            yield
        finally:
            pretrained.cleanup()
            self._pretrained_options = None

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        predictions = self._predict(x, timestep, model_options)
        guided = self._guide(predictions, x, timestep, model_options)
        if not torch.isfinite(guided).all():
            raise FloatingPointError(self._non_finite_message(predictions, timestep, model_options))
        return guided

    def _predict(self, x, timestep, model_options) -> dict[str, torch.Tensor]:
        # With a side branch or hooks, one patcher serves every branch in one batch: the LoRA reaches the
        # fine-tuned rows only. Otherwise the pretrained branch runs on its own model.
        on_model = [b for b in self.branches if not (self.separate_pretrained and b == "pre_uncond")]
        if self.side_branch is not None:
            self.side_branch.fine_tuned_uuids = frozenset(
                c["uuid"] for b in on_model if b.startswith("ft_") for c in self.conds[_COND_NAMES[b]])
        outputs = comfy.samplers.calc_cond_batch(
            self.inner_model, [self.conds[_COND_NAMES[b]] for b in on_model], x, timestep, model_options)
        predictions = dict(zip(on_model, outputs))
        if self.separate_pretrained:
            predictions["pre_uncond"] = self._predict_pretrained(x, timestep, model_options)
        return predictions

    def _guide(self, predictions, x, timestep, model_options) -> torch.Tensor:
        """CFG between the mode's two predictions with the host's CFG patches replayed, as comfy.samplers'
        sampling_function and cfg_function do; then model guidance's correction term."""
        form = self.form
        conds = [self.conds.get(_COND_NAMES[form.cond]), self.conds.get(_COND_NAMES[form.uncond])]
        # A skipped uncond is zeros, as ComfyUI's at cfg 1; its weight is zero, so it cancels.
        out = [predictions[form.cond], predictions.get(form.uncond)]
        if out[1] is None:
            out[1] = torch.zeros_like(out[0])
        for function in model_options.get(_PRE_CFG_FUNCTIONS, []):
            out = function({"conds": conds, "conds_out": out, "cond_scale": form.scale, "timestep": timestep,
                            "input": x, "sigma": timestep, "model": self.inner_model, "model_options": model_options})
        cond_pred, uncond_pred = out
        if _CFG_FUNCTION in model_options:
            result = x - model_options[_CFG_FUNCTION]({
                "cond": x - cond_pred, "uncond": x - uncond_pred, "cond_scale": form.scale, "timestep": timestep,
                "input": x, "sigma": timestep, "cond_denoised": cond_pred, "uncond_denoised": uncond_pred,
                "model": self.inner_model, "model_options": model_options, "input_cond": conds[0],
                "input_uncond": conds[1]})
        else:
            result = cfg_combination(form, cond_pred, uncond_pred)
        guided = apply_correction(form, result, uncond_pred, x)
        for function in model_options.get(_POST_CFG_FUNCTIONS, []):
            guided = function({"denoised": guided, "cond": conds[0], "uncond": conds[1], "cond_scale": form.scale,
                               "model": self.inner_model, "uncond_denoised": uncond_pred, "cond_denoised": cond_pred,
                               "sigma": timestep, "model_options": model_options, "input": x})
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


def distilled_guidance_advice(fine_tuned, positive, negative) -> str | None:
    """For a guidance-distilled model (Flux dev), what is off with the distilled guidance its two conditionings
    carry (FluxGuidance's value, which ComfyUI reads per conditioning), or None. Not an error: a choice of the user's,
    but one that changes what Eq. 13 combines (docs/families.md)."""
    if not fine_tuned.model.model_config.unet_config.get("guidance_embed", False):
        return None
    values = {role: sorted({c[1].get("guidance") for c in conds}, key=str)
              for role, conds in (("positive", positive), ("negative", negative))}
    missing = [role for role, found in values.items() if None in found]
    if missing:
        return (f"finextract: the {' and '.join(missing)} conditioning of this guidance-distilled model (Flux dev) "
                f"carries no FluxGuidance value, so ComfyUI samples it at 3.5; the FineXtract template puts FluxGuidance "
                f"{FLUX_DEV_DEFAULTS['distilled_guidance']} on both prompts, so that the caption branch is the "
                "model's plain conditional prediction that model guidance combines")
    if values["positive"] != values["negative"]:
        return (f"finextract: the caption's distilled guidance ({values['positive']}) differs from the empty "
                f"prompt's ({values['negative']}); the FineXtract template puts FluxGuidance "
                f"{FLUX_DEV_DEFAULTS['distilled_guidance']} on both")
    return None


def build_guider(fine_tuned, pretrained, positive, negative, mode, scale, k,
                 allow_side_branch: bool = True) -> Guider_ModelGuidance:
    guidance_form(mode, scale, k)  # refuses NaN / inf guidance values before the models are looked at
    guider = Guider_ModelGuidance(pair_models(fine_tuned, pretrained, allow_side_branch), mode, scale, k)
    guider.set_conds(positive, negative)
    if "pre_uncond" in guider.branches:
        advice = distilled_guidance_advice(fine_tuned, positive, negative)
        if advice:
            LOG.warning(advice)
    return guider
