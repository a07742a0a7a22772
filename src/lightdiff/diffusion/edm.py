"""The EDM objective (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models") as Stable
Video Diffusion trains it (Blattmann et al. 2023, Appendix D.2): continuous noise levels sigma drawn log-normally,
sigma_data = 1, the network preconditioned as a v-prediction, and sampled by diffusers' EulerDiscreteScheduler with
continuous timesteps and Karras sigmas (the scheduler StableVideoDiffusionPipeline ships).

With sigma_data = 1, EDM's preconditioning (Table 1: c_in = 1 / sqrt(sigma^2 + 1), c_skip = 1 / (sigma^2 + 1),
c_out = -sigma / sqrt(sigma^2 + 1) for SVD's v-parametrisation, c_noise = ln(sigma) / 4) is a variance-preserving
path: the network sees x_t = c_in (x_0 + sigma eps) = alpha x_0 + s eps with alpha = 1 / sqrt(1 + sigma^2),
s = sigma / sqrt(1 + sigma^2), and its output F makes D = c_skip (x_0 + sigma eps) + c_out F = alpha x_t - s F, the
v-prediction x_0 of Salimans & Ho 2022 (Appendix D). EDM's loss lambda(sigma) ||D - x_0||^2 with lambda =
(sigma^2 + 1) / sigma^2 (Table 1) is then exactly ||F - v||^2, v = alpha eps - s x_0: weight 1. lightdiff's x_t is
that network input, and its network timesteps are c_noise = ln(sigma) / 4, what the scheduler passes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import EulerDiscreteScheduler, SchedulerMixin

from lightdiff.config import ConfigError
from lightdiff.diffusion.objective import NoisyBatch, SchedulerFactory, StudentSampler, scheduler_name
from lightdiff.diffusion.objectives import _per_sample


def sigma_of(timesteps: torch.Tensor) -> torch.Tensor:
    """sigma of a network timestep c_noise = ln(sigma) / 4 (EDM, Table 1)."""
    return torch.exp(4 * timesteps.float())


def timestep_of(sigma: torch.Tensor) -> torch.Tensor:
    """c_noise = ln(sigma) / 4: what EulerDiscreteScheduler(timestep_type="continuous") passes to the network."""
    return 0.25 * torch.log(sigma)


def edm_alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, s) = (1, sigma) / sqrt(1 + sigma^2): the network input c_in (x_0 + sigma eps) = alpha x_0 + s eps."""
    scale = torch.rsqrt(1 + sigma**2)
    return scale, sigma * scale


@dataclass(frozen=True)
class EDM:
    """`objective=edm`, implementing `lightdiff.diffusion.objective.Objective` (see the module docstring)."""

    p_mean: float = 0.7  # ln(sigma) ~ N(p_mean, p_std^2) in training (SVD's fine-tuning: 0.7, 1.6; EDM's: -1.2, 1.2)
    p_std: float = 1.6
    sigma_min: float = 0.002  # the sampler's Karras sigmas run from sigma_max down to sigma_min (SVD's scheduler)
    sigma_max: float = 700.0
    num_train_timesteps: int = 1000  # the scheduler's discrete grid (its betas give sigmas before the Karras schedule)

    name = "edm"

    def __post_init__(self) -> None:
        if self.p_std <= 0:
            raise ConfigError(f"objective.p_std={self.p_std} must be positive")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ConfigError(
                f"objective.sigma_min={self.sigma_min} and sigma_max={self.sigma_max}: need 0 < min < max"
            )

    def training_example(self, x0: torch.Tensor, noise: torch.Tensor) -> NoisyBatch:
        """ln(sigma) ~ N(p_mean, p_std^2) (EDM, Table 1), the v target, weight 1 (the module docstring)."""
        sigma = torch.exp(self.p_mean + self.p_std * torch.randn(x0.shape[0], device=x0.device))
        return self._example(x0, noise, sigma)

    def quantile_timesteps(self, quantiles: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The log-normal's quantile sigma = exp(p_mean + p_std Phi^-1(u)), as c_noise."""
        normal = torch.distributions.Normal(0.0, 1.0).icdf(quantiles.double().clamp(1e-6, 1 - 1e-6))
        return timestep_of(torch.exp(self.p_mean + self.p_std * normal)).float().to(x0.device)

    def example_at(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> NoisyBatch:
        return self._example(x0, noise, sigma_of(timesteps))

    def _example(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> NoisyBatch:
        alpha, s = (_per_sample(value, x0) for value in edm_alpha_sigma(sigma))
        return NoisyBatch(
            x_t=alpha * x0 + s * noise,
            timesteps=timestep_of(sigma),
            target=alpha * noise - s * x0,
            weight=torch.ones_like(sigma),
        )

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        alpha, s = (_per_sample(value, x0) for value in self.alpha_sigma(timesteps))
        return alpha * x0 + s * noise

    def predicted_x0(self, output: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """D = alpha x_t - s F (the module docstring)."""
        alpha, s = (_per_sample(value, x_t) for value in self.alpha_sigma(timesteps))
        return alpha * x_t - s * output

    def alpha_sigma(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return edm_alpha_sigma(sigma_of(timesteps))

    def uniform_timesteps(self, size: int, device: torch.device | str) -> torch.Tensor:
        """ln(sigma) uniform over [ln sigma_min, ln sigma_max]."""
        low, high = math.log(self.sigma_min), math.log(self.sigma_max)
        return 0.25 * (low + (high - low) * torch.rand(size, device=device))

    def high_noise_timesteps(self, size: int, mean: float, std: float, device: torch.device | str) -> torch.Tensor:
        """LADD's logit-normal flow times s (Section 3.2) at equal SNR: SNR(s) = ((1 - s) / s)^2 = 1 / sigma^2."""
        flow_times = torch.sigmoid(torch.randn(size, device=device) * std + mean)
        return timestep_of(flow_times / (1 - flow_times))

    def accepts(self, factory: SchedulerFactory) -> bool:
        return scheduler_name(factory) == "EulerDiscreteScheduler"

    def scheduler(self, factory: SchedulerFactory) -> SchedulerMixin:
        """StableVideoDiffusionPipeline's scheduler: Euler on continuous timesteps, Karras sigmas between sigma_min and
        sigma_max, the v-prediction; `factory` must be the Euler sampler (`sampler=euler`)."""
        if not self.accepts(factory):
            raise ConfigError(
                f"sampler {scheduler_name(factory)}: an objective=edm model samples with sampler=euler "
                "(EulerDiscreteScheduler on continuous timesteps, as StableVideoDiffusionPipeline)"
            )
        return factory(
            num_train_timesteps=self.num_train_timesteps,
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            prediction_type="v_prediction",
            timestep_type="continuous",
            use_karras_sigmas=True,
            interpolation_type="linear",
            sigma_min=self.sigma_min,
            sigma_max=self.sigma_max,
        )

    @property
    def default_sampler(self) -> SchedulerFactory:
        return EulerDiscreteScheduler

    @property
    def few_step_overrides(self) -> dict[str, Any]:
        return {}  # the Karras grid starts at sigma_max, noise 700 times the data's scale, at any step count

    @property
    def default_sampler_overrides(self) -> dict[str, Any]:
        return {}

    def student_timesteps(
        self, count: int, requested: list[int] | None, timestep_arguments: dict[str, Any] | None = None
    ) -> list[float]:
        raise ConfigError("few-step distillation of an objective=edm teacher (SVD) is not supported")

    def student_sampler(self, timesteps: Sequence[float]) -> StudentSampler:
        raise ConfigError("few-step distillation of an objective=edm teacher (SVD) is not supported")

    def with_prediction_type(self, prediction_type: str | None) -> EDM:
        if prediction_type not in (None, "v_prediction"):
            raise ConfigError(f"objective=edm predicts v only (SVD's preconditioning), not {prediction_type!r}")
        return self

    def state(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "p_mean": self.p_mean,
            "p_std": self.p_std,
            "sigma_min": self.sigma_min,
            "sigma_max": self.sigma_max,
            "num_train_timesteps": self.num_train_timesteps,
        }
