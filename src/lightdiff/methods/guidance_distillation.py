"""Guidance distillation (`model=guidance_distill`): a student that takes the guidance scale as an input and gives in
one network call what its teacher gives with classifier-free guidance in two.

Meng et al. 2023, "On Distillation of Guided Diffusion Models" (CVPR), stage one (Section 3.1, Equation 6): the student
x_eta(z_t, w) regresses the teacher's guided prediction x^w = (1 + w) x_c - w x_u at w drawn uniformly, on the
training path. FLUX.1-dev ships such a student (its transformer's `guidance` input; Black Forest Labs did not publish
the recipe beyond "guidance distillation"), SD pipelines feed a UNet's `time_cond_proj_dim` the same way. Here the
regression is on the network's own output (noise, v or velocity): the guided output and the guided x_0 are the same
affine combination at a fixed (z_t, t), so this is Meng et al.'s loss weighted as the objective's own training loss.

Each step: real images (latents) are noised as the teacher was trained (`Objective.training_example`); a scale
w ~ U[`guidance_scale_min`, `guidance_scale_max`] is drawn per sample; the frozen teacher gives
out(z, uncond) + w (out(z, c) - out(z, uncond)) in one doubled call (`FrozenTeacher.guided_output`); the student is
called once, with w as its input. The student starts as the teacher (`Family.with_guidance_input`: its new input's
projection zeroed) and samples with the teacher's sampler at full steps, unguided, w an input (sample.py's
`guidance_scale`). It exports as its pipeline: FluxPipeline (whose `guidance_scale` is the embedded input) or
StableDiffusionPipeline (which embeds it for a UNet with `time_cond_proj_dim`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import pytorch_lightning as pl
import torch

from lightdiff.checkpointing import check_checkpoint_fits, denoiser_metadata
from lightdiff.config import ConfigError, PositiveFloat
from lightdiff.contract import Preview
from lightdiff.data import ImageDataModule
from lightdiff.diffusion import SchedulerFactory, weighted_mse
from lightdiff.methods.optimization import (
    OptimisesItsNetwork,
    OptimizerFactory,
    check_lr_schedule,
)
from lightdiff.methods.teacher import FrozenTeacher, save_student
from lightdiff.nets.denoiser import network_output
from lightdiff.nets.families import family_of
from lightdiff.nets.low_precision import BaseQuantization, BaseStorage
from lightdiff.sampling import generate, preview_inputs

FROZEN_PREFIXES = ("teacher.",)  # reloaded from `teacher`, not saved


class GuidanceDistillation(OptimisesItsNetwork, pl.LightningModule):
    """Distils `teacher`'s classifier-free guidance into a guidance-scale input of the student (`self.net`)."""

    distance_prefix = ""
    metric_steps = None  # FID at the metrics callback's step counts, as a full-step model

    def __init__(
        self,
        data: ImageDataModule,  # given by train.py: must be what the teacher was trained on
        teacher: str,  # lightdiff checkpoint or pipeline folder of a text model with an unconditional input
        teacher_config: str | None = None,  # `teacher` a single-file SD checkpoint: its pipeline's configs
        guidance_scale_min: float = 1.0,  # the range of the scale w drawn per sample (the student's inputs)
        guidance_scale_max: float = 8.0,
        sample_guidance_scale: float = 4.0,  # the scale previews and exports sample at (the pipeline's default)
        guidance_embedding_dim: int = 256,  # a UNet student's time_cond_proj_dim (FLUX's embedding has its own)
        optimizer: OptimizerFactory = torch.optim.AdamW,  # (parameters, lr) -> optimiser
        lr: PositiveFloat = 1e-4,  # peak learning rate
        lr_schedule: Literal["constant", "cosine"] = "constant",  # after warm-up: constant, or cosine to 0 at max_steps
        warmup_steps: int = 0,  # linear learning-rate warm-up from 0
        max_grad_norm: float | None = 1.0,  # clip the student's gradient norm (None: off)
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
        self.teacher = FrozenTeacher(
            teacher, data, sample_guidance_scale, "guidance_distill", teacher_config, base_quantization, base_storage
        )
        if not self.teacher.can_guide:
            raise ConfigError(
                f"model.teacher={teacher!r} has no unconditional input to guide with: guidance distillation needs a "
                "text model trained with caption dropout (model.cond_drop_prob > 0)"
            )
        self.objective = self.teacher.objective
        net, self.conditioning = family_of(self.teacher.net).with_guidance_input(
            self.teacher.net, self.teacher.conditioning, sample_guidance_scale, guidance_embedding_dim
        )
        self.net = net.requires_grad_(True).train()
        self.conditioning.check(self.net, data)
        self.vae, self.class_names = self.teacher.vae, self.teacher.class_names
        self.guidance_scale_min, self.guidance_scale_max = guidance_scale_min, guidance_scale_max
        self.optimizer_factory, self.lr, self.max_grad_norm = optimizer, lr, max_grad_norm
        check_lr_schedule(lr_schedule, warmup_steps)
        self.lr_schedule, self.warmup_steps = lr_schedule, warmup_steps
        self.compile_net, self.channels_last = compile, channels_last
        self.gradient_checkpointing = gradient_checkpointing
        self.teacher.store_in_low_precision()  # the student copies exist now

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x0 = self.teacher.encode(batch["pixel_values"])
        noisy = self.objective.training_example(x0, torch.randn_like(x0))
        span = self.guidance_scale_max - self.guidance_scale_min
        scales = torch.rand(len(x0), device=x0.device) * span + self.guidance_scale_min
        with torch.no_grad():
            text = self.teacher.conditioning(batch)  # encoded once: the teacher's condition and the student's
            target = self.teacher.guided_output(noisy.x_t, noisy.timesteps, text, batch, scales)
            student_condition = self.conditioning.with_guidance(text, scales)
        prediction = network_output(self.net, noisy.x_t, noisy.timesteps, student_condition)
        loss = weighted_mse(prediction, target, noisy.weight)
        self.log_dict({"train/loss": loss, "train/lr": self.trainer.optimizers[0].param_groups[0]["lr"]})
        return loss

    # ----- sampling -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def preview(
        self, seeds: Sequence[int], sampler: SchedulerFactory, steps: int, prompts: Sequence[str] | None = None
    ) -> Preview:
        """The student at `steps` (one call per step, the scale `sample_guidance_scale` as its input; what the
        metrics judge) next to the teacher guided at that scale (two calls per step), per seed."""
        data = self.trainer.datamodule
        inputs, labels = preview_inputs(
            seeds, self.conditioning, self.class_names, data.captions(), prompts, data.num_classes, data.kept_labels
        )
        side = self.teacher.resolution
        scheduler = self.teacher.scheduler(sampler)
        student = generate(
            self.net, scheduler, steps, seeds, self.conditioning, inputs, vae=self.vae, size=(side, side)
        )
        teacher = self.teacher.preview(seeds, inputs, sampler, steps).to(student.device)
        return Preview(images=student, labels=labels, grid_images=torch.stack([student, teacher], 1).flatten(0, 1))

    # ----- checkpoints --------------------------------------------------------------------------------------

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_checkpoint_fits(self, checkpoint, may_be_missing=FROZEN_PREFIXES)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        student = denoiser_metadata(
            "guidance_distill", self.net, self.objective, self.conditioning, self.vae, self.class_names
        )
        save_student(checkpoint, FROZEN_PREFIXES, student, self.teacher, {})
