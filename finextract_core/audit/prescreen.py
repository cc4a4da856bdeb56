"""The memorisation pre-screen: a few denoiser evaluations that say how far a fine-tune's prediction departs from its
base model's on its own caption, so that an audit of many models can run the likeliest memorisers first and skip the
models that barely moved.

The measure follows the memorisation-detection literature. Wen et al. ("Detecting, Explaining, and Mitigating
Memorization in Diffusion Models", ICLR 2024) find memorised prompts by the magnitude of the text-conditional noise
prediction, ||eps(x_t, c) - eps(x_t, empty)||, and find it already at the first sampling step. For a fine-tune the
question is about the model rather than the prompt, and FineXtract's own model (Eq. 4 in eps form: eps_ft = (1 -
lambda) eps_pre + lambda eps_q) gives the difference to take: eps_ft(x_t, c) - eps_pre(x_t, c) = lambda (eps_q -
eps_pre), which grows with lambda, how far fine-tuning moved the model toward its training images (and is the term
model guidance amplifies). The score is its root mean square per element, averaged over ``len(LEVELS)`` noise levels
and ``samples`` seeded noise draws: 2 x levels batched denoiser evaluations per model. Noise predictions have unit
variance per element, so the score reads alike across families (0: the fine-tune predicts what its base does).

A ranking aid, not evidence: a high score says the model moved far from its base on that caption (a strong
fine-tune), not that it memorised anyone's images; the extraction and its scores against the references are the test.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import torch

# Where on the sampling schedule the two models are compared (ComfyUI's percent: 0 = pure noise, 1 = the image).
LEVELS = (0.25, 0.5, 0.75)
DEFAULT_SAMPLES = 4


@dataclass(frozen=True)
class LevelDeparture:
    percent: float
    sigma: float
    departure: float  # RMS per element of eps_ft - eps_pre at this noise level


@dataclass(frozen=True)
class PrescreenScore:
    score: float
    levels: tuple[LevelDeparture, ...]
    samples: int
    seed: int

    def to_dict(self) -> dict:
        return {"score": self.score, "levels": [asdict(level) for level in self.levels], "samples": self.samples,
                "seed": self.seed, "measure": "RMS of eps_ft(x_t, c) - eps_pre(x_t, c), mean over noise levels"}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def eps_departure(fine_tuned_denoised: torch.Tensor, pretrained_denoised: torch.Tensor, sigma: float) -> float:
    """RMS per element of eps_ft - eps_pre from the two denoised predictions D at the same input x_t: eps = (x_t -
    D) / sigma, so the difference is (D_pre - D_ft) / sigma and x_t cancels."""
    if fine_tuned_denoised.shape != pretrained_denoised.shape:
        raise ValueError(f"the two predictions differ in shape: {tuple(fine_tuned_denoised.shape)} vs "
                         f"{tuple(pretrained_denoised.shape)}")
    if not sigma > 0:
        raise ValueError(f"the noise level must be positive, got sigma = {sigma}")
    difference = (pretrained_denoised.double() - fine_tuned_denoised.double()) / sigma
    value = float(difference.pow(2).mean().sqrt())
    if not math.isfinite(value):
        raise FloatingPointError("a prediction is NaN or infinite: check that the model files are not corrupt")
    return value


def prescreen_score(levels: list[LevelDeparture], samples: int, seed: int) -> PrescreenScore:
    if not levels:
        raise ValueError("the pre-screen needs at least one noise level")
    return PrescreenScore(sum(level.departure for level in levels) / len(levels), tuple(levels), samples, seed)


def prescreen_noise(seed: int, samples: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The ``samples`` noise draws (CPU, float32) every level and both models share."""
    return torch.randn((samples, *shape), generator=torch.Generator().manual_seed(seed))
