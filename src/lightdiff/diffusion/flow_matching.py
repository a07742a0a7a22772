"""Rectified-flow (flow matching) objective, as Stable Diffusion 3 trains it: interpolation, velocity target,
logit-normal timesteps and the timestep shift.

Time t in [0, 1] runs from data (t = 0) to noise (t = 1), the convention of diffusers' FlowMatchEulerDiscreteScheduler
(its `sigmas` are these t). References: Liu et al. 2022 (rectified flow); Esser et al. 2024, "Scaling Rectified Flow
Transformers for High-Resolution Image Synthesis" (SD3), cited by equation below.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SchedulerMixin

from lightdiff.config import ConfigError
from lightdiff.diffusion.edm import EDM
from lightdiff.diffusion.objective import (
    NoisyBatch,
    Objective,
    SchedulerFactory,
    StudentSampler,
    is_flow_sampler,
    scheduler_name,
)
from lightdiff.diffusion.objectives import DDPM, _per_sample
from lightdiff.diffusion.schedules import NoiseSchedule


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


def resolution_shift_mu(
    image_seq_len: int | torch.Tensor,
    base_image_seq_len: int = 256,
    max_image_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float | torch.Tensor:
    """mu, linear in the image's token count from `base_shift` at `base_image_seq_len` to `max_shift` at
    `max_image_seq_len` (FLUX.1's resolution-dependent shift, diffusers' `calculate_shift`; the defaults are FLUX's).
    The shifted time exp(mu) / (exp(mu) + 1 / t - 1) (FlowMatchEulerDiscreteScheduler's exponential `time_shift` with
    sigma = 1) is SD3's Equation 23 with shift = exp(mu): `shift_timesteps(t, exp(mu))`."""
    slope = (max_shift - base_shift) / (max_image_seq_len - base_image_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_image_seq_len)


def flow_alpha_sigma(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) = (1 - t, t): the rectified-flow path written as x_t = alpha_t x_0 + sigma_t eps (SD3,
    Equation 3), so formulas stated for a DDPM's (alpha, sigma), such as a distillation weight, apply unchanged."""
    return 1 - t, t


@dataclass(frozen=True)
class FlowMatching:
    """The rectified-flow objective (`objective=flow_matching`), implementing `lightdiff.diffusion.objective.Objective`.

    Training draws t from the logit-normal density (SD3, Section 3.1, Equation 19) and shifts it (Equation 23); the
    network sees t * num_train_timesteps, the timestep diffusers' FlowMatchEulerDiscreteScheduler and the SD3
    pipelines pass to the transformer, and regresses the velocity eps - x_0 (Equation 6; Liu et al. 2022, Eq. 1),
    unweighted.
    """

    logit_mean: float = 0.0  # m of the logit-normal timestep density (SD3's best: 0)
    logit_std: float = 1.0  # s of the logit-normal timestep density (SD3's best: 1)
    shift: float = 1.0  # timestep shift, training and (unless the sampler sets its own) sampling; 1: none
    num_train_timesteps: int = 1000  # the network's timestep is t * this (diffusers' FlowMatch convention)
    # FLUX's resolution-dependent shift instead of `shift`: exp(mu), mu linear in the image's 2x2-patch token count
    # from base_shift at base_image_seq_len to max_shift at max_image_seq_len (`resolution_shift_mu`)
    resolution_shift: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096

    name = "flow_matching"

    def __post_init__(self) -> None:
        if self.logit_std <= 0:
            raise ConfigError(f"objective.logit_std={self.logit_std} must be positive")
        if self.shift <= 0:
            raise ConfigError(f"objective.shift={self.shift} must be positive")
        if self.num_train_timesteps < 1:
            raise ConfigError(f"objective.num_train_timesteps={self.num_train_timesteps} must be positive")
        if self.resolution_shift and self.max_image_seq_len <= self.base_image_seq_len:
            raise ConfigError(
                f"objective.max_image_seq_len={self.max_image_seq_len} must exceed "
                f"objective.base_image_seq_len={self.base_image_seq_len}"
            )

    def training_times(
        self, batch_size: int, generator: torch.Generator | None = None, image_seq_len: int | None = None
    ) -> torch.Tensor:
        """t in (0, 1) per sample: logit-normal, then shifted (SD3, Equations 19 and 23; with `resolution_shift`, by
        exp(mu) of `image_seq_len` tokens, as FluxPipeline samples them)."""
        t = logit_normal_timesteps(batch_size, self.logit_mean, self.logit_std, generator)
        return shift_timesteps(t, self.shift_for(image_seq_len))

    def shift_for(self, image_seq_len: int | None) -> float:
        """The shift at `image_seq_len` image tokens: exp(mu) with `resolution_shift`, else `shift`."""
        if not self.resolution_shift:
            return self.shift
        if image_seq_len is None:
            raise ValueError("objective.resolution_shift=true: the shift depends on the image's token count")
        mu = resolution_shift_mu(
            image_seq_len, self.base_image_seq_len, self.max_image_seq_len, self.base_shift, self.max_shift
        )
        return math.exp(mu)

    def network_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep argument of the network for time t: t * num_train_timesteps (float)."""
        return t * self.num_train_timesteps

    def time_of(self, timesteps: torch.Tensor) -> torch.Tensor:
        """t in [0, 1] of network timesteps."""
        return timesteps.float() / self.num_train_timesteps

    def training_example(self, x0: torch.Tensor, noise: torch.Tensor) -> NoisyBatch:
        # 2x2-patch tokens, FLUX's packing and SD3's patch size (only `resolution_shift` reads them)
        tokens = (x0.shape[-2] // 2) * (x0.shape[-1] // 2)
        t = self.training_times(x0.shape[0], image_seq_len=tokens).to(x0.device)
        return self._example(x0, noise, t)

    def quantile_timesteps(self, quantiles: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The logit-normal's quantile sigmoid(m + s Phi^-1(u)), shifted as `training_times` shifts it."""
        tokens = (x0.shape[-2] // 2) * (x0.shape[-1] // 2)
        normal = torch.distributions.Normal(0.0, 1.0).icdf(quantiles.double().clamp(1e-6, 1 - 1e-6))
        t = torch.sigmoid(self.logit_mean + self.logit_std * normal).float()
        return self.network_timesteps(shift_timesteps(t, self.shift_for(tokens))).to(x0.device)

    def example_at(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> NoisyBatch:
        return self._example(x0, noise, self.time_of(timesteps))

    def _example(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> NoisyBatch:
        weight = torch.ones_like(t)
        return NoisyBatch(interpolate(x0, noise, t), self.network_timesteps(t), velocity_target(x0, noise), weight)

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return interpolate(x0, noise, self.time_of(timesteps))

    def predicted_x0(self, output: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return x0_from_velocity(x_t, output, self.time_of(timesteps))

    def alpha_sigma(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return flow_alpha_sigma(self.time_of(timesteps))

    def uniform_timesteps(self, size: int, device: torch.device | str) -> torch.Tensor:
        return torch.rand(size, device=device) * self.num_train_timesteps

    def high_noise_timesteps(self, size: int, mean: float, std: float, device: torch.device | str) -> torch.Tensor:
        """LADD's logit-normal t itself (Section 3.2), as a network timestep."""
        draws = torch.randn(size, device=device) * std + mean
        return torch.sigmoid(draws) * self.num_train_timesteps

    def accepts(self, factory: SchedulerFactory) -> bool:
        return is_flow_sampler(factory)

    def scheduler(self, factory: SchedulerFactory) -> SchedulerMixin:
        """`factory` with the training timesteps and, unless the sampler sets its own, the training shift (SD3,
        Equation 23)."""
        if not self.accepts(factory):
            raise ConfigError(
                f"sampler {scheduler_name(factory)} is a DDPM sampler, but the model was trained with "
                "objective=flow_matching: use sampler=flow_euler"
            )
        keywords = getattr(factory, "keywords", {})
        if self.resolution_shift and "shift" not in keywords:  # the sampler computes mu per image (FluxPipeline)
            return factory(
                num_train_timesteps=self.num_train_timesteps,
                use_dynamic_shifting=True,
                base_shift=self.base_shift,
                max_shift=self.max_shift,
                base_image_seq_len=self.base_image_seq_len,
                max_image_seq_len=self.max_image_seq_len,
            )
        return factory(num_train_timesteps=self.num_train_timesteps, shift=keywords.get("shift", self.shift))

    @property
    def default_sampler(self) -> SchedulerFactory:
        return FlowMatchEulerDiscreteScheduler

    @property
    def few_step_overrides(self) -> dict[str, Any]:
        return {}  # FlowMatchEuler's first step is t = 1, pure noise, at any step count

    @property
    def default_sampler_overrides(self) -> dict[str, Any]:
        return {}  # the flow samplers' defaults fit every flow-matching model

    def student_timesteps(
        self, count: int, requested: list[int] | None, timestep_arguments: dict[str, Any] | None = None
    ) -> list[float]:
        """The network timesteps FlowMatchEulerDiscreteScheduler visits in `count` steps, given the pipeline's own
        `set_timesteps` arguments (FluxPipeline's sigmas linspace(1, 1 / N, N)); those of 1 and 2 steps are among
        the 4-step ones (T, then 1; FLUX: 1, 1/2), so the student trains exactly where it samples."""
        if requested:
            raise ConfigError(
                "model.student_timesteps is for DDPM teachers; a flow-matching teacher's student trains at the times "
                "its flow sampler visits in 4 steps"
            )
        if self.resolution_shift:
            raise ConfigError(
                "objective.resolution_shift=true: a few-step student's timesteps would depend on the image size; "
                "distil from a teacher trained with a fixed objective.shift"
            )
        scheduler = self.scheduler(self.default_sampler)
        scheduler.set_timesteps(count, **(timestep_arguments or {}))
        return [float(t) for t in scheduler.timesteps.tolist()]

    def student_sampler(self, timesteps: Sequence[float]) -> StudentSampler:
        """FlowMatchEuler's own deterministic step at the pipeline's times (`student_timesteps`): FluxPipeline,
        StableDiffusion3Pipeline and WanPipeline call `scheduler.step` without their generator, so a stochastic step
        (its `stochastic_sampling`) would draw from torch's global generator, and no seed would reproduce an image."""
        return StudentSampler(None, self.few_step_overrides, fresh_noise=False)

    def with_prediction_type(self, prediction_type: str | None) -> FlowMatching:
        if prediction_type is not None:
            raise ConfigError(
                "model.student_prediction_type is for DDPM teachers; a flow-matching student predicts the velocity"
            )
        return self

    def state(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "logit_mean": self.logit_mean,
            "logit_std": self.logit_std,
            "shift": self.shift,
            "num_train_timesteps": self.num_train_timesteps,
            "resolution_shift": self.resolution_shift,
            "base_shift": self.base_shift,
            "max_shift": self.max_shift,
            "base_image_seq_len": self.base_image_seq_len,
            "max_image_seq_len": self.max_image_seq_len,
        }


def objective_from_state(
    state: dict[str, Any] | None,
    legacy_schedule: dict[str, Any] | None = None,  # a checkpoint of format 1 kept the schedule beside the objective
    legacy_prediction_type: str = "epsilon",  # ... and the prediction type
) -> Objective:
    """The objective a checkpoint or export was trained with; one from before objectives existed (no state) is DDPM."""
    name = (state or {}).get("name", "ddpm")
    if name == "ddpm":
        state = state or {}
        schedule = state.get("schedule", legacy_schedule)
        if schedule is None:
            raise ValueError("a DDPM objective's state holds no schedule")
        return DDPM(
            schedule=NoiseSchedule(**schedule),
            prediction_type=state.get("prediction_type", legacy_prediction_type),
            loss_weighting=state.get("loss_weighting", "none"),
            min_snr_gamma=state.get("min_snr_gamma", 5.0),
        )
    if name == "edm":
        return EDM(**{key: value for key, value in state.items() if key != "name"})
    if name == "flow_matching":
        fields = (
            "logit_mean",
            "logit_std",
            "shift",
            "num_train_timesteps",
            "resolution_shift",
            "base_shift",
            "max_shift",
            "base_image_seq_len",
            "max_image_seq_len",
        )
        return FlowMatching(**{key: state[key] for key in fields if key in state})
    raise ValueError(f"unknown objective {name!r} (known: ddpm, flow_matching, edm)")
