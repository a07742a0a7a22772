"""Diffusion math: schedules, the objectives behind one interface (`Objective`: DDPM, flow matching, EDM),
distillation weights.
Tensor in, tensor out; each function cites its paper and equation."""

from lightdiff.diffusion.distillation import (
    DistillWeighting,
    distillation_distance,
    distillation_weight,
    distribution_matching_gradient,
    distribution_matching_loss,
    trailing_timesteps,
)
from lightdiff.diffusion.edm import EDM
from lightdiff.diffusion.flow_matching import (
    FlowMatching,
    flow_alpha_sigma,
    interpolate,
    logit_normal_timesteps,
    objective_from_state,
    shift_timesteps,
    velocity_target,
    x0_from_velocity,
)
from lightdiff.diffusion.objective import (
    NoisyBatch,
    Objective,
    SchedulerFactory,
    StudentSampler,
    is_flow_sampler,
    timesteps_within,
)
from lightdiff.diffusion.objectives import (
    DDPM,
    LossWeighting,
    PredictionType,
    add_noise,
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
    "DDPM",
    "BetaScheduleName",
    "DistillWeighting",
    "EDM",
    "FlowMatching",
    "LossWeighting",
    "NoiseSchedule",
    "NoisyBatch",
    "Objective",
    "PredictionType",
    "SchedulerFactory",
    "StudentSampler",
    "add_noise",
    "distillation_distance",
    "distillation_weight",
    "distribution_matching_gradient",
    "distribution_matching_loss",
    "flow_alpha_sigma",
    "interpolate",
    "is_flow_sampler",
    "logit_normal_timesteps",
    "loss_weight",
    "min_snr_weight",
    "objective_from_state",
    "offset_noise",
    "predicted_x0",
    "snr",
    "timesteps_within",
    "shift_timesteps",
    "trailing_timesteps",
    "training_target",
    "velocity",
    "velocity_target",
    "weighted_mse",
    "x0_from_velocity",
]
