"""The world's noise schedule: the one ComfyUI builds for an EPS model from ``beta_schedule="linear"`` (betas
interpolated linearly in sqrt space between ``linear_start`` and ``linear_end``), so a model trained here samples
correctly there."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Schedule:
    linear_start: float = 0.00085
    linear_end: float = 0.012
    timesteps: int = 1000

    def alphas_cumprod(self) -> torch.Tensor:
        betas = torch.linspace(self.linear_start ** 0.5, self.linear_end ** 0.5, self.timesteps, dtype=torch.float64) ** 2
        return torch.cumprod(1 - betas, dim=0)  # float64: 1 - abar near t = 0 needs the precision

    def comfy_sampling_settings(self) -> dict:
        return {"beta_schedule": "linear", **asdict(self)}
