"""Model guidance (FineXtract, ICML 2025) and its baselines, as classifier-free guidance between two predictions.

Every mode combines up to two of three predictions at the same noisy input x:

- ``ft_cond``:    the fine-tuned model with the caption c            (eps_ft(c)   or D_ft(c))
- ``pre_uncond``: the pretrained model with the empty caption         (eps_pre(0)  or D_pre(0))
- ``ft_uncond``:  the fine-tuned model with the empty caption         (eps_ft(0)   or D_ft(0))

| mode             | paper  | eps form                                             | as CFG: cond, uncond, scale, k |
|------------------|--------|------------------------------------------------------|--------------------------------|
| ``finextract``     | Eq. 13 | w' eps_ft(c) + (1 - w' + k) eps_pre(0)               | ft_cond, pre_uncond, w', k     |
| ``model_guidance`` | Eq. 6  | w  eps_ft(0) + (1 - w) eps_pre(0)                    | ft_uncond, pre_uncond, w, 0    |
| ``cfg``            | Eq. 8  | w' eps_ft(c) + (1 - w') eps_ft(0)                    | ft_cond, ft_uncond, w', 0      |
| ``direct``         |        | eps_ft(c)                                            | ft_cond, ft_uncond, 1, 0       |

Eq. 13 as written, eps_ft(c) + (w'-1)(eps_ft(c) - eps_pre(0)) + k eps_pre(0), expands to the first row: CFG from
eps_pre(0) towards eps_ft(c) at scale w', plus k eps_pre(0). Written as CFG, each mode can pass through the hooks a
host has for CFG (a replaced CFG formula, functions on the two predictions before it and on its result after).

Samplers that work on denoised predictions (ComfyUI's) need the same combination of D = x - sigma * eps. The
weights sum to 1 + k, not 1, so the denoised form carries the correction as k (D_uncond - x):
D = D_uncond + w' (D_cond - D_uncond) + k (D_uncond - x) = w' D_ft(c) + (1 - w' + k) D_pre(0) - k x.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch


class GuidanceMode(str, enum.Enum):
    FINEXTRACT = "finextract"
    MODEL_GUIDANCE = "model_guidance"
    CFG = "cfg"
    DIRECT = "direct"


# The paper's defaults (Sec. 5.1): DreamBooth w'=3, k=-0.02; LoRA w'=5, k=0; the CFG baseline w'=3.
DREAMBOOTH_DEFAULTS = {"scale": 3.0, "k": -0.02}
LORA_DEFAULTS = {"scale": 5.0, "k": 0.0}
CFG_DEFAULT_SCALE = 3.0
# Flux dev (guidance-distilled; docs/families.md): real model guidance between the two models at w' = 3, the best
# strength of the paper's Flux dev LoRA runs (Appendix H), k = 0 (a LoRA), and the distilled guidance (FluxGuidance)
# at 1 on both conditionings: at 1 the distilled model gives its plain conditional prediction, which Eq. 13 combines;
# above 1 the caption branch would carry a second, fine-tuned-only CFG inside it.
FLUX_DEV_DEFAULTS = {"scale": 3.0, "k": 0.0, "distilled_guidance": 1.0}


@dataclass(frozen=True)
class GuidanceForm:
    """A mode as CFG: D = D_uncond + scale (D_cond - D_uncond) + correction (D_uncond - x), branches named as above."""

    cond: str
    uncond: str
    scale: float
    correction: float = 0.0

    @property
    def uncond_weight(self) -> float:
        """Weight of the uncond prediction in the eps form; zero means it need not be computed."""
        return 1.0 - self.scale + self.correction

    def weight(self, branch: str) -> float:
        return {self.cond: self.scale, self.uncond: self.uncond_weight}.get(branch, 0.0)


def guidance_form(mode: GuidanceMode | str, scale: float, k: float = 0.0) -> GuidanceForm:
    """``mode`` at guidance scale ``scale`` (w' or w) and correction ``k``, written as CFG.

    ``k`` only enters ``finextract``; the other modes ignore it (Eq. 6 and 8 have no correction term). A NaN or
    infinite value is refused here, before any sampling, naming the input it came from.
    """
    for name, value in (("guidance_scale", scale), ("k", k)):
        if not math.isfinite(value):
            raise ValueError(
                f"'{name}' is {value}: it must be a finite number (the paper uses w' = {DREAMBOOTH_DEFAULTS['scale']} "
                f"and k = {DREAMBOOTH_DEFAULTS['k']} for DreamBooth, w' = {LORA_DEFAULTS['scale']} and k = "
                f"{LORA_DEFAULTS['k']} for LoRA). A NaN or inf usually comes from a linked math or primitive node: "
                f"check what feeds '{name}'.")
    mode = GuidanceMode(mode)
    if mode is GuidanceMode.FINEXTRACT:
        return GuidanceForm("ft_cond", "pre_uncond", scale, k)
    if mode is GuidanceMode.MODEL_GUIDANCE:
        return GuidanceForm("ft_uncond", "pre_uncond", scale)
    if mode is GuidanceMode.CFG:
        return GuidanceForm("ft_cond", "ft_uncond", scale)
    return GuidanceForm("ft_cond", "ft_uncond", 1.0)


def cfg_combination(form: GuidanceForm, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
    """The CFG part, D_uncond + scale (D_cond - D_uncond): what a host may replace with a formula of its own."""
    return uncond + (cond - uncond) * form.scale


def apply_correction(form: GuidanceForm, cfg_result: torch.Tensor, uncond: torch.Tensor,
                     x: torch.Tensor) -> torch.Tensor:
    """The guided denoised prediction from the CFG part: adds k (D_uncond - x), the term that is easy to miss.

    Equal to x - sigma * (guided eps) for any sigma, because the eps weights sum to 1 + k. An uncond prediction
    that was not computed (weight zero) may be given as zeros: it then cancels exactly.
    """
    if form.correction == 0.0:
        return cfg_result
    return cfg_result + (uncond - x) * form.correction
