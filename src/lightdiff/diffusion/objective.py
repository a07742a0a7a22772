"""The interface every training objective (parametrisation) offers: what a method, a sampler or an exporter may ask.

One object holds one parametrisation, as k-diffusion's `Denoiser`, minRF's `RF` and EDM2's loss class do: DDPM over
a beta schedule with its prediction type (`lightdiff.diffusion.objectives.DDPM`) and rectified flow
(`lightdiff.diffusion.flow_matching.FlowMatching`) expose the same methods, so no method asks which one it has.

Times travel as the network's timestep argument throughout ("network timesteps"): DDPM's integer step 0..T-1, or
flow matching's t * num_train_timesteps, which is what diffusers' schedulers pass to a network.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from diffusers import SchedulerMixin

SchedulerFactory = Callable[..., SchedulerMixin]  # a diffusers scheduler class, or a partial of one


@dataclass(frozen=True)
class NoisyBatch:
    x_t: torch.Tensor  # the network's input, shaped like x_0
    timesteps: torch.Tensor  # (B,) the network's timestep argument
    target: torch.Tensor  # what the network regresses, shaped like x_0
    weight: torch.Tensor  # (B,) per-sample loss weight


@dataclass(frozen=True)
class StudentSampler:
    """How a few-step student steps from one of its timesteps to the next: x_0, then re-noised to the next timestep
    with fresh noise (`fresh_noise`: LCMScheduler, DMD2's multi-step sampling, Section 4.5) or with the noise x_t
    implies (a deterministic DDIM / Euler step: `consistency.ddim_step`)."""

    name: str | None  # the scheduler it must sample with (a `trained.REQUIRED_SAMPLERS` key); None: the objective's own
    overrides: dict[str, Any]  # that scheduler's config changes, recorded in the checkpoint
    fresh_noise: bool


@runtime_checkable
class Objective(Protocol):
    """A forward process x_t = alpha_t x_0 + sigma_t eps, what the network predicts of it, and how it is sampled."""

    @property
    def name(self) -> str:
        """The `objective` config choice: ddpm | flow_matching."""
        ...

    @property
    def num_train_timesteps(self) -> int:
        """The scale of network timesteps (T)."""
        ...

    def training_example(self, x0: torch.Tensor, noise: torch.Tensor) -> NoisyBatch:
        """Draw the batch's training times (global random stream) and noise `x0` with `noise`."""
        ...

    def quantile_timesteps(self, quantiles: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The network timesteps at the given quantiles (in (0, 1)) of training's noise-level distribution for inputs
        shaped like `x0`: fixed levels at which a validation loss weighs noise levels as training does."""
        ...

    def example_at(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> NoisyBatch:
        """The training example (input, target, weight) at the given network timesteps (B,), not drawn ones."""
        ...

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t at the given network timesteps (B,)."""
        ...

    def predicted_x0(self, output: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_0 implied by the network's `output` at (x_t, timesteps)."""
        ...

    def alpha_sigma(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) per sample, for weightings written for any path x_t = alpha x_0 + sigma eps."""
        ...

    def uniform_timesteps(self, size: int, device: torch.device | str) -> torch.Tensor:
        """Network timesteps drawn uniformly over the whole path (the teacher's re-noising in distillation)."""
        ...

    def high_noise_timesteps(self, size: int, mean: float, std: float, device: torch.device | str) -> torch.Tensor:
        """Network timesteps sigmoid(N(mean, std)) of the path: skewed to high noise (LADD, Section 3.2)."""
        ...

    def scheduler(self, factory: SchedulerFactory) -> SchedulerMixin:
        """A diffusers sampler (the `sampler` config) configured for this objective; a ConfigError for a sampler of
        the other kind (a DDPM sampler for a flow, a flow sampler for a DDPM)."""
        ...

    def accepts(self, factory: SchedulerFactory) -> bool:
        """Whether `factory` can sample this objective."""
        ...

    @property
    def default_sampler(self) -> SchedulerFactory:
        """The sampler a few-step student and the preview of a teacher use when none other fits."""
        ...

    @property
    def few_step_overrides(self) -> dict[str, Any]:
        """Changes to `default_sampler`'s config under which its first step starts from pure noise."""
        ...

    @property
    def default_sampler_overrides(self) -> dict[str, Any]:
        """Changes to the objective's default sampler (sample.py's `sampler=auto`) that this model needs at any step
        count (a zero-terminal-SNR model: trailing timesteps); an explicitly chosen sampler is taken as it is."""
        ...

    def student_timesteps(
        self, count: int, requested: list[int] | None, timestep_arguments: dict[str, Any] | None = None
    ) -> list[float]:
        """The network timesteps a few-step student trains at (those its sampler visits); `requested` is the
        user's list (model.student_timesteps), checked, or a ConfigError where this objective fixes them;
        `timestep_arguments`: what the student's pipeline passes to `set_timesteps` (`sampling.pipeline_timesteps`)."""
        ...

    def student_sampler(self, timesteps: Sequence[float]) -> StudentSampler:
        """How a multi-step student of this objective samples between its `timesteps` (so how DMD2's backward
        simulation runs it); a ConfigError where no diffusers sampler visits exactly those timesteps."""
        ...

    def with_prediction_type(self, prediction_type: str | None) -> Objective:
        """The same path with the network predicting `prediction_type`, for a student that parametrises its output
        otherwise than its teacher; None: what suits a few-step student (the teacher's own where it is well
        conditioned at the first, purest-noise step); a ConfigError where the objective has no choice."""
        ...

    def state(self) -> dict[str, Any]:
        """Plain data for a checkpoint or an export's lightdiff.json (read back by `objective_from_state`)."""
        ...


def scheduler_name(factory: SchedulerFactory) -> str:
    """The class name of a scheduler factory (a class or a functools.partial of one)."""
    function = getattr(factory, "func", factory)
    return getattr(function, "__name__", str(factory))


def is_flow_sampler(factory: SchedulerFactory) -> bool:
    """Whether a `sampler` integrates a flow (diffusers' FlowMatch* schedulers)."""
    return scheduler_name(factory).startswith("FlowMatch")


def timesteps_within(objective: Objective, low: float, high: float, x0: torch.Tensor) -> torch.Tensor:
    """One network timestep per sample of `x0`, drawn from training's own timestep density conditioned on [low, high]:
    inverse-transform sampling of the truncated density, u uniform between the quantiles whose timesteps are `low`
    and `high` (found by bisection on the monotone `quantile_timesteps`). How one of Wan 2.2 A14B's experts trains on
    its side of the boundary without changing how noise levels weigh within it."""

    probe = torch.empty((1, *x0.shape[1:]))  # the shape (a resolution-dependent shift reads it), on the CPU: no sync

    def quantile_of(timestep: float) -> float:
        below, above = 0.0, 1.0
        for _ in range(48):  # the quantile to 2^-48
            middle = (below + above) / 2
            if float(objective.quantile_timesteps(torch.tensor([middle], dtype=torch.float64), probe)[0]) < timestep:
                below = middle
            else:
                above = middle
        return above

    first, last = quantile_of(low), quantile_of(high)
    if last <= first:
        raise ValueError(f"timesteps [{low:g}, {high:g}] hold no mass of {objective.name}'s training timesteps")
    quantiles = first + (last - first) * torch.rand(x0.shape[0], dtype=torch.float64)
    return objective.quantile_timesteps(quantiles, x0)
