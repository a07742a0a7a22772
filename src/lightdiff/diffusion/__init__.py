"""Pure diffusion math: schedules and objectives. Tensor in, tensor out; no modules, no state."""

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
    "LossWeighting",
    "NoiseSchedule",
    "PredictionType",
    "add_noise",
    "check_objective",
    "loss_weight",
    "min_snr_weight",
    "offset_noise",
    "predicted_x0",
    "snr",
    "training_target",
    "velocity",
    "weighted_mse",
]
