"""Rectified-flow (flow matching) objective, as Stable Diffusion 3 trains it: interpolation, velocity target,
logit-normal timesteps and the timestep shift.

Time t in [0, 1] runs from data (t = 0) to noise (t = 1), the convention of diffusers' FlowMatchEulerDiscreteScheduler
(its `sigmas` are these t). References: Liu et al. 2022 (rectified flow); Esser et al. 2024, "Scaling Rectified Flow
Transformers for High-Resolution Image Synthesis" (SD3), cited by equation below.
"""

from __future__ import annotations

import torch

from lightdiff.diffusion.objectives import _per_sample


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
