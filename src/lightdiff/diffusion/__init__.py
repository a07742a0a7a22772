"""Pure diffusion math: schedules and objectives. Tensor in, tensor out; no modules, no state."""

from lightdiff.diffusion.distillation import (
    DistillWeighting,
    distillation_weight,
    high_noise_timesteps,
    trailing_timesteps,
)
from lightdiff.diffusion.objectives import (
    LossWeighting,
    PredictionType,
    add_noise,
    check_objective,
    loss_weight,
    min_snr_weight,
    offset_noise,
    predicted_x0,
    snr,
    training_target,
    velocity,
    weighted_mse,
)
from lightdiff.diffusion.schedules import BetaScheduleName, NoiseSchedule

__all__ = [
    "BetaScheduleName",
    "DistillWeighting",
    "LossWeighting",
    "NoiseSchedule",
    "PredictionType",
    "add_noise",
    "check_objective",
    "distillation_weight",
    "high_noise_timesteps",
    "loss_weight",
    "min_snr_weight",
    "offset_noise",
    "predicted_x0",
    "snr",
    "trailing_timesteps",
    "training_target",
    "velocity",
    "weighted_mse",
]
