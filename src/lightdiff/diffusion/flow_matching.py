"""Rectified-flow (flow matching) objective, as Stable Diffusion 3 trains it: interpolation, velocity target,
logit-normal timesteps and the timestep shift.

Time t in [0, 1] runs from data (t = 0) to noise (t = 1), the convention of diffusers' FlowMatchEulerDiscreteScheduler
(its `sigmas` are these t). References: Liu et al. 2022 (rectified flow); Esser et al. 2024, "Scaling Rectified Flow
Transformers for High-Resolution Image Synthesis" (SD3), cited by equation below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lightdiff.diffusion.objectives import DDPM, _per_sample


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """z_t = (1 - t) x_0 + t eps (SD3, Equation 3 with a_t = 1 - t, b_t = t: the rectified-flow path)."""
    t = _per_sample(t, x0)
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The network's target u = dz_t/dt = eps - x_0 (SD3, Equation 6 for the rectified-flow path)."""
    return noise - x0


def x0_from_velocity(z_t: torch.Tensor, velocity: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_0 = z_t - t u: one Euler step from t straight to 0 (what a one-step sampler returns)."""
    return z_t - _per_sample(t, z_t) * velocity


def logit_normal_timesteps(
    batch_size: int, mean: float = 0.0, std: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """t = sigmoid(m + s n), n ~ N(0, 1): the logit-normal density of SD3, Equation 19,
    pi_ln(t; m, s) = exp(-(logit(t) - m)^2 / (2 s^2)) / (s sqrt(2 pi) t (1 - t)); m = 0, s = 1 was SD3's best."""
    return torch.sigmoid(mean + std * torch.randn(batch_size, generator=generator))


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """t_shifted = shift t / (1 + (shift - 1) t) (SD3, Equation 23, with shift = sqrt(m / n) for resolution m vs n):
    more time at high noise for larger images. diffusers' FlowMatchEulerDiscreteScheduler(shift=...) shifts its
    sigmas with the same formula, so training and sampling agree."""
    if shift <= 0:
        raise ValueError(f"the timestep shift must be positive, got {shift}")
    return shift * t / (1 + (shift - 1) * t)


def flow_alpha_sigma(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) = (1 - t, t): the rectified-flow path written as x_t = alpha_t x_0 + sigma_t eps (SD3,
    Equation 3), so formulas stated for a DDPM's (alpha, sigma), such as a distillation weight, apply unchanged."""
    return 1 - t, t


@dataclass(frozen=True)
class FlowMatching:
    """The rectified-flow objective (`objective=flow_matching`): what a method needs to train and sample with it.

    Training draws t from the logit-normal density (SD3, Section 3.1, Equation 19) and shifts it (Equation 23); the
    network sees t * num_train_timesteps, the timestep diffusers' FlowMatchEulerDiscreteScheduler and the SD3
    pipelines pass to the transformer, and regresses the velocity eps - x_0 (Equation 6; Liu et al. 2022, Eq. 1).
    """

    logit_mean: float = 0.0  # m of the logit-normal timestep density (SD3's best: 0)
    logit_std: float = 1.0  # s of the logit-normal timestep density (SD3's best: 1)
    shift: float = 1.0  # timestep shift, training and (unless the sampler sets its own) sampling; 1: none
    num_train_timesteps: int = 1000  # the network's timestep is t * this (diffusers' FlowMatch convention)

    def __post_init__(self) -> None:
        if self.logit_std <= 0:
            raise ValueError(f"objective.logit_std={self.logit_std} must be positive")
        if self.shift <= 0:
            raise ValueError(f"objective.shift={self.shift} must be positive")
        if self.num_train_timesteps < 1:
            raise ValueError(f"objective.num_train_timesteps={self.num_train_timesteps} must be positive")

    def training_times(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """t in (0, 1) per sample: logit-normal, then shifted (SD3, Equations 19 and 23)."""
        t = logit_normal_timesteps(batch_size, self.logit_mean, self.logit_std, generator)
        return shift_timesteps(t, self.shift)

    def network_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep argument of the network for time t: t * num_train_timesteps (float)."""
        return t * self.num_train_timesteps

    def state(self) -> dict[str, Any]:
        """Plain data for a checkpoint's `lightdiff` block (read back by `objective_from_state`)."""
        return {
            "name": "flow_matching",
            "logit_mean": self.logit_mean,
            "logit_std": self.logit_std,
            "shift": self.shift,
            "num_train_timesteps": self.num_train_timesteps,
        }


Objective = DDPM | FlowMatching


def objective_from_state(state: dict[str, Any] | None) -> Objective:
    """The objective a checkpoint was trained with; a checkpoint from before objectives existed (no state) is DDPM."""
    if state is None or state.get("name") == "ddpm":
        return DDPM()
    if state.get("name") == "flow_matching":
        fields = ("logit_mean", "logit_std", "shift", "num_train_timesteps")
        return FlowMatching(**{key: state[key] for key in fields if key in state})
    raise ValueError(f"unknown objective {state.get('name')!r} (known: ddpm, flow_matching)")
