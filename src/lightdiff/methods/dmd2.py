"""DMD2: distribution matching distillation into a 1-4 step student (`model=dmd2`).

Yin et al. 2024, "Improved Distribution Matching Distillation for Fast Image Synthesis" (arXiv 2405.14867), on DMD
(Yin et al. 2023, arXiv 2311.18828). Three networks start as the teacher's: the student G (trained), the frozen
teacher ("real score") and a "fake score" network that learns the distribution of G's samples; a classifier head on
the fake network's bottleneck makes the GAN term. Every batch:

1. G makes samples from pure noise at the student's timesteps: a 1-step student denoises T - 1; a multi-step one
   picks a step i, runs itself from noise through the steps before i without gradient (denoise, re-noise at the
   next timestep: "backward simulation", DMD2 Section 4.5) and denoises at t_i;
2. every `fake_updates`-th batch, G's update (two time-scale update rule, DMD2 Section 4.2): the distribution-
   matching gradient (DMD, Equation 7) at x_t = noised(G's x_0, t), t ~ U[`min_t`, `max_t`] of the schedule,
   grad = (x0_fake(x_t) - x0_real(x_t)) / mean|x_0 - x0_real(x_t)|, the teacher guided at `real_guidance_scale`,
   applied as 0.5 ||x_0 - sg(x_0 - grad)||^2; plus `gen_gan_weight` x softplus(-D(G's x_0)) (non-saturating GAN);
3. the fake network's update on G's samples (detached): the teacher's objective's denoising loss, plus
   `disc_gan_weight` x the classifier's softplus(D(fake)) + softplus(-D(real)) on data (DMD2 Section 4.3).

DMD's regression loss (Yin et al. 2023, Section 3.3, Equation 9; DMD2 drops it for its cost), on by default
(`regression_weight` lambda_reg, DMD's 0.25; 0 is DMD2 without it): before training, the teacher's deterministic
sampler (`teacher_steps` DDIM steps, guided at `real_guidance_scale`) maps `regression_pairs` noises z to images y;
the student's update adds lambda_reg ||G(z) - y||^2 (per-element mean) at its first timestep T - 1 on a batch of
those pairs. It anchors each noise to the teacher's own image for it, so G cannot draw one image per prompt (the mode
collapse it was made against); DMD used LPIPS on pixels, here the squared distance in the teacher's space (no LPIPS
weights offline). The pairs come from fixed seeds (`REGRESSION_SEED` on), regenerated identically on resume. The
defaults (1 step, lambda_reg 0.25, both rates 1e-4) are the 1-step recipe `experiments/distillation` chose: without
the pairs, 1-step students collapsed to one image per prompt or stayed blobs at the budgets measured there.

The student samples as the backward simulation runs it (each step: x_0, then re-noised at the next timestep;
`Objective.student_sampler` says how): for a DDPM teacher with LCMScheduler on the grid of its timesteps, fresh noise
at each step (the 4-step DMD2 SDXL recipe in diffusers' docs); for a flow teacher (FLUX, SD3, any flow UNet) with
FlowMatchEuler at its pipeline's own times, re-noised with the noise x_t implies (Euler's deterministic step: those
pipelines draw no seeded noise in their steps). It exports the teacher's pipeline with that sampler. The classifier
reads the fake network's bottleneck (a UNet's mid block; a transformer's middle and last block tokens).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from diffusers import SchedulerMixin

from lightdiff.checkpointing import check_checkpoint_fits, denoiser_metadata
from lightdiff.config import ConfigError, NonNegativeFloat, PositiveFloat, PositiveInt
from lightdiff.contract import Preview
from lightdiff.data import ImageDataModule
from lightdiff.diffusion import (
    SchedulerFactory,
    distribution_matching_gradient,
    distribution_matching_loss,
    weighted_mse,
)
from lightdiff.diffusion.consistency import ddim_step
from lightdiff.methods.optimization import (
    OptimisesItsNetwork,
    OptimizerFactory,
    check_lr_schedule,
    clip_and_measure_gradients,
    set_scheduled_lr,
)
from lightdiff.methods.teacher import FrozenTeacher, few_step_preview, save_student
from lightdiff.nets.denoiser import network_output
from lightdiff.nets.families import SIZE_AND_CROP, Condition, Inputs, size_and_crop
from lightdiff.nets.feature_discriminator import FeatureDiscriminator, network_features
from lightdiff.nets.low_precision import BaseQuantization, BaseStorage
from lightdiff.nets.vae import vae_scale_factor
from lightdiff.sampling import for_latents, pipeline_timesteps, preview_inputs, reconfigured
from lightdiff.trained import REQUIRED_SAMPLERS

# The frozen teacher is reloaded from `teacher`; the classifier's backbone is `fake_net`, saved under that name.
FROZEN_PREFIXES = ("teacher.", "classifier.backbone.unet.", "classifier.backbone.transformer.")
# The regression pairs' noise seeds: far from the seeds previews and held-out judging draw from (0-10^5).
REGRESSION_SEED = 900_000_000
REGRESSION_CHUNK = 64  # pairs drawn per teacher sampling call


@dataclass(frozen=True)
class RegressionPairs:
    """The teacher's noise-image pairs (on the CPU) and what each was conditioned on."""

    noise: torch.Tensor  # (N, ...) the sampler's initial noise
    images: torch.Tensor  # (N, ...) where the teacher's deterministic sampler landed from it
    inputs: Inputs  # {"label": (N,) or None, "text": N prompts or None}

    def __len__(self) -> int:
        return len(self.noise)

    def take(self, picks: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, Inputs]:
        return self.noise[picks].to(device), self.images[picks].to(device), rows_of(self.inputs, picks)


def rows_of(inputs: Inputs, picks: torch.Tensor) -> Inputs:
    """The conditioning inputs of rows `picks` (labels a tensor, prompts a list, absent ones None)."""
    rows = picks.tolist()
    return {
        key: value[picks] if torch.is_tensor(value) else None if value is None else [value[i] for i in rows]
        for key, value in inputs.items()
    }


class DistributionMatchingDistillation(OptimisesItsNetwork, pl.LightningModule):
    """Distils `teacher` into a 1-4 step student (`self.net`) by distribution matching against a fake-score network."""

    distance_prefix = ""

    def __init__(
        self,
        data: ImageDataModule,  # given by train.py: must be what the teacher was trained on
        teacher: str,  # lightdiff checkpoint or diffusers pipeline folder / hub id of a DDPM or flow teacher
        teacher_config: str | None = None,  # `teacher` a single-file SD checkpoint: its pipeline's configs
        student_steps: PositiveInt | None = None,  # the student's steps: its pipeline's times for that many (None: 1)
        student_timesteps: list[int] | None = None,  # a DDPM student's own list instead (e.g. [999]: 1 step)
        student_prediction_type: str | None = None,  # None: the teacher's, or v where epsilon fails at T - 1
        real_guidance_scale: float = 4.0,  # the teacher's guidance in the matching gradient (text models)
        fake_updates: PositiveInt = 5,  # fake-network updates per student update (DMD2's TTUR ratio)
        min_t: float = 0.02,  # the matching gradient's noise levels, as fractions of the schedule
        max_t: float = 0.98,
        gen_gan_weight: NonNegativeFloat = 3e-3,  # weight of the student's GAN term
        disc_gan_weight: NonNegativeFloat = 1e-2,  # weight of the classifier's GAN loss in the fake network's update
        classifier_channels: int = 64,  # width of the classifier head on the fake network's bottleneck
        regression_weight: NonNegativeFloat = 0.25,  # DMD's lambda_reg on the teacher's noise-image pairs (0: off)
        regression_pairs: PositiveInt = 1024,  # how many pairs the teacher draws before training (when on)
        optimizer: OptimizerFactory = torch.optim.AdamW,  # (parameters, lr) -> optimiser, for both
        lr: PositiveFloat = 1e-4,  # the student's learning rate
        fake_lr: PositiveFloat = 1e-4,  # the fake network's and the classifier's
        lr_schedule: Literal["constant", "cosine"] = "constant",  # after warm-up, for both: constant, or cosine to 0
        warmup_steps: int = 0,  # linear warm-up from 0 of both rates, in steps as trainer.max_steps counts them
        max_grad_norm: float | None = 1.0,  # clip each update's gradient norm (None: off)
        teacher_steps: int = 50,  # the teacher's steps in the preview grids and for the regression pairs
        compile: bool = False,  # torch.compile the student (regional where diffusers defines repeated blocks)
        channels_last: bool = False,  # NHWC student weights: faster convolutions on GPU
        gradient_checkpointing: bool = False,  # recompute the student's activations in backward: less memory
        base_quantization: BaseQuantization = "none",  # int8 | fp8 | nf4: the frozen teacher quantised (torchao)
        base_storage: BaseStorage = "none",  # fp8: the frozen teacher stored in fp8, computed in its dtype
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints leave out the frozen teacher: it is reloaded from `teacher`
        if fake_updates < 1:
            raise ConfigError(f"model.fake_updates={fake_updates} must be at least 1")
        if not 0 <= min_t < max_t <= 1:
            raise ConfigError(f"model.min_t={min_t} and model.max_t={max_t} must satisfy 0 <= min_t < max_t <= 1")
        if gen_gan_weight < 0 or disc_gan_weight < 0 or regression_weight < 0:
            raise ConfigError(
                f"model.gen_gan_weight={gen_gan_weight}, disc_gan_weight={disc_gan_weight} and "
                f"regression_weight={regression_weight} must be >= 0"
            )
        if regression_pairs < 1:
            raise ConfigError(f"model.regression_pairs={regression_pairs} must be at least 1")
        self.teacher = FrozenTeacher(
            teacher, data, real_guidance_scale, "dmd2", teacher_config, base_quantization, base_storage
        )
        self.objective = self.teacher.objective.with_prediction_type(student_prediction_type)
        # the times the student's pipeline visits in its steps (FluxPipeline passes its own sigmas)
        latent_side = self.teacher.resolution // (vae_scale_factor(self.teacher.vae) if self.teacher.vae else 1)
        if student_steps is not None and student_timesteps is not None and student_steps != len(student_timesteps):
            raise ConfigError(
                f"model.student_steps={student_steps} and model.student_timesteps={student_timesteps} disagree: "
                "give one of them"
            )
        steps = student_steps or (len(student_timesteps) if student_timesteps else 1)
        arguments = pipeline_timesteps(
            self.teacher.net, self.objective.scheduler(self.objective.default_sampler), steps, latent_side, latent_side
        )
        self.student_timesteps = self.objective.student_timesteps(steps, student_timesteps, arguments)
        self.sampler = self.objective.student_sampler(self.student_timesteps)
        self.net = copy.deepcopy(self.teacher.net).requires_grad_(True).train()  # the student
        self.fake_net = copy.deepcopy(self.teacher.net).requires_grad_(True).train()  # the fake score
        self.classifier = FeatureDiscriminator(
            network_features(self.fake_net, trainable=True, deepest_only=True),
            head_channels=classifier_channels,
            num_train_timesteps=self.objective.num_train_timesteps,
        )
        self.vae, self.conditioning = self.teacher.vae, self.teacher.conditioning  # shared, frozen
        self.class_names = self.teacher.class_names
        self.fake_updates, self.min_t, self.max_t = fake_updates, min_t, max_t
        self.gen_gan_weight, self.disc_gan_weight = gen_gan_weight, disc_gan_weight
        self.regression_weight, self.regression_pairs = regression_weight, regression_pairs
        if regression_weight > 0:  # refused now, before anything is written, rather than when the pairs are drawn
            self.teacher.require_deterministic_sampler(f"model.regression_weight={regression_weight}")
        self.pairs: RegressionPairs | None = None  # drawn at the start of fitting (`on_fit_start`)
        self.optimizer_factory, self.lr, self.fake_lr = optimizer, lr, fake_lr
        check_lr_schedule(lr_schedule, warmup_steps)
        self.lr_schedule, self.warmup_steps = lr_schedule, warmup_steps
        self.max_grad_norm = max_grad_norm
        self.teacher_steps = teacher_steps
        self.compile_net, self.channels_last = compile, channels_last
        self.gradient_checkpointing = gradient_checkpointing
        # Batches trained so far: which of them update the student; in the state dict, so a resume keeps the rhythm.
        self.register_buffer("batches_seen", torch.zeros((), dtype=torch.long))
        self.teacher.store_in_low_precision()  # the student copies exist now

    @property
    def metric_steps(self) -> list[int]:
        return [n for n in (1, 2, 4) if n <= len(self.student_timesteps)]

    # ----- the student's samples ----------------------------------------------------------------------------

    def student_x0(self, x_t: torch.Tensor, t: torch.Tensor, condition: Condition) -> torch.Tensor:
        return self.objective.predicted_x0(network_output(self.net, x_t, t, condition), x_t, t)

    def student_samples(self, like: torch.Tensor, condition: Condition) -> torch.Tensor:
        """G's x_0 from pure noise, with gradient through its last call only: its own sampler run without gradient
        through the steps before a random one (backward simulation, DMD2 Sec. 4.5), re-noising each x_0 as that
        sampler does (fresh noise, or the noise x_t implies)."""
        size, device = len(like), like.device
        last = int(torch.randint(0, len(self.student_timesteps), ()).item())
        x_t = torch.randn_like(like)
        with torch.no_grad():
            for index in range(last):
                t = torch.full((size,), self.student_timesteps[index], device=device)
                x0 = self.student_x0(x_t, t, condition)
                t_next = torch.full_like(t, self.student_timesteps[index + 1])
                if self.sampler.fresh_noise:
                    x_t = self.objective.noised(x0, torch.randn_like(x0), t_next)
                else:  # DDIM's eta-0 step, on a flow's path Euler's
                    x_t = ddim_step(x0, x_t, self.objective.alpha_sigma(t), self.objective.alpha_sigma(t_next))
        t = torch.full((size,), self.student_timesteps[last], device=device)
        return self.student_x0(x_t, t, condition)

    def matching_timesteps(self, size: int) -> torch.Tensor:
        steps = self.objective.num_train_timesteps
        low, high = int(self.min_t * steps), max(int(self.max_t * steps), int(self.min_t * steps) + 1)
        return torch.randint(low, high, (size,), device=self.device)

    # ----- training -----------------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        optimizer_student, optimizer_fake = self.optimizers()
        peaks = [(optimizer_student, self.lr), (optimizer_fake, self.fake_lr)]
        set_scheduled_lr(self, peaks, self.lr_schedule, self.warmup_steps)
        real_x0 = self.teacher.encode(batch["pixel_values"])
        with torch.no_grad():
            condition = self.conditioning(batch)
        size = len(real_x0)
        logged: dict[str, torch.Tensor] = {}

        # 2. The student's update, every `fake_updates`-th batch.
        if int(self.batches_seen) % self.fake_updates == 0:
            self.toggle_optimizer(optimizer_student)
            fake_x0 = self.student_samples(real_x0, condition)
            t = self.matching_timesteps(size)
            with torch.no_grad():
                x_t = self.objective.noised(fake_x0.detach(), torch.randn_like(fake_x0), t)
                real_score_x0 = self.teacher.x0(x_t, t, condition, batch)
                fake_output = network_output(self.fake_net, x_t, t, condition)
                fake_score_x0 = self.teacher.objective.predicted_x0(fake_output, x_t, t)
                gradient = distribution_matching_gradient(fake_x0.detach(), real_score_x0, fake_score_x0)
            matching_loss = distribution_matching_loss(fake_x0, gradient)
            t_gan = self.matching_timesteps(size)
            gan_loss = F.softplus(-self.classifier(self.noised(fake_x0, t_gan), t_gan, condition)).mean()
            loss = matching_loss + self.gen_gan_weight * gan_loss
            if self.pairs is not None:
                regression_loss = self.regression_loss(size)
                loss = loss + self.regression_weight * regression_loss
                logged["train/regression_loss"] = regression_loss
            optimizer_student.zero_grad(set_to_none=True)
            self.manual_backward(loss)
            norm = clip_and_measure_gradients(self, self.net.parameters(), self.max_grad_norm)
            optimizer_student.step()
            optimizer_student.zero_grad(set_to_none=True)
            optimizer_fake.zero_grad(set_to_none=True)  # the GAN term reached the fake network: not its update
            self.untoggle_optimizer(optimizer_student)
            logged.update({"train/matching_loss": matching_loss, "train/gen_gan_loss": gan_loss})
            if norm is not None:
                logged["train/grad_norm"] = norm

        # 3. The fake network learns G's distribution (denoising loss); its classifier tells data from G's samples.
        self.toggle_optimizer(optimizer_fake)
        with torch.no_grad():
            fake_x0 = self.student_samples(real_x0, condition)
        example = self.teacher.objective.training_example(fake_x0, torch.randn_like(fake_x0))
        output = network_output(self.fake_net, example.x_t, example.timesteps, condition)
        denoising_loss = weighted_mse(output, example.target, example.weight)
        t_gan = self.matching_timesteps(size)
        logits_fake = self.classifier(self.noised(fake_x0, t_gan), t_gan, condition)
        logits_real = self.classifier(self.noised(real_x0, t_gan), t_gan, condition)
        classifier_loss = F.softplus(logits_fake).mean() + F.softplus(-logits_real).mean()
        fake_loss = denoising_loss + self.disc_gan_weight * classifier_loss
        optimizer_fake.zero_grad(set_to_none=True)
        self.manual_backward(fake_loss)
        clip_and_measure_gradients(self, self.classifier.head_parameters(), self.max_grad_norm)
        optimizer_fake.step()
        optimizer_fake.zero_grad(set_to_none=True)
        self.untoggle_optimizer(optimizer_fake)
        self.batches_seen += 1

        accuracy = 0.5 * ((logits_real > 0).float().mean() + (logits_fake < 0).float().mean())
        logged.update(
            {
                "train/fake_denoising_loss": denoising_loss,
                "train/d_loss": classifier_loss,
                "train/d_accuracy": accuracy,
                "train/logits_real": logits_real.mean(),
                "train/logits_fake": logits_fake.mean(),
                "train/lr": optimizer_student.param_groups[0]["lr"],
            }
        )
        self.log_dict(logged)

    def regression_loss(self, size: int) -> torch.Tensor:
        """||G(z) - y||^2 (per-element mean) on `size` of the teacher's pairs (z, y), G at its first timestep."""
        assert self.pairs is not None
        noise, images, inputs = self.pairs.take(torch.randint(len(self.pairs), (size,)), self.device)
        with torch.no_grad():
            condition = self.conditioning(inputs).to(self.device)  # labels stay on the CPU with the pairs
        t = torch.full((size,), self.student_timesteps[0], device=self.device)
        return F.mse_loss(self.student_x0(noise, t, condition).float(), images.float())

    def on_fit_start(self) -> None:
        if self.regression_weight > 0 and self.pairs is None:
            self.pairs = self.draw_regression_pairs()

    def draw_regression_pairs(self) -> RegressionPairs:
        """The teacher's `regression_pairs` noise-image pairs from seeds REGRESSION_SEED on, on the data's captions (or
        classes) as the previews cycle through them; seeded generators only: the run's random stream is untouched."""
        data = self.trainer.datamodule
        seeds = list(range(REGRESSION_SEED, REGRESSION_SEED + self.regression_pairs))
        inputs, _ = preview_inputs(
            seeds, self.conditioning, self.class_names, data.captions(), None, data.num_classes, data.kept_labels
        )
        if SIZE_AND_CROP in self.conditioning.reads:  # SDXL's size and crop ids, as the teacher drew each pair with
            side = self.teacher.resolution
            inputs = {**inputs, SIZE_AND_CROP: size_and_crop(side, side, len(seeds))}
        noises, images = [], []
        for start in range(0, len(seeds), REGRESSION_CHUNK):
            picks = torch.arange(start, min(start + REGRESSION_CHUNK, len(seeds)))
            noise, x0 = self.teacher.ode_pairs(
                seeds[start : start + REGRESSION_CHUNK], rows_of(inputs, picks), self.teacher_steps
            )
            noises.append(noise.cpu())
            images.append(x0.cpu())
        return RegressionPairs(torch.cat(noises), torch.cat(images), inputs)

    def noised(self, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.objective.noised(x0, torch.randn_like(x0), t)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        # The classifier's trainable parameters are its heads and its backbone, the fake network.
        return [
            self.optimizer_factory(self.net.parameters(), lr=self.lr),
            self.optimizer_factory(self.classifier.head_parameters(), lr=self.fake_lr),
        ]

    # ----- sampling -----------------------------------------------------------------------------------------

    def student_scheduler(self) -> SchedulerMixin:
        """The objective's sampler of a few-step student on the student's grid (`Objective.student_sampler`), as the
        exported pipeline samples: no guidance."""
        factory = REQUIRED_SAMPLERS[self.sampler.name] if self.sampler.name else self.objective.default_sampler
        scheduler = self.objective.scheduler(factory)
        scheduler = for_latents(scheduler) if self.vae is not None else scheduler
        return reconfigured(scheduler, self.sampler.overrides)

    def preview(
        self, seeds: Sequence[int], sampler: SchedulerFactory, steps: int, prompts: Sequence[str] | None = None
    ) -> Preview:
        """The student at min(steps, its timesteps) steps (what the metrics judge); per seed, the grid shows it at
        1, 2, 4 steps next to the teacher at `teacher_steps`."""
        return few_step_preview(self, seeds, sampler, min(steps, len(self.student_timesteps)), prompts)

    # ----- checkpoints --------------------------------------------------------------------------------------

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_checkpoint_fits(self, checkpoint, may_be_missing=FROZEN_PREFIXES)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        student = denoiser_metadata("dmd2", self.net, self.objective, self.conditioning, self.vae, self.class_names)
        save_student(
            checkpoint,
            FROZEN_PREFIXES,
            student,
            self.teacher,
            {
                "student_timesteps": self.student_timesteps,
                "sampler": self.sampler.name,
                "scheduler_overrides": self.sampler.overrides,
            },
        )
