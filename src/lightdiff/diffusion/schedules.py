"""Noise schedules: betas, alpha_bar and SNR as pure tensor functions.

Notation follows Ho et al. 2020 ("DDPM", arXiv 2006.11239): x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps
(Equation 4), with alpha_bar_t = prod_{s<=t} (1 - beta_s). Every schedule here produces exactly the betas of the
diffusers scheduler of the same name, so training and diffusers sampling agree (tests pin this).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

BetaScheduleName = Literal["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"]


def linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """Linearly spaced betas (Ho et al. 2020, Section 4: 1e-4 to 0.02 over T=1000)."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def scaled_linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """Betas linear in sqrt(beta), as used by latent diffusion / Stable Diffusion."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2


def cosine_alpha_bar(t: torch.Tensor, offset: float = 0.008) -> torch.Tensor:
    """alpha_bar(t) = cos^2(((t + s) / (1 + s)) * pi / 2) for t in [0, 1] (Nichol & Dhariwal 2021, Equation 17).

    Unnormalised, as diffusers' `betas_for_alpha_bar` uses it: only ratios alpha_bar(t2) / alpha_bar(t1) matter.
    """
    return torch.cos((t + offset) / (1 + offset) * math.pi / 2) ** 2


def cosine_betas(num_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """beta_t = min(1 - alpha_bar(t / T) / alpha_bar((t - 1) / T), 0.999) (Nichol & Dhariwal 2021, Section 3.2).

    This is diffusers' `squaredcos_cap_v2`; the clip at 0.999 avoids a singularity at t = T.
    """
    steps = torch.arange(num_timesteps, dtype=torch.float64)
    ratio = cosine_alpha_bar((steps + 1) / num_timesteps) / cosine_alpha_bar(steps / num_timesteps)
    return torch.clamp(1 - ratio, max=max_beta)


def sigmoid_betas(num_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """Betas following a sigmoid over [-6, 6], rescaled to [beta_start, beta_end] (GeoDiff, Xu et al. 2022)."""
    return (
        torch.sigmoid(torch.linspace(-6, 6, num_timesteps, dtype=torch.float64)) * (beta_end - beta_start) + beta_start
    )


def rescale_alpha_bar_zero_terminal_snr(alpha_bar: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alpha_bar) so that alpha_bar_T = 0 and alpha_bar_1 is kept (Lin et al. 2023, arXiv
    2305.08891, Algorithm 1)."""
    sqrt_alpha_bar = alpha_bar.sqrt()
    first, last = sqrt_alpha_bar[0].clone(), sqrt_alpha_bar[-1].clone()
    return ((sqrt_alpha_bar - last) * first / (first - last)) ** 2


def shift_snr(alpha_bar: torch.Tensor, scale: float) -> torch.Tensor:
    """alpha_bar / (scale + (1 - scale) alpha_bar), which is SNR(t) / scale at every step: the noise levels of a
    `scale`-times larger input (Esser et al. 2024, Section 5.3.2's resolution shift; CogVideoX trains with 3.0,
    CogVideoXDDIMScheduler's `snr_shift_scale`)."""
    return alpha_bar / (scale + (1 - scale) * alpha_bar)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas whose alpha_bar is rescaled to zero terminal SNR (`rescale_alpha_bar_zero_terminal_snr`), as diffusers'
    schedulers apply it to betas."""
    alpha_bar = rescale_alpha_bar_zero_terminal_snr(torch.cumprod(1 - betas, dim=0))
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


@dataclass(frozen=True)
class NoiseSchedule:
    """A discrete DDPM forward process; its fields are diffusers' scheduler arguments of the same names."""

    beta_schedule: BetaScheduleName  # diffusers' name: linear | scaled_linear | squaredcos_cap_v2 (cosine) | sigmoid
    num_train_timesteps: int = 1000  # T, the number of discrete noise levels
    beta_start: float = 1e-4  # beta_1 (ignored by squaredcos_cap_v2)
    beta_end: float = 0.02  # beta_T (ignored by squaredcos_cap_v2)
    rescale_betas_zero_snr: bool = False  # force alpha_bar_T = 0 (Lin et al. 2023); needed for 1-step students
    snr_shift_scale: float = 1.0  # divide every SNR by this (CogVideoX: 3.0), before any zero-SNR rescaling

    def __post_init__(self) -> None:
        if self.beta_schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"):
            raise ValueError(
                f"schedule.beta_schedule={self.beta_schedule!r} is not one of "
                "linear, scaled_linear, squaredcos_cap_v2, sigmoid"
            )
        if self.num_train_timesteps < 2:
            raise ValueError(f"schedule.num_train_timesteps={self.num_train_timesteps} must be at least 2")
        if not 0 < self.beta_start < 1 or not 0 < self.beta_end < 1:
            raise ValueError(f"schedule betas must lie in (0, 1); got {self.beta_start} and {self.beta_end}")
        if self.snr_shift_scale <= 0:
            raise ValueError(f"schedule.snr_shift_scale={self.snr_shift_scale} must be positive")

    def betas(self) -> torch.Tensor:
        """float64 betas of length T (before any SNR shift: `alphas_cumprod` applies it)."""
        n = self.num_train_timesteps
        if self.beta_schedule == "linear":
            betas = linear_betas(n, self.beta_start, self.beta_end)
        elif self.beta_schedule == "scaled_linear":
            betas = scaled_linear_betas(n, self.beta_start, self.beta_end)
        elif self.beta_schedule == "squaredcos_cap_v2":
            betas = cosine_betas(n)
        else:
            betas = sigmoid_betas(n, self.beta_start, self.beta_end)
        if self.snr_shift_scale != 1.0:  # the shift comes first; `alphas_cumprod` rescales after it
            return betas
        return rescale_zero_terminal_snr(betas) if self.rescale_betas_zero_snr else betas

    def alphas_cumprod(self) -> torch.Tensor:
        """alpha_bar_t = prod_{s<=t} (1 - beta_s) (Ho et al. 2020, Equation 4), float64; SNR-shifted, then rescaled
        to zero terminal SNR, where the schedule says so (CogVideoXDDIMScheduler's order)."""
        alpha_bar = torch.cumprod(1 - self.betas(), dim=0)
        if self.snr_shift_scale == 1.0:
            return alpha_bar
        alpha_bar = shift_snr(alpha_bar, self.snr_shift_scale)
        return rescale_alpha_bar_zero_terminal_snr(alpha_bar) if self.rescale_betas_zero_snr else alpha_bar

    def scheduler_kwargs(self) -> dict[str, object]:
        """Arguments that make any diffusers scheduler use exactly these betas.

        diffusers' DDIM, DPM-Solver and Euler schedulers do not know `sigmoid`, so it travels as explicit betas.
        """
        kwargs: dict[str, object] = {
            "num_train_timesteps": self.num_train_timesteps,
            "beta_schedule": self.beta_schedule,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "rescale_betas_zero_snr": self.rescale_betas_zero_snr,
        }
        if self.snr_shift_scale != 1.0:  # only CogVideoX's schedulers take it (DDPM.scheduler picks them)
            kwargs["snr_shift_scale"] = self.snr_shift_scale
        if self.beta_schedule == "sigmoid":
            kwargs["beta_schedule"] = "linear"
            kwargs["trained_betas"] = sigmoid_betas(self.num_train_timesteps, self.beta_start, self.beta_end).tolist()
        return kwargs

    @classmethod
    def from_scheduler_config(cls, config: dict) -> NoiseSchedule:
        """Rebuild the schedule from a diffusers scheduler config (an exported pipeline's scheduler)."""
        name = config.get("beta_schedule", "linear")
        if config.get("trained_betas") is not None:
            name = "sigmoid"  # the only schedule we export as explicit betas
        return cls(
            beta_schedule=name,
            num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
            beta_start=float(config.get("beta_start", 1e-4)),
            beta_end=float(config.get("beta_end", 0.02)),
            rescale_betas_zero_snr=bool(config.get("rescale_betas_zero_snr", False)),
            snr_shift_scale=float(config.get("snr_shift_scale", 1.0)),
        )
