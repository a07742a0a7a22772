"""The rectified-flow math (issue 8's first piece) against closed forms and diffusers' flow-matching scheduler."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from lightdiff.diffusion.flow_matching import (
    interpolate,
    logit_normal_timesteps,
    shift_timesteps,
    velocity_target,
    x0_from_velocity,
)


def test_interpolation_endpoints_and_its_derivative_is_the_velocity_target() -> None:
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 2, 4, 4, generator=generator), torch.randn(3, 2, 4, 4, generator=generator)
    assert torch.equal(interpolate(x0, noise, torch.zeros(3)), x0)
    assert torch.equal(interpolate(x0, noise, torch.ones(3)), noise)
    t, h = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64), 1e-6
    x0, noise = x0.double(), noise.double()
    derivative = (interpolate(x0, noise, t + h) - interpolate(x0, noise, t - h)) / (2 * h)
    torch.testing.assert_close(derivative, velocity_target(x0, noise), rtol=0, atol=1e-8)
    # The exact velocity takes z_t back to x_0 in one Euler step, from any t.
    torch.testing.assert_close(x0_from_velocity(interpolate(x0, noise, t), velocity_target(x0, noise), t), x0)


def test_logit_normal_timesteps_have_the_asked_logit_mean_and_spread() -> None:
    t = logit_normal_timesteps(200_000, mean=0.5, std=0.8, generator=torch.Generator().manual_seed(1))
    assert bool(((t > 0) & (t < 1)).all())
    logits = torch.logit(t.double())
    assert abs(logits.mean().item() - 0.5) < 0.01 and abs(logits.std().item() - 0.8) < 0.01
    # The density of SD3's Equation 19 at t = 1/2 for m = 0, s = 1: 4 / sqrt(2 pi).
    t = logit_normal_timesteps(400_000, generator=torch.Generator().manual_seed(2))
    width = 0.01
    density = ((t - 0.5).abs() < width / 2).double().mean().item() / width
    assert density == pytest.approx(4 / math.sqrt(2 * math.pi), rel=0.03)


def test_shift_matches_the_diffusers_flow_matching_scheduler() -> None:
    assert torch.equal(shift_timesteps(torch.tensor([0.0, 1.0]), 3.0), torch.tensor([0.0, 1.0]))
    plain = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    shifted = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    torch.testing.assert_close(shift_timesteps(plain.sigmas, 3.0), shifted.sigmas)
    assert bool((shift_timesteps(torch.tensor([0.3]), 3.0) > 0.3).all())  # more time at high noise
    with pytest.raises(ValueError, match="shift must be positive, got 0"):
        shift_timesteps(torch.tensor([0.5]), 0)
