"""Training objectives of discrete-time diffusion: noising, prediction targets, x0 recovery and loss weights.

alpha = sqrt(alpha_bar_t) and sigma = sqrt(1 - alpha_bar_t) throughout, so x_t = alpha x_0 + sigma eps
(Ho et al. 2020, Equation 4) and the signal-to-noise ratio is SNR(t) = alpha^2 / sigma^2 (Kingma et al. 2021, Eq. 2).
"""

from __future__ import annotations

import functools
import typing
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from diffusers import CogVideoXDDIMScheduler, DDIMScheduler, SchedulerMixin

from lightdiff.config import ConfigError
from lightdiff.diffusion.distillation import trailing_timesteps
from lightdiff.diffusion.objective import (
    NoisyBatch,
    SchedulerFactory,
    StudentSampler,
    is_flow_sampler,
    scheduler_name,
)
from lightdiff.diffusion.schedules import NoiseSchedule

PredictionType = Literal["epsilon", "v_prediction", "sample"]
LossWeighting = Literal["none", "min_snr"]


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample vector (B,) to broadcast against a batch shaped like `like` (B, C, H, W)."""
    return values.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def alpha_sigma(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) = (sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)) per sample."""
    alpha_bar = alphas_cumprod.to(timesteps.device)[timesteps]
    return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR(t) = alpha_bar_t / (1 - alpha_bar_t) (Kingma et al. 2021, Equation 2)."""
    alpha_bar = alphas_cumprod.to(timesteps.device)[timesteps]
    return alpha_bar / (1 - alpha_bar)


def offset_noise(noise: torch.Tensor, strength: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """eps + strength * n with n ~ N(0, 1) shared by all pixels of a channel (Guttenberg 2023, "offset noise").

    Lets the model change an image's mean brightness, which plain white noise almost never perturbs.
    """
    if strength == 0:
        return noise
    # per channel: (B, C, 1, 1) for images, (B, 1, C, 1, 1) for clips (B, F, C, H, W), shared by their frames
    shape = (noise.shape[0], noise.shape[1], 1, 1) if noise.ndim == 4 else (noise.shape[0], 1, noise.shape[2], 1, 1)
    shift = torch.randn(shape, generator=generator, device=noise.device)
    return noise + strength * shift.to(noise.dtype)


def add_noise(
    x0: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """q(x_t | x_0): x_t = alpha_t x_0 + sigma_t eps (Ho et al. 2020, Equation 4)."""
    alpha, sigma = alpha_sigma(alphas_cumprod, timesteps)
    return _per_sample(alpha, x0) * x0 + _per_sample(sigma, x0) * noise


def velocity(
    x0: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """v = alpha_t eps - sigma_t x_0 (Salimans & Ho 2022, "Progressive Distillation", Section 4 / Appendix D)."""
    alpha, sigma = alpha_sigma(alphas_cumprod, timesteps)
    return _per_sample(alpha, x0) * noise - _per_sample(sigma, x0) * x0


def training_target(
    prediction_type: PredictionType,
    x0: torch.Tensor,
    noise: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """What the network is regressed onto: eps (Ho et al. 2020, Eq. 14), v (Salimans & Ho 2022) or x_0."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return velocity(x0, noise, alphas_cumprod, timesteps)
    if prediction_type == "sample":
        return x0
    raise ValueError(f"prediction_type={prediction_type!r} is not one of epsilon, v_prediction, sample")


def predicted_x0(
    prediction_type: PredictionType,
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """x_0 implied by a network output.

    epsilon: x_0 = (x_t - sigma eps) / alpha (Ho et al. 2020, Equation 15 rearranged);
    v_prediction: x_0 = alpha x_t - sigma v (Salimans & Ho 2022, Appendix D); sample: the output itself.
    """
    alpha, sigma = alpha_sigma(alphas_cumprod, timesteps)
    alpha, sigma = _per_sample(alpha, x_t), _per_sample(sigma, x_t)
    if prediction_type == "epsilon":
        return (x_t - sigma * model_output) / alpha
    if prediction_type == "v_prediction":
        return alpha * x_t - sigma * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"prediction_type={prediction_type!r} is not one of epsilon, v_prediction, sample")


def min_snr_weight(
    prediction_type: PredictionType, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float
) -> torch.Tensor:
    """Min-SNR-gamma loss weight (Hang et al. 2023, arXiv 2303.09556, Equation 8 and Section 3.4).

    The x_0-space weight is min(SNR, gamma); expressed for the network's own target it becomes
    min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for v, and min(SNR, gamma) for x_0.
    """
    ratio = snr(alphas_cumprod, timesteps)
    clipped = torch.clamp(ratio, max=gamma)
    if prediction_type == "epsilon":
        return clipped / ratio
    if prediction_type == "v_prediction":
        return clipped / (ratio + 1)
    if prediction_type == "sample":
        return clipped
    raise ValueError(f"prediction_type={prediction_type!r} is not one of epsilon, v_prediction, sample")


def loss_weight(
    weighting: LossWeighting,
    prediction_type: PredictionType,
    alphas_cumprod: torch.Tensor,
    timesteps: torch.Tensor,
    min_snr_gamma: float,
) -> torch.Tensor:
    """Per-sample weight of the squared error: ones, or min-SNR-gamma."""
    if weighting == "none":
        return torch.ones(timesteps.shape, device=timesteps.device, dtype=torch.float64)
    if weighting == "min_snr":
        return min_snr_weight(prediction_type, alphas_cumprod, timesteps, min_snr_gamma)
    raise ValueError(f"loss_weighting={weighting!r} is not one of none, min_snr")


def weighted_mse(prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """mean_b( w_b * mean_{c,h,w} (prediction - target)^2 ), computed in fp32 whatever the autocast dtype."""
    per_sample = (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    return (weight.to(per_sample) * per_sample).mean()


# 1 / alpha_{T-1} of an epsilon network's x_0 at the last step: 157 for the linear schedule, 20000 for the cosine one,
# 15 for Stable Diffusion's scaled-linear one, which SD-Turbo's and SDXL-Turbo's epsilon students start from.
MAX_FIRST_STEP_AMPLIFICATION = 20.0


def _snr_shifted(factory: SchedulerFactory, scale: float) -> SchedulerFactory:
    """`factory`'s CogVideoX twin, which takes `snr_shift_scale` (a partial keeps its settings)."""
    if scheduler_name(factory) == "CogVideoXDDIMScheduler":
        return factory
    if scheduler_name(factory) != "DDIMScheduler":
        raise ConfigError(
            f"sampler {scheduler_name(factory)}: schedule.snr_shift_scale={scale} is sampled by DDIM only "
            "(CogVideoXDDIMScheduler); use sampler=ddim"
        )
    keywords = getattr(factory, "keywords", {})
    return functools.partial(CogVideoXDDIMScheduler, **keywords)


@dataclass(frozen=True)
class DDPM:
    """Discrete-time denoising diffusion (`objective=ddpm`, the default; Ho et al. 2020): x_t = alpha_t x_0 + sigma_t
    eps over the `schedule` group's betas, the network predicting eps, v or x_0, optionally min-SNR weighted.

    Implements `lightdiff.diffusion.objective.Objective`; network timesteps are the integer steps 0..T-1.
    """

    schedule: NoiseSchedule  # the forward process (the `schedule` config group)
    prediction_type: PredictionType = "epsilon"  # network target: epsilon | v_prediction | sample
    loss_weighting: LossWeighting = "none"  # none | min_snr (Hang et al. 2023)
    min_snr_gamma: float = 5.0  # gamma of min-SNR weighting

    name = "ddpm"

    def __post_init__(self) -> None:
        # Checked here, not at the first step, so a typo fails before any output is written.
        if self.prediction_type not in typing.get_args(PredictionType):
            raise ConfigError(
                f"objective.prediction_type={self.prediction_type!r} is not one of {typing.get_args(PredictionType)}"
            )
        if self.loss_weighting not in typing.get_args(LossWeighting):
            raise ConfigError(
                f"objective.loss_weighting={self.loss_weighting!r} is not one of {typing.get_args(LossWeighting)}"
            )
        if self.min_snr_gamma <= 0:
            raise ConfigError(f"objective.min_snr_gamma={self.min_snr_gamma} must be positive")

    @functools.cached_property
    def alphas_cumprod(self) -> torch.Tensor:
        """alpha_bar_t as float32 (what every formula here indexes), computed once from the float64 schedule."""
        return self.schedule.alphas_cumprod().float()

    def _alphas_on(self, device: torch.device) -> torch.Tensor:
        """`alphas_cumprod` on `device`, copied there once: the methods call this objective every step, and a
        host-to-device copy per call would sit in the training loop (the methods kept a device buffer before)."""
        copies = self.__dict__.setdefault("_alphas_by_device", {})  # a cache, as cached_property keeps its value
        if device not in copies:
            copies[device] = self.alphas_cumprod.to(device)
        return copies[device]

    @property
    def num_train_timesteps(self) -> int:
        return self.schedule.num_train_timesteps

    def training_example(self, x0: torch.Tensor, noise: torch.Tensor) -> NoisyBatch:
        """t uniform over the steps (Ho et al. 2020, Algorithm 1), the target of `prediction_type`, its weight."""
        timesteps = torch.randint(0, self.num_train_timesteps, (x0.shape[0],), device=x0.device)
        return self.example_at(x0, noise, timesteps)

    def quantile_timesteps(self, quantiles: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """t uniform over the steps: the quantile u is step floor(u T)."""
        return (quantiles * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1).to(x0.device)

    def example_at(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> NoisyBatch:
        alphas_cumprod = self._alphas_on(timesteps.device)
        return NoisyBatch(
            x_t=add_noise(x0, noise, alphas_cumprod, timesteps),
            timesteps=timesteps,
            target=training_target(self.prediction_type, x0, noise, alphas_cumprod, timesteps),
            weight=loss_weight(
                self.loss_weighting, self.prediction_type, alphas_cumprod, timesteps, self.min_snr_gamma
            ),
        )

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return add_noise(x0, noise, self._alphas_on(timesteps.device), timesteps.long())

    def predicted_x0(self, output: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return predicted_x0(self.prediction_type, output, x_t, self._alphas_on(timesteps.device), timesteps.long())

    def alpha_sigma(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return alpha_sigma(self._alphas_on(timesteps.device), timesteps.long())

    def uniform_timesteps(self, size: int, device: torch.device | str) -> torch.Tensor:
        return torch.randint(0, self.num_train_timesteps, (size,), device=device)

    def high_noise_timesteps(self, size: int, mean: float, std: float, device: torch.device | str) -> torch.Tensor:
        """LADD's logit-normal noise levels (Section 3.2) as the paper means them: rectified-flow times s =
        sigmoid(n), n ~ N(mean, std), each mapped to the step of this schedule with the same signal-to-noise ratio,
        SNR(s) = ((1 - s) / s)^2 (the flow's x_s = (1 - s) x_0 + s eps). Taking round(s (T - 1)) as the step
        instead would put the median draw (s = 0.73, SNR 0.14) at step 730 of the linear schedule, SNR 0.0045: 30x
        noisier, where no discriminator separated real from fake (experiments/distillation)."""
        flow_times = torch.sigmoid(torch.randn(size, device=device) * std + mean)
        wanted = 2 * (torch.log1p(-flow_times) - torch.log(flow_times))  # log SNR(s)
        alphas_cumprod = self._alphas_on(torch.device(device) if isinstance(device, str) else device)
        steps_log_snr = torch.log(alphas_cumprod) - torch.log1p(-alphas_cumprod)  # decreasing in the step
        return (steps_log_snr[None, :] - wanted[:, None]).abs().argmin(dim=1)

    def accepts(self, factory: SchedulerFactory) -> bool:
        return not is_flow_sampler(factory)

    def scheduler(self, factory: SchedulerFactory) -> SchedulerMixin:
        """`factory` with exactly this schedule's betas and this prediction type. An SNR-shifted schedule (CogVideoX)
        exists in diffusers' CogVideoX schedulers only: DDIM becomes CogVideoXDDIMScheduler (the same update with the
        shift, what CogVideoXPipeline ships), any other sampler a ConfigError."""
        if not self.accepts(factory):
            raise ConfigError(
                f"sampler {scheduler_name(factory)} integrates a flow, but the model was trained with objective=ddpm: "
                "use a DDPM sampler (ddim, ddpm, dpm, euler)"
            )
        if self.schedule.snr_shift_scale != 1.0:
            factory = _snr_shifted(factory, self.schedule.snr_shift_scale)
        return factory(**self.schedule.scheduler_kwargs(), prediction_type=self.prediction_type)

    @property
    def default_sampler(self) -> SchedulerFactory:
        return DDIMScheduler

    @property
    def few_step_overrides(self) -> dict[str, Any]:
        """DDIM at "trailing" timesteps: the first step is T - 1 (Lin et al. 2024, Table 2)."""
        return {"timestep_spacing": "trailing"}

    @property
    def default_sampler_overrides(self) -> dict[str, Any]:
        """At zero terminal SNR, "trailing" timesteps at any step count: the model's only pure-noise step is T - 1,
        which "leading" spacing never visits (Lin et al. 2024, Section 3.3), as CogVideoXPipeline ships its DDIM."""
        return {"timestep_spacing": "trailing"} if self.schedule.rescale_betas_zero_snr else {}

    def student_timesteps(
        self, count: int, requested: list[int] | None, timestep_arguments: dict[str, Any] | None = None
    ) -> list[float]:
        # DDPM pipelines pass nothing but the count to set_timesteps: `timestep_arguments` is always empty here
        timesteps = list(requested) if requested else trailing_timesteps(self.num_train_timesteps, count)
        outside = [t for t in timesteps if not 0 <= t < self.num_train_timesteps]
        if outside or not timesteps:
            raise ConfigError(
                f"model.student_timesteps={timesteps}: {outside or 'none'} outside the schedule "
                f"0..{self.num_train_timesteps - 1}"
            )
        if self.num_train_timesteps - 1 in timesteps and self.prediction_type == "epsilon":
            if float(self.alphas_cumprod[-1]) == 0.0:  # x_0 = (x_t - sigma eps) / alpha is undefined there
                raise ConfigError(
                    "the schedule has zero terminal SNR and the student would predict epsilon: x_0 cannot be "
                    "recovered at t = T - 1; leave model.student_prediction_type=null (v_prediction) or set sample"
                )
        return [float(t) for t in timesteps]

    def student_sampler(self, timesteps: Sequence[float]) -> StudentSampler:
        """LCMScheduler: each step's x_0 (its c_skip, tiny at timestep_scaling 10, leaves it as is) re-noised with
        fresh noise at the next timestep; its grid is n steps evenly spaced ending at T - 1 (`original_inference_steps`
        = n gives T - 1, ...: the 4-step DMD2 SDXL recipe in diffusers' docs)."""
        if [int(t) for t in timesteps] != trailing_timesteps(self.num_train_timesteps, len(timesteps)):
            raise ConfigError(
                f"model.student_timesteps={[int(t) for t in timesteps]}: the student samples with LCMScheduler, whose "
                "grid is n steps evenly spaced ending at T - 1 (e.g. [999, 749, 499, 249] or [999])"
            )
        return StudentSampler("LCMScheduler", {"original_inference_steps": len(timesteps)}, fresh_noise=True)

    def with_prediction_type(self, prediction_type: str | None) -> DDPM:
        """None: the teacher's own, except an epsilon network where x_0 = (x_t - sigma eps) / alpha amplifies its
        error more than `MAX_FIRST_STEP_AMPLIFICATION` times at T - 1, where a few-step student's first step starts:
        there v-prediction (x_0 = alpha x_t - sigma v, well conditioned at every step; Salimans & Ho 2022, Sec. 4)."""
        if prediction_type is None:
            terminal_alpha = float(self.alphas_cumprod[-1].sqrt())
            if self.prediction_type == "epsilon" and terminal_alpha * MAX_FIRST_STEP_AMPLIFICATION < 1:
                return replace(self, prediction_type="v_prediction")
            return self
        if prediction_type not in typing.get_args(PredictionType):
            raise ConfigError(
                f"model.student_prediction_type={prediction_type!r} is not one of {typing.get_args(PredictionType)}"
            )
        return replace(self, prediction_type=prediction_type)

    def state(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "schedule": dict(vars(self.schedule)),
            "prediction_type": self.prediction_type,
            "loss_weighting": self.loss_weighting,
            "min_snr_gamma": self.min_snr_gamma,
        }
