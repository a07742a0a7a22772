"""Fine-tuning a few-step (distilled) model on new data without losing its few steps (`model=few_step_finetune`).

A distilled base (a turbo, DMD2 or LCM student of lightdiff's, or a few-step pipeline such as Z-Image-Turbo's) samples
in 1-8 steps because its network was trained only where those steps evaluate it, to land on sharp images. LoRA trained
on new images with the ordinary denoising loss (what every trainer does, "plain LoRA": `task_timesteps=all`,
`preserve_weight=0`) fits the network at every noise level to the mean of the data (the denoising loss's minimiser
is E[x_0 | x_t]), which is what a many-step sampler needs and what a one-step sampler blurs with. The adapters are
shared by every prompt, so the old prompts' few-step images drift too. Three remedies of the literature, as options:

1. **Preservation along the base's own few-step trajectory** (`preserve_weight` lambda > 0, `preserve_prompts`): for
   prompts the base already draws, run the frozen base (the network with its adapters off) through its `steps`-step
   sampler from fresh noise, and pull the adapted network's x_0 at a visited input (x_s, s) toward the frozen one's:
       L = L_task + lambda E_{c, s} || x0_theta(x_s, s, c) - x0_base(x_s, s, c) ||^2,  c ~ preserve_prompts
   (per-element mean, the task loss's scale). It regresses outputs rather than images, as LwF (Li & Hoiem 2016,
   "Learning without Forgetting", Equation 2 with an L2 distance) and DreamBooth's prior preservation (Ruiz et al.
   2023, Equation 2, with the frozen model's images as the prior), here at exactly the inputs the few-step sampler
   feeds the network, so what is kept is the few-step behaviour itself.
2. **Training where the student samples** (`task_timesteps=student`): the new images' denoising loss only at the
   timesteps of the base's `steps`-step trajectory, x_s = noised(x_0, s), as ADD trains its student (Sauer et al.
   2023, Section 3.1), instead of at every training timestep.
3. **Self-consistency along its own trajectory** (`consistency_weight` mu > 0): on the new images' prompts, the model
   being trained runs its own `steps`-step sampler from fresh noise (no gradient), and its x_0 from the input of an
   earlier step is pulled toward where the whole trajectory lands,
       L += mu E_{c, s < s_last} || x0_theta(x_s, s, c) - sg(x0_theta(x_{s_last}, s_last, c)) ||^2,
   the self-consistency target of shortcut models (Frans et al. 2025, "One Step Diffusion via Shortcut Models", arXiv
   2410.12557: one big step matches the model's own smaller ones) and consistency distillation with the model as its own
   teacher: what the new class's denoising loss teaches at the later, low-noise steps reaches the first step, whose
   denoising-loss minimiser alone is the data's mean (a blur).

The base is frozen and held once: the network is shared, adapters on (the fine-tuned model) or off (the base, as a
LoRA turbo student's teacher is). The fine-tuned model samples as its base does (the same scheduler and step count);
its checkpoint holds the adapters alone, reloaded on the base by sample.py and the exporter like any LoRA's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
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
from lightdiff.diffusion import SchedulerFactory, weighted_mse
from lightdiff.methods.optimization import OptimisesItsNetwork, OptimizerFactory, check_lr_schedule
from lightdiff.methods.teacher import FrozenTeacher, few_step_preview, save_student
from lightdiff.nets.denoiser import network_output
from lightdiff.nets.families import Inputs
from lightdiff.nets.lora import LoraSettings, adapt, adapters_disabled, is_adapter_key
from lightdiff.nets.vae import vae_scale_factor
from lightdiff.sampling import generate, pipeline_timesteps

# The frozen base is reloaded from `base` (the adapters' record names it), not saved.
FROZEN_PREFIXES = ("teacher.",)
TASK_TIMESTEPS = ("all", "student")


class FewStepFineTune(OptimisesItsNetwork, pl.LightningModule):
    """LoRA adapters on a frozen few-step base, trained on `data` (new images), optionally keeping the base's few-step
    output on `preserve_prompts` and its own few steps consistent on the new prompts."""

    distance_prefix = ""

    def __init__(
        self,
        data: ImageDataModule,  # given by train.py: the new images, at the base's resolution
        base: str,  # the few-step model: a lightdiff student checkpoint, a pipeline folder or a hub id
        lora: LoraSettings,  # the adapters trained (model.lora.rank is required)
        steps: PositiveInt | None = None,  # the sampling steps kept; None: those the base was distilled for
        task_timesteps: Literal["all", "student"] = "student",  # where the new images' loss is taken: every
        # training timestep (plain LoRA), or the base's few-step timesteps only
        preserve_weight: NonNegativeFloat = 1.0,  # lambda of the preservation term; 0: none (plain LoRA)
        preserve_prompts: list[str] | None = None,  # prompts whose few-step images are kept (the base's captions)
        preserve_batch_size: PositiveInt | None = None,  # prompts per step for the term; None: data.batch_size
        consistency_weight: NonNegativeFloat = 0.0,  # mu of the self-consistency term on the new prompts; 0: none
        optimizer: OptimizerFactory = torch.optim.AdamW,  # (parameters, lr) -> optimiser: the `optimizer` group
        lr: PositiveFloat = 1e-4,
        lr_schedule: Literal["constant", "cosine"] = "constant",  # after the warm-up: constant, or cosine to 0
        warmup_steps: int = 0,  # linear warm-up from 0, in optimiser steps
        max_grad_norm: float | None = 1.0,  # clip the adapters' gradient norm (None: off)
        compile: bool = False,  # torch.compile the network (regional where diffusers defines repeated blocks)
        channels_last: bool = False,  # NHWC weights: faster convolutions on GPU
        gradient_checkpointing: bool = False,  # recompute activations in backward: less memory
    ) -> None:
        super().__init__()
        self.strict_loading = False  # checkpoints hold the adapters alone: the base is reloaded from `base`
        if task_timesteps not in TASK_TIMESTEPS:
            raise ConfigError(f"model.task_timesteps={task_timesteps!r} is not one of {TASK_TIMESTEPS}")
        if lora is None or not lora.enabled:
            raise ConfigError(
                "model.lora.rank=null: few_step_finetune trains LoRA adapters on the frozen base (the base is the "
                "network with its adapters off); give model.lora.rank=N"
            )
        # The frozen base in a teacher's place: the grid's reference column, at its own sampler and steps.
        self.teacher = FrozenTeacher(base, data, 1.0, "few_step_finetune")
        net = self.teacher.net
        if any(is_adapter_key(key) for key in net.state_dict()):
            raise ConfigError(
                f"model.base={base!r} is itself a LoRA checkpoint; export it with its adapters merged (sample.py "
                "export=DIR export_fused=true) and fine-tune that folder"
            )
        self.steps = steps if steps is not None else self.teacher.student_steps
        if self.steps is None:
            raise ConfigError(
                f"model.base={base!r} records no few-step sampling (not a lightdiff student): give model.steps, the "
                "step count it samples in (Z-Image-Turbo: 8)"
            )
        self.objective, self.vae = self.teacher.objective, self.teacher.vae
        self.conditioning = self.teacher.conditioning
        self.class_names = self.teacher.class_names
        self.trajectory_timesteps = self._trajectory_timesteps()
        if preserve_weight > 0:
            if not preserve_prompts:
                raise ConfigError(
                    f"model.preserve_weight={preserve_weight} needs model.preserve_prompts: prompts the base already "
                    "draws (its training captions), whose few-step images are kept"
                )
            if "text" not in self.conditioning.reads:
                raise ConfigError(
                    f"model.preserve_prompts: the base's conditioning ({type(self.conditioning).__name__}) reads "
                    "no text"
                )
        self.preserve_weight, self.preserve_prompts = preserve_weight, list(preserve_prompts or [])
        self.preserve_batch_size = preserve_batch_size or data.batch_size
        self.task_timesteps = task_timesteps
        if consistency_weight > 0 and self.steps < 2:
            raise ConfigError(
                f"model.consistency_weight={consistency_weight}: the self-consistency term pulls fewer steps to where "
                f"the base's {self.steps}-step trajectory lands; it needs model.steps >= 2"
            )
        self.consistency_weight = consistency_weight
        # One copy of the network: adapters on it is the fine-tuned model, off it the base (B = 0: step 0 is the base).
        self.lora_base = adapt(net, lora, base_source=base)
        self.net = net
        self.optimizer_factory, self.lr = optimizer, lr
        check_lr_schedule(lr_schedule, warmup_steps)
        self.lr_schedule, self.warmup_steps = lr_schedule, warmup_steps
        self.max_grad_norm = max_grad_norm
        self.compile_net = compile  # not `self.compile`: that is nn.Module's method
        self.channels_last, self.gradient_checkpointing = channels_last, gradient_checkpointing
        self.teacher_steps = self.steps  # the grid's base column: the base at its own step count

    # ----- the base's few-step sampling ---------------------------------------------------------------------

    def student_scheduler(self) -> SchedulerMixin:
        """The base's own sampler, as sample.py draws it (and the fine-tuned model with it)."""
        return self.teacher.scheduler(self.objective.default_sampler)

    def _trajectory_timesteps(self) -> list[float]:
        """The timesteps the base's sampler visits in `steps` steps (with its pipeline's own arguments)."""
        scheduler = self.student_scheduler()
        side = self.teacher.resolution // (vae_scale_factor(self.vae) if self.vae is not None else 1)
        scheduler.set_timesteps(self.steps, **pipeline_timesteps(self.teacher.net, scheduler, self.steps, side, side))
        return scheduler.timesteps.tolist()

    @property
    def metric_steps(self) -> list[int]:
        """The grid's step counts: 1, 2 and 4 up to the kept steps, and the kept count itself."""
        return sorted({n for n in (1, 2, 4) if n <= self.steps} | {self.steps})

    # ----- training -----------------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x0 = self.teacher.encode(batch["pixel_values"])
        with torch.no_grad():
            condition = self.conditioning(batch)
        noise = torch.randn_like(x0)
        if self.task_timesteps == "all":
            example = self.objective.training_example(x0, noise)
        else:  # the base's few-step timesteps, each sample at one of them
            visited = torch.tensor(self.trajectory_timesteps, device=self.device)
            example = self.objective.example_at(x0, noise, visited[torch.randint(len(visited), (len(x0),))])
        prediction = network_output(self.net, example.x_t, example.timesteps, condition)
        task_loss = weighted_mse(prediction, example.target, example.weight)
        loss = task_loss
        if self.preserve_weight > 0:
            preserve_loss = self.preservation_loss()
            loss = loss + self.preserve_weight * preserve_loss
            self.log("train/preserve_loss", preserve_loss)
        if self.consistency_weight > 0:
            consistency_loss = self.consistency_loss(batch)
            loss = loss + self.consistency_weight * consistency_loss
            self.log("train/consistency_loss", consistency_loss)
        self.log("train/task_loss", task_loss)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        return loss

    def preservation_loss(self) -> torch.Tensor:
        """|| x0_theta(x_s, s, c) - x0_base(x_s, s, c) ||^2 (per-element mean) at one step s of the frozen base's own
        `steps`-step trajectory per prompt, from fresh noise (see the module's docstring)."""
        size = self.preserve_batch_size
        picks = torch.randint(len(self.preserve_prompts), (size,)).tolist()
        inputs = {"label": None, "text": [self.preserve_prompts[i] for i in picks]}
        visited = self.trajectory(inputs, size, base=True)
        step = torch.randint(len(visited), (size,))  # one visited input per prompt
        x_s, s, base_x0 = self._at(visited, step)
        return self._x0_distance(x_s, s, inputs, base_x0)

    def consistency_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """|| x0_theta(x_s, s, c) - sg(x_0 at the end of its own trajectory) ||^2 (per-element mean): the model being
        trained runs its own `steps`-step sampler from fresh noise on the batch's prompts (no gradient), and its x_0
        from an earlier step's input s is pulled to where the whole trajectory lands (see the module's docstring)."""
        inputs = {key: batch[key] for key in ("label", "text") if key in batch}
        size = len(next(iter(inputs.values())))
        visited = self.trajectory(inputs, size, base=False)
        landed = visited[-1][2]  # the last step's x_0 is the sample (DDIM's final alpha 1, LCM's and Euler's last step)
        step = torch.randint(len(visited) - 1, (size,))  # an input before the last step
        x_s, s, _ = self._at(visited, step)
        return self._x0_distance(x_s, s, inputs, landed)

    def trajectory(self, inputs: Inputs, size: int, base: bool) -> list[tuple[torch.Tensor, ...]]:
        """(x_s, s, x0(x_s, s)) at every step of the `steps`-step sampler from fresh noise (seeds drawn from the run's
        random stream: resumes exactly), without gradient: of the frozen base (`base`: adapters off) or of the model
        being trained."""
        seeds = torch.randint(0, 2**31 - 1, (size,)).tolist()
        visited: list[tuple[torch.Tensor, ...]] = []

        def keep(x_t: torch.Tensor, t: torch.Tensor, output: torch.Tensor) -> None:
            timesteps = t.reshape(1).expand(len(x_t)).to(x_t.device)
            visited.append((x_t.detach().clone(), timesteps, self.objective.predicted_x0(output, x_t, timesteps)))

        with torch.no_grad(), adapters_disabled(self.net) if base else contextlib.nullcontext():
            generate(
                self.net,
                self.student_scheduler(),
                self.steps,
                seeds,
                self.conditioning,
                inputs,
                vae=self.vae,
                size=(self.teacher.resolution, self.teacher.resolution),
                num_frames=self.teacher.num_frames,
                visit=keep,
                decode=False,  # only the visited inputs and predictions are used, not the images
            )
        return visited

    @staticmethod
    def _at(visited: list[tuple[torch.Tensor, ...]], step: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Row b of each visited tensor at step `step[b]`."""
        rows = torch.arange(len(step))
        return tuple(torch.stack([entry[k] for entry in visited])[step, rows] for k in range(3))

    def _x0_distance(self, x_s: torch.Tensor, s: torch.Tensor, inputs: Inputs, target: torch.Tensor) -> torch.Tensor:
        """Per-element mean squared distance of the adapted network's x_0 at (x_s, s) from `target`."""
        with torch.no_grad():
            condition = self.conditioning(inputs)
        x0 = self.objective.predicted_x0(network_output(self.net, x_s, s, condition), x_s, s)
        return weighted_mse(x0, target, torch.ones(len(x0), device=x0.device))

    # ----- sampling -----------------------------------------------------------------------------------------

    def preview(
        self, seeds: Sequence[int], sampler: SchedulerFactory, steps: int, prompts: Sequence[str] | None = None
    ) -> Preview:
        """The fine-tuned model at min(steps, the kept steps) steps (what the metrics judge); per seed, the grid
        shows it at 1, 2, 4 steps next to the frozen base at its own step count."""
        return few_step_preview(self, seeds, sampler, min(steps, self.steps), prompts)

    # ----- checkpoints --------------------------------------------------------------------------------------

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_adapter_checkpoint(self, checkpoint, self.lora_base)
        check_checkpoint_fits(self, checkpoint, may_be_missing=(*FROZEN_PREFIXES, "net."))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        record = denoiser_metadata(
            "few_step_finetune", self.net, self.objective, self.conditioning, self.vae, self.class_names, self.lora_base
        )
        save_student(
            checkpoint,
            FROZEN_PREFIXES,
            record,
            self.teacher,
            {
                "student_timesteps": self.trajectory_timesteps,
                "scheduler_overrides": self.teacher.scheduler_overrides,
                "sampler": self.teacher.required_sampler,
            },
        )
        keep_only_adapters(checkpoint)  # the base is reloaded from `base`
