"""RunSettings: everything that determined a run's candidates, as the sampling nodes hand it to the audit report.

The Model Guidance Sampler (one batch) and the Candidate Bank (batches on disk) build it the same way
(nodes/sampling.py, ``describe_run``), so a report records the same fields whichever made the candidates. Two fields
tell the paths apart: ``noise`` (how each candidate's noise follows from the seed) and ``first_candidate`` (the index
of the first candidate, where a bank run was split across machines).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class RunSettings:
    mode: str  # finextract, model_guidance, cfg or direct (finextract_core.guidance.GuidanceMode)
    guidance_scale: float  # w' (w for model_guidance)
    k: float  # Eq. 13's correction scale (finextract only)
    seed: int
    steps: int
    sampler: str  # ComfyUI's sampler name
    scheduler: str  # ComfyUI's scheduler name
    denoise: float
    latent_shape: tuple[int, ...]  # one candidate's latent, channels first
    candidates: int  # N
    first_candidate: int
    noise: str  # how candidate i's noise follows from (seed, i); see the nodes that name the schemes
    model_family: str  # ComfyUI's model config, model and latent format classes of the fine-tuned model
    fine_tune: str  # "separate checkpoints" (DreamBooth) or "base + LoRA (shared weights)"
    pack_version: str

    def to_dict(self) -> dict:
        values = asdict(self)
        values["latent_shape"] = list(self.latent_shape)
        return values

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict) -> "RunSettings":
        """The settings of :meth:`to_dict`'s output; refuses a dict with other fields, naming them."""
        names = {field.name for field in fields(cls)}
        missing, unknown = sorted(names - set(values)), sorted(set(values) - names)
        if missing or unknown:
            raise ValueError(f"run settings without {missing} or with unknown {unknown}: connect the run settings "
                             "of the Model Guidance Sampler or the Candidate Bank that made the candidates")
        return cls(**{**values, "latent_shape": tuple(values["latent_shape"])})

    def candidate_key(self) -> dict:
        """The settings on which each candidate depends, under the names a candidate bank's key gives them (its
        "scheme" is the noise)."""
        return {"scheme": self.noise, "mode": self.mode, "guidance_scale": self.guidance_scale, "k": self.k,
                "seed": self.seed, "steps": self.steps, "sampler": self.sampler, "scheduler": self.scheduler,
                "latent_shape": list(self.latent_shape)}
