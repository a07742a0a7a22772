"""Pure diffusion math: schedules and objectives. Tensor in, tensor out; no modules, no state."""

from lightdiff.diffusion.distillation import (
    DistillWeighting,
    distillation_weight,
    high_noise_timesteps,
    trailing_timesteps,
)
from lightdiff.diffusion.flow_matching import (
    interpolate,
    logit_normal_timesteps,
    shift_timesteps,
    velocity_target,
    x0_from_velocity,
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
    "interpolate",
    "logit_normal_timesteps",
    "loss_weight",
    "min_snr_weight",
    "offset_noise",
    "predicted_x0",
    "snr",
    "shift_timesteps",
    "trailing_timesteps",
    "training_target",
    "velocity",
    "velocity_target",
    "weighted_mse",
    "x0_from_velocity",
]
