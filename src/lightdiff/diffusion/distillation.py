"""Distillation math: adversarial diffusion distillation (ADD: Sauer et al. 2023, arXiv 2311.17042; LADD: Sauer et
al. 2024, arXiv 2403.12015) and distribution matching (DMD: Yin et al. 2024, arXiv 2311.18828; DMD2: arXiv
2405.14867). Pure tensor functions; the noise levels come from the objective (`Objective.alpha_sigma`).
"""

from __future__ import annotations

import typing
from typing import Literal

import torch
import torch.nn.functional as F

DistillWeighting = Literal["alpha_bar", "sds", "none"]


def trailing_timesteps(num_train_timesteps: int, count: int) -> list[int]:
    """`count` timesteps evenly spaced and ending at the last one, T - 1 (diffusers' "trailing" spacing; Lin et al.
    2024, "Common diffusion noise schedules and sample steps are flawed", Table 2): the student's timesteps, so a
    1-step student starts from pure noise and a diffusers scheduler with trailing spacing visits the same steps."""
    if not 1 <= count <= num_train_timesteps:
        raise ValueError(f"cannot space {count} timesteps over {num_train_timesteps}")
    step = num_train_timesteps / count
    return [round(num_train_timesteps - i * step) - 1 for i in range(count)]


def distillation_weight(weighting: DistillWeighting, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """c(t) of the distillation loss c(t) ||x_student - x_teacher(x_t, t)||^2 (ADD, Equation 3 and Appendix), for
    any path x_t = alpha x_0 + sigma eps (`Objective.alpha_sigma`: a DDPM's, or rectified flow's (1 - t, t)).

    alpha_bar: c(t) = alpha_t^2 = alpha_bar_t, ADD's "exponential" weighting, light at high noise where the teacher's
    x_0 is a blur. sds: the weighting that makes the x_0-space loss's gradient equal score distillation's
    (DreamFusion, Poole et al. 2022, Equation 3, w(t) = sigma_t^2): since eps_teacher - eps = (alpha_t / sigma_t)
    (x_student - x_teacher), w(t) (eps_teacher - eps) = 2 c(t) (x_student - x_teacher) gives c(t) = alpha_t sigma_t
    / 2; the derivation holds unchanged on the flow's path. none: c(t) = 1.
    """
    if weighting == "alpha_bar":
        return alpha**2
    if weighting == "sds":
        return alpha * sigma / 2
    if weighting == "none":
        return torch.ones_like(alpha)
    raise ValueError(f"model.distill_weighting={weighting!r} is not one of {typing.get_args(DistillWeighting)}")


def distillation_distance(student_x0: torch.Tensor, teacher_x0: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """E[c(t) d(x_theta, x_psi)] with ADD's d(x, y) = ||x - y||_2^2 (Equation 3): the squared norm of each sample,
    summed over all its elements, then averaged over the batch. On this scale `distill_weight=2.5` is the paper's
    lambda; a per-element mean would divide the term by the sample's size (3 x 16 x 16 = 768 on shapes, 16384 for
    SD's 4 x 64 x 64 latents), so that the published weight leaves the adversarial term in charge."""
    squared_norms = (student_x0.float() - teacher_x0.float()).pow(2).flatten(1).sum(dim=1)
    return (weight.float() * squared_norms).mean()


def distribution_matching_gradient(
    sample_x0: torch.Tensor,  # G's samples x_0 (B, ...)
    real_x0: torch.Tensor,  # the real score's (the teacher's) x_0 prediction at x_t = noised(x_0, t)
    fake_x0: torch.Tensor,  # the fake score's x_0 prediction at the same x_t
) -> torch.Tensor:
    """DMD's gradient of the KL between G's distribution and the data's with respect to G's samples (Yin et al.
    2024, Equation 7, its normaliser from Section 3.3): (mu_fake(x_t) - mu_real(x_t)) / mean |x_0 - mu_real(x_t)|,
    per sample. The scores are s = -(x_t - alpha mu(x_t)) / sigma^2, so s_fake - s_real is (alpha / sigma^2)
    (mu_fake - mu_real): its sign points from the data's density to G's, and descending it moves x_0 toward the
    data. The normaliser makes its scale free of how far the sample is from the data. Non-finite entries (a
    normaliser of 0) are zeroed."""
    normaliser = (sample_x0 - real_x0).abs().flatten(1).mean(dim=1).clamp_min(1e-8)
    gradient = (fake_x0 - real_x0) / normaliser.reshape(-1, *([1] * (sample_x0.ndim - 1)))
    return torch.nan_to_num(gradient)


def distribution_matching_loss(sample_x0: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """0.5 ||x_0 - sg(x_0 - gradient)||^2, averaged over elements: a loss whose gradient with respect to x_0 is
    `gradient` / (its element count), so back-propagating it through G applies DMD's gradient (DMD2's code)."""
    return 0.5 * F.mse_loss(sample_x0.float(), (sample_x0 - gradient).detach().float())
