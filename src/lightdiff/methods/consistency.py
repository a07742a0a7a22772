"""LCM: latent consistency distillation of a text-conditioned teacher into a 1-4 step student (`model=lcm`).

Luo et al. 2023, "Latent Consistency Models" (arXiv 2310.04378), Algorithm 1, as diffusers' consistency-distillation
example trains it. The student is the teacher's UNet with a guidance-scale input (`time_cond_proj_dim`, zero-initialised
so it starts as the teacher); the target network is an exponential moving average of the student (decay
`target_decay`); teacher, VAE and text encoder stay frozen. Each step:

1. real latents x_0 are noised to x_{t_{n+k}} at a timestep of the skipping-step grid (`num_solver_steps` of them,
   k = T / N apart) and a guidance scale w + 1 ~ U[`guidance_scale_min`, `guidance_scale_max`] is drawn per sample;
2. the student's consistency output f_theta(x_{t_{n+k}}, w, c) = c_skip x + c_out x_0-prediction
   (`diffusion.consistency.boundary_scalings`);
3. the teacher's guided x_0 at x_{t_{n+k}} (scale w + 1) takes one DDIM step to x_{t_n} (the solver Psi), and the
   target network's f at (x_{t_n}, t_n) is the target (no gradient);
4. loss: pseudo-Huber (c = `huber_c`) or squared error between the two; after the optimiser step the target network
   moves toward the student.

The student samples with diffusers' LCMScheduler on the same grid, one network call per step, with the guidance
scale as an input (`GuidanceEmbedded` at `sample_guidance_scale`); it exports a LatentConsistencyModelPipeline.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from diffusers import LCMScheduler, SchedulerMixin

from lightdiff.checkpointing import check_checkpoint_fits, denoiser_metadata
from lightdiff.config import ConfigError, PositiveFloat
from lightdiff.contract import Preview
from lightdiff.data import ImageDataModule
from lightdiff.diffusion import SchedulerFactory
from lightdiff.diffusion.consistency import boundary_scalings, ddim_step, pseudo_huber, solver_timesteps
from lightdiff.methods.optimization import (
    OptimisesItsNetwork,
    OptimizerFactory,
    check_lr_schedule,
)
from lightdiff.methods.teacher import FrozenTeacher, few_step_preview, save_student
from lightdiff.nets.denoiser import network_output
from lightdiff.nets.families import Condition, family_of
from lightdiff.nets.families.sd import GuidanceEmbedded
from lightdiff.nets.low_precision import BaseQuantization, BaseStorage
from lightdiff.sampling import for_latents

FROZEN_PREFIXES = ("teacher.",)  # reloaded from `teacher`, not saved


class ConsistencyDistillation(OptimisesItsNetwork, pl.LightningModule):
    """Distils `teacher` into a latent consistency model (`self.net`)."""

    distance_prefix = ""
    metric_steps = [1, 2, 4]

    def __init__(
        self,
        data: ImageDataModule,  # given by train.py: must be what the teacher was trained on
        teacher: str,  # lightdiff checkpoint of a text-conditioned latent model, or a diffusers pipeline folder / id
        teacher_config: str | None = None,  # `teacher` a single-file SD checkpoint: its pipeline's configs
        num_solver_steps: int = 50,  # N of the skipping-step grid (k = T / N); LCMScheduler's original_inference_steps
        guidance_scale_min: float = 2.0,  # the range of the teacher's guidance scale w + 1 drawn per sample
        guidance_scale_max: float = 8.0,
        sample_guidance_scale: float = 4.0,  # the scale previews and exports sample at (the pipeline's default)
        guidance_embedding_dim: int = 256,  # time_cond_proj_dim of the student
        timestep_scaling: float = 10.0,  # s of the boundary scalings (LCMScheduler's timestep_scaling)
        loss: Literal["huber", "l2"] = "huber",
        huber_c: float = 0.001,  # c of the pseudo-Huber loss
        target_decay: float = 0.95,  # EMA decay of the target network
        student_prediction_type: str | None = None,  # None: the teacher's, or v where epsilon fails at T - 1
        optimizer: OptimizerFactory = torch.optim.AdamW,  # (parameters, lr) -> optimiser
        lr: PositiveFloat = 1e-4,  # peak learning rate
        lr_schedule: Literal["constant", "cosine"] = "constant",  # after warm-up: constant, or cosine to 0 at max_steps
        warmup_steps: int = 0,  # linear learning-rate warm-up from 0
        max_grad_norm: float | None = 1.0,  # clip the student's gradient norm (None: off)
        teacher_steps: int = 50,  # the teacher's steps in the preview grids
        compile: bool = False,  # torch.compile the student (regional where diffusers defines repeated blocks)
        channels_last: bool = False,  # NHWC student weights: faster convolutions on GPU
        gradient_checkpointing: bool = False,  # recompute the student's activations in backward: less memory
        base_quantization: BaseQuantization = "none",  # int8 | fp8 | nf4: the frozen teacher quantised (torchao)
        base_storage: BaseStorage = "none",  # fp8: the frozen teacher stored in fp8, computed in its dtype
    ) -> None:
        super().__init__()
        self.strict_loading = False  # checkpoints leave out the frozen teacher: it is reloaded from `teacher`
        if not 0 < guidance_scale_min <= guidance_scale_max:
            raise ConfigError(
                f"model.guidance_scale_min={guidance_scale_min} and model.guidance_scale_max={guidance_scale_max} "
                "must satisfy 0 < min <= max"
            )
        if loss not in ("huber", "l2"):
            raise ConfigError(f"model.loss={loss!r} is not one of ('huber', 'l2')")
        if not 0 <= target_decay < 1:
            raise ConfigError(f"model.target_decay={target_decay} must lie in [0, 1)")
        self.teacher = FrozenTeacher(
            teacher, data, sample_guidance_scale, "lcm", teacher_config, base_quantization, base_storage
        )
        refusal = ConfigError(
            f"model=lcm distils a text-conditioned UNet (it embeds the guidance scale); model.teacher={teacher!r} "
            f"is a {type(self.teacher.net).__name__}: use model=turbo or model=dmd2"
        )
        if not self.teacher.conditioning.has_unconditional:
            raise refusal
        if not self.teacher.objective.accepts(LCMScheduler):
            raise ConfigError(f"model=lcm samples with LCMScheduler (DDPM paths); model.teacher={teacher!r} is a flow")
        self.objective = self.teacher.objective.with_prediction_type(student_prediction_type)
        self.timesteps = solver_timesteps(self.objective.num_train_timesteps, num_solver_steps)
        self.skip = self.objective.num_train_timesteps // num_solver_steps
        try:  # the guidance as LCM's `timestep_cond` embedding: a UNet's (a FLUX transformer embeds the scale itself)
            net, self.conditioning = family_of(self.teacher.net).with_guidance_input(
                self.teacher.net, self.teacher.conditioning, sample_guidance_scale, guidance_embedding_dim
            )
        except ConfigError as error:
            raise refusal from error
        if not isinstance(self.conditioning, GuidanceEmbedded):
            raise refusal
        self.net = net.requires_grad_(True).train()
        self.target_net = copy.deepcopy(self.net).requires_grad_(False).eval()
        self.vae = self.teacher.vae
        self.conditioning.check(self.net, data)
        self.class_names = self.teacher.class_names
        self.num_solver_steps, self.timestep_scaling = num_solver_steps, timestep_scaling
        self.guidance_scale_min, self.guidance_scale_max = guidance_scale_min, guidance_scale_max
        self.loss_kind, self.huber_c, self.target_decay = loss, huber_c, target_decay
        self.optimizer_factory, self.lr, self.max_grad_norm = optimizer, lr, max_grad_norm
        check_lr_schedule(lr_schedule, warmup_steps)
        self.lr_schedule, self.warmup_steps = lr_schedule, warmup_steps
        self.teacher_steps = teacher_steps
        self.compile_net, self.channels_last = compile, channels_last
        self.gradient_checkpointing = gradient_checkpointing
        self.teacher.store_in_low_precision()  # the student copies exist now

    def train(self, mode: bool = True) -> ConsistencyDistillation:
        super().train(mode)
        self.target_net.eval()  # an average, never trained
        return self

    def consistency_output(
        self, net: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, condition: Condition
    ) -> torch.Tensor:
        """f(x_t, t) = c_skip(t) x_t + c_out(t) x_0-prediction(x_t, t)."""
        c_skip, c_out = boundary_scalings(t, self.timestep_scaling)
        shape = (-1, *([1] * (x_t.ndim - 1)))
        x0 = self.objective.predicted_x0(network_output(net, x_t, t, condition), x_t, t)
        return c_skip.reshape(shape) * x_t + c_out.reshape(shape) * x0

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x0 = self.teacher.encode(batch["pixel_values"])
        size, device = len(x0), x0.device
        # 1. A grid timestep t_{n+k}, the one k before it, and a guidance scale per sample.
        index = torch.randint(0, len(self.timesteps), (size,), device=device)
        t_start = torch.tensor(self.timesteps, device=device)[index]
        t_prev = (t_start - self.skip).clamp(min=0)
        scales = torch.rand(size, device=device) * (self.guidance_scale_max - self.guidance_scale_min)
        scales = scales + self.guidance_scale_min
        x_start = self.objective.noised(x0, torch.randn_like(x0), t_start)
        with torch.no_grad():
            text = self.teacher.conditioning(batch)  # encoded once: the teacher's condition and the student's
            student_condition = self.conditioning.with_guidance(text, scales)
        # 2. The student's consistency output.
        prediction = self.consistency_output(self.net, x_start, t_start, student_condition)
        with torch.no_grad():
            # 3. The teacher's guided DDIM step to t_n, and the target network's output there.
            teacher_x0 = self.teacher.x0(x_start, t_start, text, batch, guidance_scale=scales)
            alpha_sigma = self.teacher.objective.alpha_sigma
            x_prev = ddim_step(teacher_x0, x_start, alpha_sigma(t_start), alpha_sigma(t_prev))
            target = self.consistency_output(self.target_net, x_prev.to(x_start.dtype), t_prev, student_condition)
        # 4. The consistency loss.
        if self.loss_kind == "huber":
            loss = pseudo_huber(prediction, target, self.huber_c)
        else:
            loss = (prediction.float() - target.float()).pow(2).mean()
        self.log_dict({"train/loss": loss, "train/lr": self.trainer.optimizers[0].param_groups[0]["lr"]})
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """The target network moves toward the student after each optimiser step (LCM, Algorithm 1)."""
        with torch.no_grad():
            target, student = list(self.target_net.parameters()), list(self.net.parameters())
            torch._foreach_lerp_(target, [p.detach() for p in student], 1 - self.target_decay)

    # ----- sampling -----------------------------------------------------------------------------------------

    @property
    def scheduler_overrides(self) -> dict[str, Any]:
        return {"original_inference_steps": self.num_solver_steps, "timestep_scaling": self.timestep_scaling}

    def student_scheduler(self) -> SchedulerMixin:
        """LCMScheduler on the training grid, as the exported LatentConsistencyModelPipeline samples."""
        factory = functools.partial(LCMScheduler, **self.scheduler_overrides)
        return for_latents(self.objective.scheduler(factory))

    def preview(
        self, seeds: Sequence[int], sampler: SchedulerFactory, steps: int, prompts: Sequence[str] | None = None
    ) -> Preview:
        """The student at min(steps, 4) steps (what the metrics judge); per seed, the grid shows it at 1, 2, 4 steps
        next to the teacher at `teacher_steps` (guided at `sample_guidance_scale`)."""
        return few_step_preview(self, seeds, sampler, min(steps, 4), prompts)

    # ----- checkpoints --------------------------------------------------------------------------------------

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_checkpoint_fits(self, checkpoint, may_be_missing=FROZEN_PREFIXES)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        student = denoiser_metadata("lcm", self.net, self.objective, self.conditioning, self.vae, self.class_names)
        save_student(
            checkpoint,
            FROZEN_PREFIXES,
            student,
            self.teacher,
            {"sampler": "LCMScheduler", "scheduler_overrides": self.scheduler_overrides},
        )
