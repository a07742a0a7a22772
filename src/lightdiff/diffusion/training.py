"""One noised training batch of either objective: what the network sees and what it must predict.

DDPM (Ho et al. 2020, Algorithm 1): t uniform over the schedule's steps, x_t = alpha_t x_0 + sigma_t eps, the target
of `prediction_type`, weighted by `loss_weighting`. Rectified flow (Liu et al. 2022; Esser et al. 2024, Equations
3, 6, 19 and 23): t logit-normal and shifted, z_t = (1 - t) x_0 + t eps, the velocity eps - x_0, unweighted, and
the network's timestep t * num_train_timesteps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lightdiff.diffusion.flow_matching import FlowMatching, interpolate, velocity_target
from lightdiff.diffusion.objectives import (
    DDPM,
    LossWeighting,
    PredictionType,
    add_noise,
    loss_weight,
    training_target,
)


@dataclass(frozen=True)
class NoisyBatch:
    x_t: torch.Tensor  # the network's input, shaped like x_0
    timesteps: torch.Tensor  # (B,) the network's timestep argument
    target: torch.Tensor  # what the network regresses, shaped like x_0
    weight: torch.Tensor  # (B,) per-sample loss weight


def noisy_batch(
    objective: DDPM | FlowMatching,
    x0: torch.Tensor,
    noise: torch.Tensor,
    alphas_cumprod: torch.Tensor,  # DDPM's alpha_bar per step (unused by flow matching)
    prediction_type: PredictionType,  # DDPM only
    loss_weighting: LossWeighting,  # DDPM only
    min_snr_gamma: float,  # DDPM only
) -> NoisyBatch:
    """Draw the batch's times from the global random stream and noise `x0` with `noise`."""
    if isinstance(objective, FlowMatching):
        t = objective.training_times(x0.shape[0]).to(x0.device)
        weight = torch.ones_like(t)
        return NoisyBatch(interpolate(x0, noise, t), objective.network_timesteps(t), velocity_target(x0, noise), weight)
    timesteps = torch.randint(0, alphas_cumprod.shape[0], (x0.shape[0],), device=x0.device)
    return NoisyBatch(
        x_t=add_noise(x0, noise, alphas_cumprod, timesteps),
        timesteps=timesteps,
        target=training_target(prediction_type, x0, noise, alphas_cumprod, timesteps),
        weight=loss_weight(loss_weighting, prediction_type, alphas_cumprod, timesteps, min_snr_gamma),
    )
