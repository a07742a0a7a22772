"""Schedules and objectives against closed forms, diffusers, and pinned values."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from lightdiff.diffusion import (
    DDPM,
    NoiseSchedule,
    add_noise,
    loss_weight,
    min_snr_weight,
    offset_noise,
    predicted_x0,
    snr,
    training_target,
    velocity,
)
from lightdiff.diffusion.schedules import cosine_alpha_bar

SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"]


def test_linear_schedule_pinned_values() -> None:
    schedule = NoiseSchedule("linear", 1000, 1e-4, 0.02)
    betas = schedule.betas()
    assert betas[0].item() == pytest.approx(1e-4)
    assert betas[-1].item() == pytest.approx(0.02)
    # alpha_bar_T of the DDPM paper's schedule: prod(1 - beta_t) ~ 4.04e-5
    assert schedule.alphas_cumprod()[-1].item() == pytest.approx(4.0358e-5, rel=1e-3)


def test_cosine_alpha_bar_closed_form() -> None:
    """alpha_bar_t / alpha_bar_0 = cos^2(((t/T + s)/(1 + s)) pi/2) / cos^2((s/(1 + s)) pi/2) (Eq. 17)."""
    T, s = 1000, 0.008
    alpha_bar = NoiseSchedule("squaredcos_cap_v2", T).alphas_cumprod()

    def closed(t: int) -> float:
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2

    for t in (1, 100, 500, 900):
        # index t-1 holds alpha_bar after t betas, i.e. at continuous time t/T
        assert alpha_bar[t - 1].item() == pytest.approx(closed(t), rel=1e-9)
    assert alpha_bar[499].item() == pytest.approx(0.4938, abs=1e-4)  # pinned: ~0.5 at mid-trajectory
    assert cosine_alpha_bar(torch.tensor(1.0)).item() == pytest.approx(0.0, abs=1e-8)


@pytest.mark.parametrize("name", SCHEDULES)
def test_betas_equal_diffusers_ddpm(name: str) -> None:
    schedule = NoiseSchedule(name, 1000, 1e-4, 0.02)
    reference = DDPMScheduler(num_train_timesteps=1000, beta_schedule=name, beta_start=1e-4, beta_end=0.02)
    torch.testing.assert_close(schedule.betas().float(), reference.betas, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize(
    "scheduler_class", [DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler]
)
def test_every_sampler_sees_the_training_schedule(name: str, scheduler_class: type) -> None:
    schedule = NoiseSchedule(name, 1000, 1e-4, 0.02)
    scheduler = scheduler_class(**schedule.scheduler_kwargs())
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), schedule.alphas_cumprod(), atol=1e-6, rtol=1e-4)
    assert NoiseSchedule.from_scheduler_config(dict(scheduler.config)) == schedule


def test_zero_terminal_snr() -> None:
    schedule = NoiseSchedule("scaled_linear", 1000, 0.00085, 0.012, rescale_betas_zero_snr=True)
    alpha_bar = schedule.alphas_cumprod()
    assert alpha_bar[-1].item() == pytest.approx(0.0, abs=1e-12)
    plain = NoiseSchedule("scaled_linear", 1000, 0.00085, 0.012).alphas_cumprod()
    assert alpha_bar[0].item() == pytest.approx(plain[0].item(), rel=1e-9)  # the first level is kept


def test_bad_schedule_names_the_value() -> None:
    with pytest.raises(ValueError, match="cosinus"):
        NoiseSchedule("cosinus")  # type: ignore[arg-type]


def test_add_noise_matches_diffusers_and_targets_invert() -> None:
    torch.manual_seed(0)
    schedule = NoiseSchedule("squaredcos_cap_v2")
    alpha_bar = schedule.alphas_cumprod().float()
    x0, noise = torch.randn(6, 3, 8, 8), torch.randn(6, 3, 8, 8)
    t = torch.tensor([0, 10, 250, 500, 750, 998])
    x_t = add_noise(x0, noise, alpha_bar, t)
    reference = DDPMScheduler(**schedule.scheduler_kwargs())
    torch.testing.assert_close(x_t, reference.add_noise(x0, noise, t), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        velocity(x0, noise, alpha_bar, t), reference.get_velocity(x0, noise, t), atol=1e-5, rtol=1e-5
    )
    for kind in ("epsilon", "v_prediction", "sample"):
        target = training_target(kind, x0, noise, alpha_bar, t)
        torch.testing.assert_close(predicted_x0(kind, target, x_t, alpha_bar, t)[:5], x0[:5], atol=1e-3, rtol=1e-3)


def test_v_identity() -> None:
    """x0 = alpha x_t - sigma v and eps = sigma x_t + alpha v (Salimans & Ho 2022)."""
    torch.manual_seed(1)
    alpha_bar = NoiseSchedule("linear").alphas_cumprod().float()
    x0, noise, t = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4), torch.tensor([1, 200, 600, 999])
    x_t, v = add_noise(x0, noise, alpha_bar, t), velocity(x0, noise, alpha_bar, t)
    alpha = alpha_bar[t].sqrt().view(-1, 1, 1, 1)
    sigma = (1 - alpha_bar[t]).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(alpha * x_t - sigma * v, x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sigma * x_t + alpha * v, noise, atol=1e-5, rtol=1e-5)


def test_min_snr_weights_pinned() -> None:
    # alpha_bar = 10/11 -> SNR = 10; alpha_bar = 1/2 -> SNR = 1
    alpha_bar = torch.tensor([10 / 11, 0.5], dtype=torch.float64)
    t = torch.tensor([0, 1])
    torch.testing.assert_close(snr(alpha_bar, t), torch.tensor([10.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(
        min_snr_weight("epsilon", alpha_bar, t, 5.0), torch.tensor([0.5, 1.0], dtype=torch.float64)
    )
    torch.testing.assert_close(
        min_snr_weight("v_prediction", alpha_bar, t, 5.0), torch.tensor([5 / 11, 0.5], dtype=torch.float64)
    )
    torch.testing.assert_close(
        min_snr_weight("sample", alpha_bar, t, 5.0), torch.tensor([5.0, 1.0], dtype=torch.float64)
    )
    torch.testing.assert_close(loss_weight("none", "epsilon", alpha_bar, t, 5.0), torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="max_snr"):
        loss_weight("max_snr", "epsilon", alpha_bar, t, 5.0)  # type: ignore[arg-type]


def test_offset_noise_shifts_whole_channels() -> None:
    noise = torch.zeros(2, 3, 5, 5)
    shifted = offset_noise(noise, 0.1, generator=torch.Generator().manual_seed(0))
    per_channel = shifted.flatten(2)
    assert torch.all(per_channel == per_channel[..., :1])  # constant within each channel
    assert per_channel[..., 0].abs().sum() > 0
    assert offset_noise(noise, 0.0) is noise


def test_ddim_eta_one_has_ddpm_variance() -> None:
    """DDIM's sigma_t at eta=1 is DDPM's posterior variance beta_tilde_t (Song et al. 2021, Eq. 16)."""
    schedule = NoiseSchedule("linear")
    ddim = DDIMScheduler(**schedule.scheduler_kwargs())
    ddpm = DDPMScheduler(**schedule.scheduler_kwargs(), variance_type="fixed_small")
    ddim.set_timesteps(1000)
    ddpm.set_timesteps(1000)
    for t in (999, 500, 10):
        assert ddim._get_variance(t, t - 1).item() == pytest.approx(ddpm._get_variance(t).item(), rel=1e-5)


def test_objective_settings_are_checked_by_name() -> None:
    schedule = NoiseSchedule("linear")
    DDPM(schedule, "v_prediction", "min_snr", 5.0)
    with pytest.raises(ValueError, match="objective.prediction_type='eps'"):
        DDPM(schedule, "eps", "none", 5.0)
    with pytest.raises(ValueError, match="objective.loss_weighting='snr'"):
        DDPM(schedule, "epsilon", "snr", 5.0)
    with pytest.raises(ValueError, match="objective.min_snr_gamma=0"):
        DDPM(schedule, "epsilon", "min_snr", 0)
