"""Turbo: adversarial diffusion distillation of a teacher into a student that samples in 1 to 4 steps.

ADD (Sauer et al. 2023, arXiv 2311.17042, Section 3): the student starts as a copy of the teacher's denoiser; the
teacher (and a latent teacher's VAE and text encoder) stay frozen. Each step:

1. real data x_0 is noised at one of the student's timesteps s (evenly spaced, ending at T - 1) and the student
   predicts x_0 in one step: x_theta = x_0-prediction(student(x_s, s));
2. the student minimises L = L_adv + lambda L_distill, where L_adv = -E[D(x_theta)] (hinge, generator side) and
   L_distill = E_t[c(t) ||x_theta - x_psi(x_t, t)||^2], x_t = alpha_t sg(x_theta) + sigma_t eps, x_psi the
   teacher's x_0 prediction (with classifier-free guidance for text models), c(t) = `distill_weighting`;
3. the discriminator minimises the hinge loss on real x_0 and sg(x_theta), plus `r1_weight` x R1 on its heads'
   inputs (real data), `disc_updates` times per student update.

LADD (arXiv 2403.12015) is the default discriminator (`discriminator=teacher`): heads on the frozen teacher's
encoder features at inputs re-noised to a level skewed high; `model.distill_weight=0` drops the distillation term.
The student samples with DDIM at "trailing" timesteps (a 1-step student starts from pure noise at T - 1).

A flow-matching teacher (objective=flow_matching; LADD distils SD3, a rectified flow) is distilled the same way on
its own path x_t = (1 - t) x_0 + t eps: the student predicts the velocity v, x_theta = x_t - t v, at the times
FlowMatchEulerDiscreteScheduler visits in 4 steps (t = 1 first: pure noise), and samples with that scheduler;
re-noising draws t uniformly, the discriminator's t logit-normally (LADD, Section 3.2); c(t) takes (alpha, sigma) =
(1 - t, t). Networks are called through `lightdiff.nets.denoiser`; an SD3 (MMDiT) teacher is not supported yet.
"""

from __future__ import annotations

import copy
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, SchedulerMixin, UNet2DConditionModel, UNet2DModel

from lightdiff.config import ConfigError
from lightdiff.data import ImageDataModule
from lightdiff.diffusion import (
    DistillWeighting,
    FlowMatching,
    PredictionType,
    add_noise,
    distillation_weight,
    flow_alpha_sigma,
    high_noise_timesteps,
    interpolate,
    predicted_x0,
    trailing_timesteps,
    weight_from_alpha_sigma,
    x0_from_velocity,
)
from lightdiff.diffusion.adversarial import hinge_discriminator_loss, hinge_generator_loss, r1_penalty
from lightdiff.export import TrainedDenoiser, load_trained
from lightdiff.methods.checkpoint_checks import check_checkpoint_fits
from lightdiff.methods.latent import generate_latent, plain_config, tokenizer_state
from lightdiff.methods.optimization import clip_and_measure_gradients
from lightdiff.methods.preview import Preview
from lightdiff.nets.denoiser import TextCondition, denoiser_output, num_classes, takes_pooled_text
from lightdiff.nets.feature_discriminator import FeatureDiscriminator, UNetEncoderFeatures
from lightdiff.nets.text import tokenize_prompts
from lightdiff.sampling import (
    SchedulerFactory,
    for_latents,
    generate,
    generators_for,
    is_flow_sampler,
    make_scheduler,
    reconfigured,
)
from lightdiff.speed import prepare_for_training

CHECKPOINT_FORMAT = 1
STUDENT_SCHEDULER = {"timestep_spacing": "trailing"}  # how the student samples, in sample.py and exported pipelines
# The frozen teacher (also inside the teacher-feature discriminator) is reloaded from `teacher`, not saved.
FROZEN_PREFIXES = ("teacher.", "discriminator.backbone.unet.")


def load_teacher(source: str) -> TrainedDenoiser:
    """A lightdiff checkpoint (pixel, latent or turbo), a diffusers pipeline folder, or a hub id of one."""
    path = Path(source).expanduser()
    if not path.exists():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(source))
        except Exception as error:  # offline, unknown id, no access
            raise ConfigError(
                f"model.teacher={source!r} is neither a file, a folder nor a reachable hub id ({error})"
            ) from error
    try:
        teacher = load_trained(path)
    except ValueError as error:
        raise ConfigError(f"model.teacher={source!r}: {error}") from error
    if not isinstance(teacher, TrainedDenoiser):
        raise ConfigError(
            f"model.teacher={source!r} is an autoencoder checkpoint; give a pixel or latent diffusion checkpoint "
            "or a diffusers pipeline folder"
        )
    return teacher


class TurboDistillation(pl.LightningModule):
    """Distils `teacher` into a 1-4 step student (`self.net`) against a `discriminator`."""

    def __init__(
        self,
        teacher: str,  # lightdiff checkpoint of a pixel or latent model, or a diffusers pipeline folder / hub id
        discriminator: Callable[..., FeatureDiscriminator],  # the `discriminator` group (a partial; backbone null:
        # the teacher's UNet encoder, LADD)
        student_timesteps: list[int] | None = None,  # None: 4 evenly spaced, ending at T - 1
        student_prediction_type: PredictionType | None = None,  # None: the teacher's; "sample" (x_0) stays well
        # conditioned at T - 1, where an epsilon output is amplified by 1 / alpha_T (157x for linear betas)
        distill_weight: float = 2.5,  # lambda; 0 gives pure adversarial training (LADD)
        distill_weighting: DistillWeighting = "alpha_bar",  # c(t): alpha_bar | sds | none
        teacher_guidance_scale: float = 4.0,  # the teacher's classifier-free guidance (text models only)
        r1_weight: float = 1e-5,  # weight of the R1 penalty on the heads' real inputs
        disc_noise_mean: float = 1.0,  # discriminator noise levels: sigmoid(N(mean, std)) of the schedule
        disc_noise_std: float = 1.0,
        disc_updates: int = 1,  # discriminator updates per student update
        lr: float = 1e-5,  # student learning rate (Adam)
        disc_lr: float = 1e-4,  # discriminator heads' learning rate (Adam)
        adam_betas: tuple[float, float] = (0.0, 0.99),  # Adam (beta1, beta2) of both, as GANs usually take
        max_grad_norm: float | None = 1.0,  # clip the student's gradient norm (None: off)
        teacher_steps: int = 50,  # the teacher's steps in the preview grids
        compile: bool = False,  # torch.compile the student (regional where diffusers defines repeated blocks)
        channels_last: bool = False,  # NHWC student weights: faster convolutions on GPU (on with CUDA in the yaml)
        gradient_checkpointing: bool = False,  # recompute the student's activations in backward: less memory
        fused_adamw: bool = False,  # fused Adam kernels for student and heads (on with CUDA in the yaml)
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints leave out the frozen teacher: it is reloaded from `teacher`
        if disc_updates < 1:
            raise ConfigError(f"model.disc_updates={disc_updates} must be at least 1")
        if distill_weight < 0 or r1_weight < 0:
            raise ConfigError(f"model.distill_weight={distill_weight} and model.r1_weight={r1_weight} must be >= 0")
        loaded = load_teacher(teacher)
        self.teacher_source = teacher
        self.schedule = loaded.schedule
        self.prediction_type = loaded.prediction_type  # the teacher's
        if student_prediction_type is not None and student_prediction_type not in typing.get_args(PredictionType):
            raise ConfigError(
                f"model.student_prediction_type={student_prediction_type!r} is not one of "
                f"{typing.get_args(PredictionType)}"
            )
        self.student_prediction_type = student_prediction_type or self.prediction_type
        self.objective = loaded.objective  # the teacher's: the student is trained and samples on the same path
        if takes_pooled_text(loaded.net):
            raise ConfigError(f"model.teacher={teacher!r} is an SD3 transformer (MMDiT); turbo distils UNets and DiTs")
        steps = self.schedule.num_train_timesteps
        if isinstance(self.objective, FlowMatching):
            if student_timesteps is not None or student_prediction_type is not None:
                raise ConfigError(
                    "model.student_timesteps / model.student_prediction_type are for DDPM teachers; a flow-matching "
                    "teacher's student predicts the velocity at the times its flow sampler visits in 4 steps"
                )
            steps = self.objective.num_train_timesteps
            # Network timesteps (t * T) of FlowMatchEulerDiscreteScheduler in 4 steps; those of 1 and 2 steps are
            # among them (T, then 1), so the student trains exactly where it samples.
            self.student_timesteps = [float(t) for t in self.flow_student_timesteps(4)]
        else:
            self.student_timesteps = list(student_timesteps or trailing_timesteps(steps, 4))
            outside = [t for t in self.student_timesteps if not 0 <= t < steps]
            if outside or not self.student_timesteps:
                raise ConfigError(
                    f"model.student_timesteps={self.student_timesteps}: {outside or 'none'} outside the teacher's "
                    f"schedule 0..{steps - 1}"
                )
        if self.student_timesteps[0] == steps - 1 and self.student_prediction_type == "epsilon":
            alpha_bar_last = float(self.schedule.alphas_cumprod()[-1])
            if alpha_bar_last == 0.0:  # x_0 = (x_t - sigma eps) / alpha is undefined at zero terminal SNR
                raise ConfigError(
                    "the teacher's schedule has zero terminal SNR and the student would predict epsilon: x_0 cannot be "
                    "recovered at t = T - 1; set model.student_prediction_type=sample (or v_prediction)"
                )
        self.teacher = loaded.net.requires_grad_(False).eval()
        self.compile_net = compile  # not `self.compile`: that is nn.Module's method
        self.channels_last = channels_last
        self.gradient_checkpointing = gradient_checkpointing
        self.fused_adamw = fused_adamw
        self.net = copy.deepcopy(loaded.net).requires_grad_(True).train()  # the student
        self.vae = loaded.vae.requires_grad_(False).eval() if loaded.vae is not None else None
        self.text_encoder = loaded.text_encoder
        if self.text_encoder is not None:
            self.text_encoder.requires_grad_(False).eval()
        self.tokenizer = loaded.tokenizer
        self.class_names = loaded.class_names
        self.num_classes = num_classes(self.net) or 0
        backbone = getattr(discriminator, "keywords", {}).get("backbone")
        if backbone is None and not isinstance(self.teacher, UNet2DModel | UNet2DConditionModel):
            raise ConfigError(
                f"discriminator=teacher reads a UNet teacher's encoder; model.teacher={teacher!r} is a "
                f"{type(self.teacher).__name__}: use discriminator=dinov2 or discriminator=patchgan"
            )
        self.discriminator = discriminator(
            backbone=backbone if backbone is not None else UNetEncoderFeatures(self.teacher),
            num_classes=self.num_classes,
            text_dim=self.text_encoder.config.hidden_size if self.text_encoder is not None else 0,
            num_train_timesteps=steps,
        )
        if distill_weighting not in typing.get_args(DistillWeighting):
            raise ConfigError(
                f"model.distill_weighting={distill_weighting!r} is not one of {typing.get_args(DistillWeighting)}"
            )
        self.distill_weight, self.distill_weighting = distill_weight, distill_weighting
        self.teacher_guidance_scale = teacher_guidance_scale
        self.r1_weight = r1_weight
        self.disc_noise_mean, self.disc_noise_std, self.disc_updates = disc_noise_mean, disc_noise_std, disc_updates
        self.lr, self.disc_lr, self.adam_betas = lr, disc_lr, tuple(adam_betas)
        self.max_grad_norm = max_grad_norm
        self.teacher_steps = teacher_steps
        self._teacher_previews: dict[tuple[int, ...], torch.Tensor] = {}  # the teacher never changes
        self.register_buffer("alphas_cumprod", self.schedule.alphas_cumprod().float(), persistent=False)

    @property
    def metric_steps(self) -> list[int]:
        """The step counts FID is measured at (metrics=fid): 1, 2 and 4, those the student has timesteps for."""
        return [n for n in (1, 2, 4) if n <= len(self.student_timesteps)]

    def train(self, mode: bool = True) -> TurboDistillation:
        super().train(mode)
        for frozen in (self.teacher, self.vae, self.text_encoder):  # frozen networks stay in inference mode
            if frozen is not None:
                frozen.eval()
        return self

    def attach_data(self, datamodule: ImageDataModule) -> None:
        if datamodule.cache_latents:
            raise ConfigError("data.cache_latents=true is for model=latent; model=turbo encodes on the fly")
        if self.text_encoder is not None and not datamodule.captions():
            raise ConfigError(
                f"model.teacher={self.teacher_source!r} is text-conditioned; the data set has no captions"
            )
        if self.num_classes and datamodule.num_classes == 0:
            raise ConfigError(f"model.teacher={self.teacher_source!r} is class-conditional; the data has no labels")
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1
        if self.net.config.sample_size * factor != datamodule.resolution:
            raise ConfigError(
                f"data.resolution={datamodule.resolution} differs from the teacher's "
                f"{self.net.config.sample_size * factor} px"
            )
        if self.class_names is None:
            self.class_names = datamodule.class_names

    # ----- the networks as x_0 predictors -------------------------------------------------------------------

    def condition(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The networks' condition: {"class_labels"} or {"text_states"} (frozen text encoder), or nothing."""
        if self.text_encoder is not None:
            with torch.no_grad():
                return {"text_states": self.encode_prompts([str(text) for text in batch["text"]])}
        if self.num_classes:
            return {"class_labels": batch["label"]}
        return {}

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        assert self.tokenizer is not None and self.text_encoder is not None
        return self.text_encoder(tokenize_prompts(self.tokenizer, prompts).to(self.device))[0]

    def x0_of(self, net: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, condition: dict) -> torch.Tensor:
        """x_0 as `net` (the student or the teacher) predicts it, each through its own output parametrisation."""
        if "text_states" in condition:
            output = denoiser_output(net, x_t, t, text=TextCondition(condition["text_states"]))
        else:
            output = denoiser_output(net, x_t, t, class_labels=condition.get("class_labels"))
        if isinstance(self.objective, FlowMatching):  # x_0 = x_t - t v (one Euler step to t = 0)
            return x0_from_velocity(x_t, output, t / self.objective.num_train_timesteps)
        prediction_type = self.student_prediction_type if net is self.net else self.prediction_type
        return predicted_x0(prediction_type, output, x_t, self.alphas_cumprod, t)

    def noised(self, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_0 taken to network timestep t along the teacher's path: DDPM's q(x_t | x_0), or the flow's line."""
        noise = torch.randn_like(x0)
        if isinstance(self.objective, FlowMatching):
            return interpolate(x0, noise, t / self.objective.num_train_timesteps)
        return add_noise(x0, noise, self.alphas_cumprod, t)

    @torch.no_grad()
    def teacher_x0(self, x_t: torch.Tensor, t: torch.Tensor, condition: dict) -> torch.Tensor:
        """The teacher's x_0, guided for text models: x0(x, "") + w (x0(x, c) - x0(x, "")) (Ho & Salimans 2022)."""
        prediction = self.x0_of(self.teacher, x_t, t, condition)
        if "text_states" not in condition or self.teacher_guidance_scale == 1.0:
            return prediction
        empty = self.encode_prompts([""]).expand_as(condition["text_states"])
        unconditional = self.x0_of(self.teacher, x_t, t, {"text_states": empty})
        return unconditional + self.teacher_guidance_scale * (prediction - unconditional)

    def clean_inputs(self, batch: dict[str, Any]) -> torch.Tensor:
        """x_0 of the batch: pixels, or the VAE's scaled latents of a latent teacher."""
        pixels = batch["pixel_values"]
        if self.vae is None:
            return pixels
        with torch.no_grad():
            return self.vae.encode(pixels).latent_dist.sample() * self.vae.config.scaling_factor

    def discriminator_view(self, x0: torch.Tensor, t_d: torch.Tensor) -> torch.Tensor:
        """What the discriminator sees of a clean sample: re-noised to t_d for the teacher backbone (LADD); else
        the sample itself (in pixels: latents are decoded for a pixel backbone such as DINOv2, as ADD does)."""
        backbone = self.discriminator.backbone
        if isinstance(backbone, UNetEncoderFeatures):
            return self.noised(x0, t_d)
        if self.vae is not None and getattr(backbone, "pixel_inputs", False):
            return self.vae.decode(x0 / self.vae.config.scaling_factor).sample
        return x0

    # ----- training -----------------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        optimizer_student, optimizer_disc = self.optimizers()
        x0 = self.clean_inputs(batch)
        condition = self.condition(batch)
        size, steps = len(x0), self.schedule.num_train_timesteps

        # 1. The student's one-step x_0 from real data noised at a student timestep (ADD, Section 3.1).
        choice = torch.randint(0, len(self.student_timesteps), (size,), device=self.device)
        t_student = torch.tensor(self.student_timesteps, device=self.device)[choice]
        x_student = self.noised(x0, t_student)
        student_x0 = self.x0_of(self.net, x_student, t_student, condition)

        # 2. Student update: fool the discriminator, and match the teacher's x_0 of a re-noised output.
        self.toggle_optimizer(optimizer_student)
        t_disc = self.discriminator_timesteps(size)
        adversarial_loss = hinge_generator_loss(
            self.discriminator(self.discriminator_view(student_x0, t_disc), t_disc, **condition)
        )
        if isinstance(self.objective, FlowMatching):
            t = torch.rand(size, device=self.device) * self.objective.num_train_timesteps
            weight = weight_from_alpha_sigma(self.distill_weighting, *flow_alpha_sigma(t / steps))
        else:
            t = torch.randint(0, steps, (size,), device=self.device)
            weight = distillation_weight(self.distill_weighting, self.alphas_cumprod, t)
        x_t = self.noised(student_x0.detach(), t)
        teacher_x0 = self.teacher_x0(x_t, t, condition)
        distill_loss = (weight * (student_x0.float() - teacher_x0.float()).pow(2).flatten(1).mean(dim=1)).mean()
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
            logits_real = self.discriminator.heads_logits(real_features, t_disc, **condition)
            with torch.set_grad_enabled(self.discriminator.backbone_trains):  # a frozen backbone needs no graph
                fake_view = self.discriminator_view(fake_x0, t_disc)
                fake_features = self.discriminator.features(fake_view, t_disc, **condition)
            logits_fake = self.discriminator.heads_logits(fake_features, t_disc, **condition)
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
        if not isinstance(self.discriminator.backbone, UNetEncoderFeatures):
            return torch.zeros(size, dtype=torch.long, device=self.device)
        steps = self.schedule.num_train_timesteps
        if isinstance(self.objective, FlowMatching):  # LADD's logit-normal t itself, as a network timestep
            draws = torch.randn(size, device=self.device) * self.disc_noise_std + self.disc_noise_mean
            return torch.sigmoid(draws) * self.objective.num_train_timesteps
        return high_noise_timesteps(size, steps, self.disc_noise_mean, self.disc_noise_std, self.device)

    def real_features(
        self, view: torch.Tensor, t_disc: torch.Tensor, condition: dict
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Features of real data and what R1 differentiates: the heads' inputs behind a frozen backbone (ADD), the
        images themselves when the backbone trains (PatchGAN)."""
        if self.discriminator.backbone_trains:
            view = view.detach().requires_grad_(True)
            return self.discriminator.features(view, t_disc, **condition), [view]
        with torch.no_grad():
            features = self.discriminator.features(view, t_disc, **condition)
        features = [f.detach().requires_grad_(True) for f in features]
        return features, features

    def configure_model(self) -> None:
        # The student only: the teacher is frozen and the discriminator's backbone is its own choice.
        prepare_for_training(self.net, self.compile_net, self.channels_last, self.gradient_checkpointing)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        fused = self.fused_adamw or None
        return [
            torch.optim.Adam(self.net.parameters(), lr=self.lr, betas=self.adam_betas, fused=fused),
            torch.optim.Adam(self.discriminator.head_parameters(), lr=self.disc_lr, betas=self.adam_betas, fused=fused),
        ]

    # ----- sampling -----------------------------------------------------------------------------------------

    def student_scheduler(self) -> SchedulerMixin:
        """DDIM at trailing timesteps, as the exported pipeline samples (no guidance, eta 0); FlowMatchEuler for the
        student of a flow-matching teacher."""
        if isinstance(self.objective, FlowMatching):
            return make_scheduler(FlowMatchEulerDiscreteScheduler, self.schedule, "epsilon", self.objective)
        scheduler = make_scheduler(DDIMScheduler, self.schedule, self.student_prediction_type)
        if self.vae is not None:
            scheduler = for_latents(scheduler)
        return reconfigured(scheduler, STUDENT_SCHEDULER)

    def flow_student_timesteps(self, steps: int) -> list[float]:
        """The network timesteps a flow student's scheduler visits in `steps` steps."""
        scheduler = self.student_scheduler()
        scheduler.set_timesteps(steps)
        return scheduler.timesteps.tolist()

    @torch.no_grad()
    def generate(
        self,
        net: torch.nn.Module,
        scheduler: SchedulerMixin,
        seeds: Sequence[int],
        steps: int,
        labels: torch.Tensor | None,
        prompts: Sequence[str] | None,
        guidance_scale: float = 1.0,
    ) -> torch.Tensor:
        """Images in [0, 1] of `net` (student or teacher) in `steps` steps."""
        if self.vae is None:
            return generate(net, scheduler, steps, generators_for(seeds), class_labels=labels)
        assert prompts is not None and self.tokenizer is not None and self.text_encoder is not None
        return generate_latent(
            net, self.vae, self.tokenizer, self.text_encoder, scheduler, prompts, seeds, steps, guidance_scale
        )

    def preview(self, seeds: Sequence[int], sampler: SchedulerFactory, steps: int) -> Preview:
        """The student at min(steps, its timesteps) steps (what the metrics judge); the grid shows, per seed, the
        student at 1, 2 and 4 steps (those within its timesteps) next to the teacher at `teacher_steps`."""
        labels, prompts = None, None
        if self.num_classes:
            labels = torch.tensor(list(seeds)) % self.num_classes
        if self.text_encoder is not None:
            captions = self.class_names or self.trainer.datamodule.captions()
            prompts = [captions[int(seed) % len(captions)] for seed in seeds]
        count = len(self.student_timesteps)
        columns = self.metric_steps
        student = {n: self.generate(self.net, self.student_scheduler(), seeds, n, labels, prompts) for n in columns}
        key = tuple(int(seed) for seed in seeds)
        if key not in self._teacher_previews:
            if isinstance(self.objective, FlowMatching) and not is_flow_sampler(sampler):
                sampler = FlowMatchEulerDiscreteScheduler  # the grid's DDPM sampler cannot run a flow teacher
            scheduler = make_scheduler(sampler, self.schedule, self.prediction_type, self.objective)
            if self.vae is not None:
                scheduler = for_latents(scheduler)
            guidance = self.teacher_guidance_scale if self.text_encoder is not None else 1.0
            self._teacher_previews[key] = self.generate(
                self.teacher, scheduler, seeds, self.teacher_steps, labels, prompts, guidance
            ).cpu()
        teacher = self._teacher_previews[key].to(self.device)
        grid = torch.stack([*(student[n] for n in columns), teacher], dim=1).flatten(0, 1)
        judged = min(steps, count)
        images = (
            student[judged]
            if judged in student
            else self.generate(self.net, self.student_scheduler(), seeds, judged, labels, prompts)
        )
        shapes_labels = labels
        if prompts is not None and self.class_names:
            shapes_labels = torch.tensor([self.class_names.index(p) for p in prompts])
        return Preview(images=images, labels=shapes_labels, grid_images=grid)

    # ----- checkpoints --------------------------------------------------------------------------------------

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Another net / discriminator config: name the keys, not a torch error. The teacher is not in the file.
        check_checkpoint_fits(self, checkpoint, may_be_missing=FROZEN_PREFIXES)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(FROZEN_PREFIXES)
        }
        meta: dict[str, Any] = {
            "format": CHECKPOINT_FORMAT,
            "method": "turbo",
            "net_class": type(self.net).__name__,
            "net_config": plain_config(self.net.config),
            "schedule": dict(vars(self.schedule)),
            "prediction_type": self.student_prediction_type,
            "teacher_prediction_type": self.prediction_type,
            "class_names": self.class_names,
            "student_timesteps": self.student_timesteps,
            "scheduler_overrides": {} if isinstance(self.objective, FlowMatching) else dict(STUDENT_SCHEDULER),
            "objective": self.objective.state(),
            "teacher": self.teacher_source,
        }
        if self.vae is not None and self.text_encoder is not None and self.tokenizer is not None:
            meta.update(
                vae_config=plain_config(self.vae.config),
                text_encoder_config=self.text_encoder.config.to_dict(),
                tokenizer=tokenizer_state(self.tokenizer),
            )
        checkpoint["lightdiff"] = meta
