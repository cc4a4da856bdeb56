"""Model guidance (FineXtract, ICML 2025) and its baselines, as one linear combination of model predictions.

Every mode combines up to three predictions at the same noisy input x:

- ``ft_cond``:    the fine-tuned model with the caption c            (eps_ft(c)   or D_ft(c))
- ``pre_uncond``: the pretrained model with the empty caption         (eps_pre(0)  or D_pre(0))
- ``ft_uncond``:  the fine-tuned model with the empty caption         (eps_ft(0)   or D_ft(0))

| mode             | paper  | eps form                                             |
|------------------|--------|------------------------------------------------------|
| ``finextract``     | Eq. 13 | w' eps_ft(c) + (1 - w' + k) eps_pre(0)               |
| ``model_guidance`` | Eq. 6  | w  eps_ft(0) + (1 - w) eps_pre(0)                    |
| ``cfg``            | Eq. 8  | w' eps_ft(c) + (1 - w') eps_ft(0)                    |
| ``direct``         |        | eps_ft(c)                                            |

Eq. 13 as written, eps_ft(c) + (w'-1)(eps_ft(c) - eps_pre(0)) + k eps_pre(0), expands to the first row.

Samplers that work on denoised predictions (ComfyUI's) need the same combination of D = x - sigma * eps. Its
coefficients sum to 1 + k, not 1, so the denoised form carries an extra ``-k * x``:
D = w' D_ft(c) + (1 - w' + k) D_pre(0) - k x.
"""

from __future__ import annotations

import enum
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


@dataclass(frozen=True)
class Coefficients:
    """Weights of each prediction in the guided eps; zero weight means the prediction is not needed."""

    ft_cond: float = 0.0
    pre_uncond: float = 0.0
    ft_uncond: float = 0.0

    @property
    def total(self) -> float:
        return self.ft_cond + self.pre_uncond + self.ft_uncond

    def needs(self, branch: str) -> bool:
        return getattr(self, branch) != 0.0


def coefficients(mode: GuidanceMode | str, scale: float, k: float = 0.0) -> Coefficients:
    """The eps-form weights of ``mode`` at guidance scale ``scale`` (w' or w) and correction ``k``.

    ``k`` only enters ``finextract``; the other modes ignore it (Eq. 6 and 8 have no correction term).
    A weight that comes out exactly zero (say w' = 1 in ``cfg``) drops that model call.
    """
    mode = GuidanceMode(mode)
    if mode is GuidanceMode.FINEXTRACT:
        return Coefficients(ft_cond=scale, pre_uncond=1.0 - scale + k)
    if mode is GuidanceMode.MODEL_GUIDANCE:
        return Coefficients(ft_uncond=scale, pre_uncond=1.0 - scale)
    if mode is GuidanceMode.CFG:
        return Coefficients(ft_cond=scale, ft_uncond=1.0 - scale)
    return Coefficients(ft_cond=1.0)


def combine_eps(coef: Coefficients, predictions: dict[str, torch.Tensor]) -> torch.Tensor:
    """The guided noise prediction from the eps predictions named like the fields of ``coef``."""
    return _weighted_sum(coef, predictions)


def combine_denoised(coef: Coefficients, predictions: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The guided denoised prediction from denoised predictions D = x - sigma * eps at the noisy input ``x``.

    Equal to x - sigma * combine_eps(...) for any sigma, because the weights sum to 1 + k: the surplus k is taken
    back as ``-k * x`` (the term that is easy to miss).
    """
    guided = _weighted_sum(coef, predictions)
    surplus = coef.total - 1.0
    if surplus != 0.0:
        guided = guided - surplus * x
    return guided


def _weighted_sum(coef: Coefficients, predictions: dict[str, torch.Tensor]) -> torch.Tensor:
    total = None
    for branch in ("ft_cond", "pre_uncond", "ft_uncond"):
        weight = getattr(coef, branch)
        if weight == 0.0:
            continue
        if branch not in predictions:
            raise KeyError(f"guidance needs the '{branch}' prediction (weight {weight}) but it was not computed")
        term = predictions[branch] * weight
        total = term if total is None else total + term
    if total is None:
        raise ValueError("every guidance weight is zero: there is nothing to sample from")
    return total
