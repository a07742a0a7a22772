"""Consistency distillation math (latent consistency models, LCM: Luo et al. 2023, arXiv 2310.04378; consistency
models: Song et al. 2023, arXiv 2303.01469). Pure tensor functions; noise levels come from the objective.
"""

from __future__ import annotations

import torch


def solver_timesteps(num_train_timesteps: int, num_solver_steps: int) -> list[int]:
    """The skipping-step grid t_n = (n + 1) k - 1, k = T // N (LCM, Section 4.3, "skipping-step"): consistency is
    enforced between t_{n+1} and t_n = t_{n+1} - k, and diffusers' LCMScheduler samples on the same grid (its
    `original_inference_steps` = N), so the student is trained at the timesteps it is sampled at."""
    if not 1 <= num_solver_steps <= num_train_timesteps:
        raise ValueError(f"num_solver_steps={num_solver_steps} must lie in 1..{num_train_timesteps}")
    skip = num_train_timesteps // num_solver_steps
    return [(n + 1) * skip - 1 for n in range(num_solver_steps)]


def boundary_scalings(
    timesteps: torch.Tensor, timestep_scaling: float = 10.0, sigma_data: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip(t), c_out(t)) of the consistency function f(x, t) = c_skip(t) x + c_out(t) x_0-prediction(x, t):
    c_skip = sigma_data^2 / ((s t)^2 + sigma_data^2), c_out = s t / sqrt((s t)^2 + sigma_data^2) (consistency
    models, Section 3 and Appendix C; LCM, Equation 9, with its timestep scaling s = 10). f(x, 0) = x, the boundary
    condition, and f is nearly the x_0 prediction elsewhere. As LCMScheduler samples
    (`get_scalings_for_boundary_condition_discrete`)."""
    scaled = timesteps.double() * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2).sqrt()
    return c_skip.float(), c_out.float()


def ddim_step(
    x0: torch.Tensor,
    x_t: torch.Tensor,
    alpha_sigma_t: tuple[torch.Tensor, torch.Tensor],
    alpha_sigma_prev: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """One deterministic DDIM step from t to an earlier t_prev given an x_0 estimate: x_prev = alpha_prev x_0 +
    sigma_prev eps_hat, eps_hat = (x_t - alpha_t x_0) / sigma_t (Song et al. 2021, Equation 12 with eta = 0). LCM's
    ODE solver Psi (Section 4.2); on a flow's path (alpha, sigma) = (1 - t, t) it is the Euler step."""
    (alpha_t, sigma_t), (alpha_prev, sigma_prev) = alpha_sigma_t, alpha_sigma_prev
    shape = (-1, *([1] * (x_t.ndim - 1)))
    noise = (x_t - alpha_t.reshape(shape) * x0) / sigma_t.reshape(shape)
    return alpha_prev.reshape(shape) * x0 + sigma_prev.reshape(shape) * noise


def pseudo_huber(prediction: torch.Tensor, target: torch.Tensor, c: float) -> torch.Tensor:
    """mean(sqrt((a - b)^2 + c^2) - c) (Song & Dhariwal 2023, "Improved techniques for training consistency
    models", Section 3.3): quadratic near 0, linear for outliers; diffusers' LCM recipe uses c = 0.001."""
    return ((prediction.float() - target.float()).pow(2) + c**2).sqrt().sub(c).mean()
