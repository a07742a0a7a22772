"""Training objectives of discrete-time diffusion: noising, prediction targets, x0 recovery and loss weights.

alpha = sqrt(alpha_bar_t) and sigma = sqrt(1 - alpha_bar_t) throughout, so x_t = alpha x_0 + sigma eps
(Ho et al. 2020, Equation 4) and the signal-to-noise ratio is SNR(t) = alpha^2 / sigma^2 (Kingma et al. 2021, Eq. 2).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any, Literal

import torch

PredictionType = Literal["epsilon", "v_prediction", "sample"]
LossWeighting = Literal["none", "min_snr"]


@dataclass(frozen=True)
class DDPM:
    """The discrete-time denoising objective (`objective=ddpm`, the default): x_t = alpha_t x_0 + sigma_t eps over
    the `schedule` group's betas; the prediction type and loss weighting are the method's own keys (model.*)."""

    def state(self) -> dict[str, Any]:
        """Plain data for a checkpoint's `lightdiff` block."""
        return {"name": "ddpm"}


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample vector (B,) to broadcast against a batch shaped like `like` (B, C, H, W)."""
    return values.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def check_objective(prediction_type: str, loss_weighting: str, min_snr_gamma: float) -> None:
    """Fail at construction, naming the config key, rather than at the first training step."""
    if prediction_type not in typing.get_args(PredictionType):
        raise ValueError(f"model.prediction_type={prediction_type!r} is not one of {typing.get_args(PredictionType)}")
    if loss_weighting not in typing.get_args(LossWeighting):
        raise ValueError(f"model.loss_weighting={loss_weighting!r} is not one of {typing.get_args(LossWeighting)}")
    if min_snr_gamma <= 0:
        raise ValueError(f"model.min_snr_gamma={min_snr_gamma} must be positive")


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
    shift = torch.randn(noise.shape[0], noise.shape[1], 1, 1, generator=generator, device=noise.device)
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
