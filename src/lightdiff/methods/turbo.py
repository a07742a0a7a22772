"""Turbo: adversarial diffusion distillation of a teacher into a student that samples in 1 to 4 steps.

ADD (Sauer et al. 2023, arXiv 2311.17042, Section 3): the student starts as a copy of the teacher's denoiser; the
teacher (and a latent teacher's VAE and text encoder) stay frozen. Each step:

1. real data x_0 is noised at one of the student's timesteps s (evenly spaced, ending at T - 1) and the student
   predicts x_0 in one step: x_theta = x_0-prediction(student(x_s, s));
2. the student minimises L = L_adv + lambda L_distill, where L_adv = -E[D(x_theta)] (hinge, generator side) and
   L_distill = E_t[c(t) ||x_theta - x_psi(x_t, t)||_2^2], the squared norm per sample (the paper's scale, so the
   default lambda = 2.5 is ADD's), x_t = alpha_t sg(x_theta) + sigma_t eps, x_psi the teacher's x_0 prediction
   (with classifier-free guidance for text models), c(t) = `distill_weighting`;
3. the discriminator minimises the hinge loss on real x_0 and sg(x_theta), plus `r1_weight` x R1 on its heads'
   inputs (real data), `disc_updates` times per student update.

LADD (arXiv 2403.12015) is the default discriminator (`discriminator=teacher`): heads on the frozen teacher's
encoder features at inputs re-noised to a level skewed high (LADD's logit-normal flow times, at equal SNR on a DDPM
schedule: `Objective.high_noise_timesteps`); `model.distill_weight=0` drops the distillation term.
The student samples with DDIM at "trailing" timesteps (a 1-step student starts from pure noise at T - 1).

A flow-matching teacher (objective=flow_matching; LADD distils SD3, a rectified flow) is distilled the same way on
its own path x_t = (1 - t) x_0 + t eps: the student predicts the velocity v, x_theta = x_t - t v, at the times
FlowMatchEulerDiscreteScheduler visits in 4 steps (t = 1 first: pure noise), and samples with that scheduler;
re-noising draws t uniformly, the discriminator's t logit-normally (LADD, Section 3.2); c(t) takes (alpha, sigma) =
(1 - t, t). Every step above is written once against `lightdiff.diffusion.Objective` and the teacher's conditioning
family (`lightdiff.nets.families`); an SD3 (MMDiT) or FLUX teacher's discriminator=teacher reads its block
tokens (`TransformerBlockFeatures`), as LADD distilled SD3-Turbo.
"""

from __future__ import annotations

import copy
import typing
from collections.abc import Callable, Sequence
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from diffusers import SchedulerMixin

from lightdiff.checkpointing import (
    check_adapter_checkpoint,
    check_checkpoint_fits,
    denoiser_metadata,
    keep_only_adapters,
)
from lightdiff.config import ConfigError, NonNegativeFloat, PositiveFloat, PositiveInt
from lightdiff.contract import Preview
from lightdiff.data import ImageDataModule
from lightdiff.diffusion import DistillWeighting, SchedulerFactory, distillation_distance, distillation_weight
from lightdiff.diffusion.adversarial import hinge_discriminator_loss, hinge_generator_loss, r1_penalty
from lightdiff.methods.optimization import (
    OptimisesItsNetwork,
    OptimizerFactory,
    check_lr_schedule,
    clip_and_measure_gradients,
    set_scheduled_lr,
)
from lightdiff.methods.teacher import FrozenTeacher, few_step_preview, save_student
from lightdiff.nets.denoiser import network_output
from lightdiff.nets.families import Condition
from lightdiff.nets.feature_discriminator import FeatureDiscriminator, network_features
from lightdiff.nets.lora import LoraSettings, adapt
from lightdiff.nets.low_precision import BaseQuantization, BaseStorage
from lightdiff.nets.vae import decode_latents, vae_scale_factor
from lightdiff.sampling import for_latents, pipeline_timesteps, reconfigured

# The frozen teacher (also inside the teacher-feature discriminator) is reloaded from `teacher`, not saved.
FROZEN_PREFIXES = ("teacher.", "discriminator.backbone.unet.", "discriminator.backbone.transformer.")


class TurboDistillation(OptimisesItsNetwork, pl.LightningModule):
    """Distils `teacher` into a 1-4 step student (`self.net`) against a `discriminator`."""

    distance_prefix = ""

    def __init__(
        self,
        data: ImageDataModule,  # given by train.py: must be what the teacher was trained on
        teacher: str,  # lightdiff checkpoint of a pixel or latent model, or a diffusers pipeline folder / hub id
        discriminator: Callable[..., FeatureDiscriminator],  # the `discriminator` group (a partial; backbone null:
        # the teacher's UNet encoder, LADD)
        teacher_config: str | None = None,  # `teacher` a single-file SD checkpoint: its pipeline's configs
        student_timesteps: list[int] | None = None,  # None: 4 evenly spaced, ending at T - 1
        student_prediction_type: str | None = None,  # None: the teacher's, or v_prediction where an epsilon
        # student's x_0 would amplify its error over 20x at T - 1 (linear and cosine schedules; `with_prediction_type`)
        distill_weight: NonNegativeFloat = 2.5,  # lambda; 0 gives pure adversarial training (LADD)
        distill_weighting: DistillWeighting = "alpha_bar",  # c(t): alpha_bar | sds | none
        teacher_guidance_scale: float = 4.0,  # the teacher's classifier-free guidance (text models only)
        r1_weight: NonNegativeFloat = 1e-5,  # weight of the R1 penalty on the heads' real inputs
        disc_noise_mean: float = 1.0,  # discriminator noise levels: flow times sigmoid(N(mean, std)), at equal SNR
        disc_noise_std: float = 1.0,
        disc_updates: PositiveInt = 1,  # discriminator updates per student update
        optimizer: OptimizerFactory = torch.optim.Adam,  # (parameters, lr) -> optimiser, for student and heads
        lr: PositiveFloat = 1e-5,  # student learning rate
        disc_lr: PositiveFloat = 1e-4,  # discriminator heads' learning rate
        lr_schedule: Literal["constant", "cosine"] = "constant",  # after warm-up, for both: constant, or cosine to 0
        warmup_steps: int = 0,  # linear warm-up from 0 of both rates, in steps as trainer.max_steps counts them
        max_grad_norm: float | None = 1.0,  # clip the student's gradient norm (None: off)
        teacher_steps: int = 50,  # the teacher's steps in the preview grids
        compile: bool = False,  # torch.compile the student (regional where diffusers defines repeated blocks)
        channels_last: bool = False,  # NHWC student weights: faster convolutions on GPU (on with CUDA in the yaml)
        gradient_checkpointing: bool = False,  # recompute the student's activations in backward: less memory
        lora: LoraSettings | None = None,  # a LoRA student: the teacher's own network + adapters (`model.lora.rank`)
        base_quantization: BaseQuantization = "none",  # int8 | fp8 | nf4: the frozen teacher quantised (torchao)
        base_storage: BaseStorage = "none",  # fp8: the frozen teacher stored in fp8, computed in its dtype
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints leave out the frozen teacher: it is reloaded from `teacher`
        if disc_updates < 1:
            raise ConfigError(f"model.disc_updates={disc_updates} must be at least 1")
        if distill_weight < 0 or r1_weight < 0:
            raise ConfigError(f"model.distill_weight={distill_weight} and model.r1_weight={r1_weight} must be >= 0")
        if distill_weighting not in typing.get_args(DistillWeighting):
            raise ConfigError(
                f"model.distill_weighting={distill_weighting!r} is not one of {typing.get_args(DistillWeighting)}"
            )
        self.teacher = FrozenTeacher(
            teacher, data, teacher_guidance_scale, "turbo", teacher_config, base_quantization, base_storage
        )
        # The student walks the teacher's path; it may parametrise its output otherwise (student_prediction_type).
        self.objective = self.teacher.objective.with_prediction_type(student_prediction_type)
        # the times the student's pipeline visits in 4 steps (FluxPipeline passes its own sigmas)
        latent_side = self.teacher.resolution // (vae_scale_factor(self.teacher.vae) if self.teacher.vae else 1)
        arguments = pipeline_timesteps(
            self.teacher.net, self.objective.scheduler(self.objective.default_sampler), 4, latent_side, latent_side
        )
        self.student_timesteps = self.objective.student_timesteps(4, student_timesteps, arguments)
        self.vae, self.conditioning = self.teacher.vae, self.teacher.conditioning  # shared, frozen
        self.class_names = self.teacher.class_names
        self.compile_net = compile  # not `self.compile`: that is nn.Module's method
        self.channels_last = channels_last
        self.gradient_checkpointing = gradient_checkpointing
        backbone = getattr(discriminator, "keywords", {}).get("backbone")
        if backbone is not None and data.num_frames is not None and not getattr(backbone, "judges_clips", False):
            raise ConfigError(
                f"discriminator.backbone={type(backbone).__name__}: a video teacher is distilled against a backbone "
                "that judges whole clips: its own features (discriminator=teacher, LADD) or discriminator="
                "patchgan_video; image backbones judge single frames"
            )
        if backbone is None:  # discriminator=teacher: a UNet's encoder, a transformer's block tokens (LADD)
            backbone = network_features(self.teacher.net)
        self.discriminator = discriminator(
            backbone=backbone,
            condition_dim=self.conditioning.summary_dim,
            num_train_timesteps=self.objective.num_train_timesteps,
        )
        self.lora_base: dict[str, Any] | None = None  # what a LoRA student's adapters belong to: the teacher
        if lora is not None and lora.enabled:
            if lora.text_encoder:
                raise ConfigError(
                    "model.lora.text_encoder=true: turbo's text encoder is the teacher's and stays frozen"
                )
            # One copy of the network: adapters off it is the teacher (FrozenTeacher and the teacher-feature
            # discriminator switch them off), on it is the student; B = 0 at the start, so the student starts as the
            # teacher, as ADD's does. Added after the discriminator, which freezes the network it reads.
            self.lora_base = adapt(self.teacher.net, lora, base_source=teacher)
            self.net = self.teacher.net
        else:
            self.net = copy.deepcopy(self.teacher.net).requires_grad_(True).train()  # the student
        self.distill_weight, self.distill_weighting = distill_weight, distill_weighting
        self.r1_weight = r1_weight
        self.disc_noise_mean, self.disc_noise_std, self.disc_updates = disc_noise_mean, disc_noise_std, disc_updates
        self.optimizer_factory, self.lr, self.disc_lr = optimizer, lr, disc_lr
        check_lr_schedule(lr_schedule, warmup_steps)
        self.lr_schedule, self.warmup_steps = lr_schedule, warmup_steps
        self.max_grad_norm = max_grad_norm
        self.teacher_steps = teacher_steps
        self.teacher.store_in_low_precision()  # the student copies exist now

    @property
    def metric_steps(self) -> list[int]:
        """The step counts FID is measured at (metrics=fid): 1, 2 and 4, those the student has timesteps for."""
        return [n for n in (1, 2, 4) if n <= len(self.student_timesteps)]

    # ----- the student as an x_0 predictor -----------------------------------------------------------------

    def student_x0(self, x_t: torch.Tensor, t: torch.Tensor, condition: Condition) -> torch.Tensor:
        return self.objective.predicted_x0(network_output(self.net, x_t, t, condition), x_t, t)

    def noised(self, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.objective.noised(x0, torch.randn_like(x0), t)

    def discriminator_view(self, x0: torch.Tensor, t_d: torch.Tensor) -> torch.Tensor:
        """What the discriminator sees of a clean sample: re-noised to t_d for the teacher backbone (LADD); else
        the sample itself (in pixels: latents are decoded for a pixel backbone such as DINOv2, as ADD does)."""
        backbone = self.discriminator.backbone
        if getattr(backbone, "noised_inputs", False):
            return self.noised(x0, t_d)
        if self.vae is not None and getattr(backbone, "pixel_inputs", False):
            return decode_latents(self.vae, x0)
        return x0

    # ----- training -----------------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        optimizer_student, optimizer_disc = self.optimizers()
        peaks = [(optimizer_student, self.lr), (optimizer_disc, self.disc_lr)]
        set_scheduled_lr(self, peaks, self.lr_schedule, self.warmup_steps)
        x0 = self.teacher.encode(batch["pixel_values"])
        with torch.no_grad():
            condition = self.conditioning(batch)
        size = len(x0)

        # 1. The student's one-step x_0 from real data noised at a student timestep (ADD, Section 3.1).
        choice = torch.randint(0, len(self.student_timesteps), (size,), device=self.device)
        t_student = torch.tensor(self.student_timesteps, device=self.device)[choice]
        student_x0 = self.student_x0(self.noised(x0, t_student), t_student, condition)

        # 2. Student update: fool the discriminator, and match the teacher's x_0 of a re-noised output.
        self.toggle_optimizer(optimizer_student)
        t_disc = self.discriminator_timesteps(size)
        adversarial_loss = hinge_generator_loss(
            self.discriminator(self.discriminator_view(student_x0, t_disc), t_disc, condition)
        )
        t = self.teacher.objective.uniform_timesteps(size, self.device)
        weight = distillation_weight(self.distill_weighting, *self.teacher.objective.alpha_sigma(t))
        x_t = self.teacher.objective.noised(student_x0.detach(), torch.randn_like(student_x0), t)
        teacher_x0 = self.teacher.x0(x_t, t, condition, batch)
        distill_loss = distillation_distance(student_x0, teacher_x0, weight)
        loss = adversarial_loss + self.distill_weight * distill_loss
        optimizer_student.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        norm = clip_and_measure_gradients(self, self.net.parameters(), self.max_grad_norm)
        optimizer_student.step()
        optimizer_student.zero_grad(set_to_none=True)  # frees the memory during the discriminator's update
        self.untoggle_optimizer(optimizer_student)

        # 3. Discriminator updates: hinge on real x_0 vs the student's (detached), R1 on the heads' real inputs.
        self.toggle_optimizer(optimizer_disc)
        fake_x0 = student_x0.detach()
        for _ in range(self.disc_updates):
            t_disc = self.discriminator_timesteps(size)
            real_features, r1_inputs = self.real_features(self.discriminator_view(x0, t_disc), t_disc, condition)
            logits_real = self.discriminator.heads_logits(real_features, t_disc, condition)
            with torch.set_grad_enabled(self.discriminator.backbone_trains):  # a frozen backbone needs no graph
                fake_features = self.discriminator.features(self.discriminator_view(fake_x0, t_disc), t_disc, condition)
            logits_fake = self.discriminator.heads_logits(fake_features, t_disc, condition)
            r1 = r1_penalty(logits_real, r1_inputs) if self.r1_weight > 0 else logits_real.new_zeros(())
            disc_loss = hinge_discriminator_loss(logits_real, logits_fake) + self.r1_weight * r1
            optimizer_disc.zero_grad(set_to_none=True)
            self.manual_backward(disc_loss)
            optimizer_disc.step()
        optimizer_disc.zero_grad(set_to_none=True)
        self.untoggle_optimizer(optimizer_disc)

        accuracy = 0.5 * ((logits_real > 0).float().mean() + (logits_fake < 0).float().mean())
        self.log_dict(
            {
                "train/loss": loss,
                "train/adversarial_loss": adversarial_loss,
                "train/distill_loss": distill_loss,
                "train/d_loss": disc_loss,
                "train/d_accuracy": accuracy,
                "train/logits_real": logits_real.mean(),
                "train/logits_fake": logits_fake.mean(),
                "train/r1": r1,
                "train/lr": optimizer_student.param_groups[0]["lr"],
            },
            prog_bar=False,
        )
        if norm is not None:
            self.log("train/grad_norm", norm)

    def discriminator_timesteps(self, size: int) -> torch.Tensor:
        """Noise levels of the discriminator's inputs: skewed high for the teacher backbone; 0 (clean) otherwise."""
        if not getattr(self.discriminator.backbone, "noised_inputs", False):
            return torch.zeros(size, dtype=torch.long, device=self.device)
        return self.objective.high_noise_timesteps(size, self.disc_noise_mean, self.disc_noise_std, self.device)

    def real_features(
        self, view: torch.Tensor, t_disc: torch.Tensor, condition: Condition
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Features of real data and what R1 differentiates: the heads' inputs behind a frozen backbone (ADD), the
        images themselves when the backbone trains (PatchGAN)."""
        if self.discriminator.backbone_trains:
            view = view.detach().requires_grad_(True)
            return self.discriminator.features(view, t_disc, condition), [view]
        with torch.no_grad():
            features = self.discriminator.features(view, t_disc, condition)
        features = [f.detach().requires_grad_(True) for f in features]
        return features, features

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [
            self.optimizer_factory([p for p in self.net.parameters() if p.requires_grad], lr=self.lr),
            self.optimizer_factory(self.discriminator.head_parameters(), lr=self.disc_lr),
        ]

    # ----- sampling -----------------------------------------------------------------------------------------

    def student_scheduler(self) -> SchedulerMixin:
        """The objective's few-step sampler (DDIM at trailing timesteps, or FlowMatchEuler), as the exported
        pipeline samples: no guidance, eta 0."""
        scheduler = self.objective.scheduler(self.objective.default_sampler)
        scheduler = for_latents(scheduler) if self.vae is not None else scheduler
        return reconfigured(scheduler, self.objective.few_step_overrides)

    def preview(
        self, seeds: Sequence[int], sampler: SchedulerFactory, steps: int, prompts: Sequence[str] | None = None
    ) -> Preview:
        """The student at min(steps, its timesteps) steps (what the metrics judge); the grid shows, per seed, the
        student at 1, 2 and 4 steps (those within its timesteps) next to the teacher at `teacher_steps`."""
        return few_step_preview(self, seeds, sampler, min(steps, len(self.student_timesteps)), prompts)

    # ----- checkpoints --------------------------------------------------------------------------------------

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Another net / discriminator config: name the keys, not a torch error. The teacher is not in the file.
        if self.lora_base is not None:  # of the student, the adapters alone: checked against the teacher's weights
            check_adapter_checkpoint(self, checkpoint, self.lora_base)
            check_checkpoint_fits(self, checkpoint, may_be_missing=(*FROZEN_PREFIXES, "net."))
        else:
            check_checkpoint_fits(self, checkpoint, may_be_missing=FROZEN_PREFIXES)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        student = denoiser_metadata(
            "turbo", self.net, self.objective, self.conditioning, self.vae, self.class_names, self.lora_base
        )
        save_student(
            checkpoint,
            FROZEN_PREFIXES,
            student,
            self.teacher,
            {
                "student_timesteps": self.student_timesteps,
                "scheduler_overrides": self.objective.few_step_overrides,
            },
        )
        if self.lora_base is not None:  # the student's base is the teacher, reloaded from `teacher`
            keep_only_adapters(checkpoint)
