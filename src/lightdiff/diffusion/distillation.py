"""Adversarial diffusion distillation math (ADD: Sauer et al. 2023, arXiv 2311.17042; LADD: Sauer et al. 2024,
arXiv 2403.12015). Pure tensor functions over the discrete schedule's alpha_bar.
"""

from __future__ import annotations

import typing
from typing import Literal

import torch

from lightdiff.diffusion.objectives import alpha_sigma

DistillWeighting = Literal["alpha_bar", "sds", "none"]


def trailing_timesteps(num_train_timesteps: int, count: int) -> list[int]:
    """`count` timesteps evenly spaced and ending at the last one, T - 1 (diffusers' "trailing" spacing; Lin et al.
    2024, "Common diffusion noise schedules and sample steps are flawed", Table 2): the student's timesteps, so a
    1-step student starts from pure noise and a diffusers scheduler with trailing spacing visits the same steps."""
    if not 1 <= count <= num_train_timesteps:
        raise ValueError(f"cannot space {count} timesteps over {num_train_timesteps}")
    step = num_train_timesteps / count
    return [round(num_train_timesteps - i * step) - 1 for i in range(count)]


def distillation_weight(
    weighting: DistillWeighting, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """c(t) of the distillation loss c(t) ||x_student - x_teacher(x_t, t)||^2 (ADD, Equation 3 and Appendix).

    alpha_bar: c(t) = alpha_bar_t, ADD's "exponential" weighting, light at high noise where the teacher's x_0 is a
    blur. sds: the weighting that makes the x_0-space loss's gradient equal score distillation's (DreamFusion, Poole et
    al. 2022, Equation 3, w(t) = sigma_t^2): since eps_teacher - eps = (alpha_t / sigma_t)(x_student - x_teacher),
    w(t) (eps_teacher - eps) = 2 c(t) (x_student - x_teacher) gives c(t) = alpha_t sigma_t / 2. none: c(t) = 1.
    """
    alpha, sigma = alpha_sigma(alphas_cumprod, timesteps)
    return weight_from_alpha_sigma(weighting, alpha, sigma)


def weight_from_alpha_sigma(weighting: DistillWeighting, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """c(t) of `distillation_weight` for any path x_t = alpha x_0 + sigma eps: a DDPM's, or rectified flow's
    (alpha, sigma) = (1 - t, t) (`flow_alpha_sigma`), for which the SDS derivation holds unchanged."""
    if weighting == "alpha_bar":
        return alpha**2
    if weighting == "sds":
        return alpha * sigma / 2
    if weighting == "none":
        return torch.ones_like(alpha)
    raise ValueError(f"model.distill_weighting={weighting!r} is not one of {typing.get_args(DistillWeighting)}")


def high_noise_timesteps(
    batch_size: int,
    num_train_timesteps: int,
    mean: float = 1.0,
    std: float = 1.0,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Discriminator noise levels skewed to high noise: t = round(sigmoid(n) (T - 1)) with n ~ N(mean, std), the
    logit-normal density of LADD (Section 3.2: "we sample from a logit-normal distribution, shifted to high noise";
    mean 1, std 1 puts 84% of draws, P(N(1, 1) > 0), in the noisier half of the schedule)."""
    draws = torch.randn(batch_size, generator=generator, device=device) * std + mean
    return (torch.sigmoid(draws) * (num_train_timesteps - 1)).round().long()
