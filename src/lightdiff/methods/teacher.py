"""The frozen teacher that every distillation method shares (model=turbo, model=lcm, model=dmd2), as one piece.

A teacher is a trained denoiser (`lightdiff.trained.TrainedDenoiser`: a lightdiff checkpoint, a diffusers pipeline
folder or a hub id of one) with its objective, VAE and conditioning family. `FrozenTeacher` holds it frozen, checks
that it fits the data, encodes batches into its space, gives its (guided) x_0 prediction, and draws the preview
column the grids show next to the student. `few_step_preview` is the grid every distilled student shows (the
student at 1, 2 and 4 steps beside the teacher, per seed), `save_student` its checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from diffusers import SchedulerMixin
from torch import nn

from lightdiff.config import ConfigError
from lightdiff.contract import Preview
from lightdiff.data import ImageDataModule
from lightdiff.diffusion import SchedulerFactory
from lightdiff.nets.denoiser import network_output
from lightdiff.nets.families import Condition, Conditioning, Inputs
from lightdiff.nets.lora import adapters_disabled
from lightdiff.nets.low_precision import BaseQuantization, BaseStorage, check_base_precision, store_frozen_base
from lightdiff.nets.pretrained import as_pipeline_folder
from lightdiff.nets.vae import encode_latents
from lightdiff.sampling import for_latents, generate, preview_inputs, reconfigured
from lightdiff.trained import REQUIRED_SAMPLERS, TrainedDenoiser, load_trained, local_path


def load_teacher(source: str) -> TrainedDenoiser:
    """A lightdiff checkpoint (pixel, latent or a distilled student), a diffusers pipeline folder, or a hub id."""
    try:
        path = local_path(source)
    except FileNotFoundError as error:  # offline, unknown id, no access
        raise ConfigError(f"model.teacher={error}") from error  # the error starts with the quoted source
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


class FrozenTeacher(nn.Module):
    """A teacher's network, VAE and conditioning family, frozen and in inference mode whatever the method does."""

    def __init__(
        self,
        source: str,  # model.teacher
        data: ImageDataModule,  # must be what the teacher was trained on
        guidance_scale: float,  # its classifier-free guidance where its family has an unconditional input
        method: str,  # the method's model= name, for messages
        config: str | None = None,  # model.teacher_config: `source` is a single-file SD checkpoint of this pipeline
        base_quantization: BaseQuantization = "none",  # model.base_quantization: how `store_in_low_precision` stores it
        base_storage: BaseStorage = "none",  # model.base_storage
    ) -> None:
        super().__init__()
        check_base_precision(base_quantization, base_storage, base_trains=False)  # refused before the teacher loads
        self.base_quantization, self.base_storage = base_quantization, base_storage
        if data.cache_latents:
            raise ConfigError(f"data.cache_latents=true is for model=latent; model={method} encodes on the fly")
        if config is not None or Path(source).suffix == ".safetensors":  # a .ckpt alone is a lightdiff checkpoint
            source = as_pipeline_folder(source, config, "model.teacher")
        loaded = load_teacher(source)
        self.source = source
        self.objective = loaded.objective
        self.net = loaded.net.requires_grad_(False).eval()
        self.vae = loaded.vae.requires_grad_(False).eval() if loaded.vae is not None else None
        self.conditioning = loaded.conditioning.requires_grad_(False).eval()
        self.class_names = loaded.class_names if loaded.class_names is not None else data.class_names
        self.guidance_scale = guidance_scale
        # how it samples where it is itself a few-step student (its checkpoint's record; None for other models)
        self.required_sampler, self.scheduler_overrides = loaded.required_sampler, loaded.scheduler_overrides
        self.student_steps = loaded.student_steps
        self.conditioning.check(self.net, data)
        height, width = loaded.default_size()  # its net's size, or what it trained at (a FLUX transformer has none)
        if (height, width) != (data.resolution, data.resolution):
            raise ConfigError(f"data.resolution={data.resolution} differs from the teacher's {height}x{width} px")
        if loaded.num_frames is not None and data.num_frames != loaded.num_frames:
            raise ConfigError(
                f"data.num_frames={data.num_frames} differs from the teacher's {loaded.num_frames} frames"
            )
        self.resolution = data.resolution
        self.num_frames = data.num_frames  # frames per clip of a video teacher; None for images
        self._previews: dict[tuple[Any, ...], torch.Tensor] = {}  # the teacher never changes: drawn once per seeds

    def train(self, mode: bool = True) -> FrozenTeacher:
        return super().train(False)

    def store_in_low_precision(self) -> None:
        """Its network's weights in low precision as `base_quantization` / `base_storage` say (nets/low_precision.py):
        called by a method once every network it copies from the teacher exists (a copy made later would be stored low
        too). A LoRA student that shares the teacher's network keeps its adapters as they are, as on a LoRA base."""
        store_frozen_base(self.net, self.base_quantization, self.base_storage)

    @property
    def can_guide(self) -> bool:
        """Whether its family has an unconditional input to guide with (text; not labels, not an unconditional net)."""
        return bool(self.conditioning.reads) and self.conditioning.has_unconditional

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """A batch's images in the teacher's space: themselves, or their VAE latents."""
        return pixels if self.vae is None else encode_latents(self.vae, pixels)

    @torch.no_grad()
    def x0(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        condition: Condition,
        batch: Inputs,
        guidance_scale: float | torch.Tensor | None = None,  # None: the teacher's; a (B,) tensor: one per sample
    ) -> torch.Tensor:
        """The teacher's x_0, guided where its family has an unconditional input: x0(x, uncond) + w (x0(x, c) -
        x0(x, uncond)) (Ho & Salimans 2022), both halves in one network call."""
        with adapters_disabled(self.net):  # a LoRA student shares the network: the teacher is it without adapters
            return self._x0(x_t, t, condition, batch, guidance_scale)

    def _x0(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        condition: Condition,
        batch: Inputs,
        guidance_scale: float | torch.Tensor | None,
    ) -> torch.Tensor:
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        if not self.can_guide or (not torch.is_tensor(scale) and scale == 1.0):
            return self.objective.predicted_x0(network_output(self.net, x_t, t, condition), x_t, t)
        unconditional, conditional = self._both_halves(x_t, t, condition, batch)
        x0 = self.objective.predicted_x0
        return _guided(x0(unconditional, x_t, t).float(), x0(conditional, x_t, t).float(), scale)

    @torch.no_grad()
    def guided_output(
        self, x_t: torch.Tensor, t: torch.Tensor, condition: Condition, batch: Inputs, guidance_scale: torch.Tensor
    ) -> torch.Tensor:
        """The teacher's classifier-free-guided network output at per-sample scales (B,), in float32: out(x, uncond) +
        w (out(x, c) - out(x, uncond)), the target a guidance-distilled student matches in one call."""
        with adapters_disabled(self.net):
            unconditional, conditional = self._both_halves(x_t, t, condition, batch)
        return _guided(unconditional.float(), conditional.float(), guidance_scale)

    def _both_halves(
        self, x_t: torch.Tensor, t: torch.Tensor, condition: Condition, batch: Inputs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The network's unconditional and conditional outputs, both halves in one call."""
        unconditional = self.conditioning(self.conditioning.without_condition(batch, [True] * len(x_t)))
        both = unconditional.to(x_t.device).cat(condition)
        output = network_output(self.net, torch.cat([x_t, x_t]), torch.cat([t, t]), both)
        unconditional_output, conditional_output = output.chunk(2)
        return unconditional_output, conditional_output

    def scheduler(self, sampler: SchedulerFactory) -> SchedulerMixin:
        """The grid's sampler where it fits the teacher's objective, else the objective's own; a few-step student's
        own (an LCM or DMD2 student's LCMScheduler, a turbo student's trailing timesteps), as sample.py draws it."""
        if self.required_sampler is not None:
            factory = REQUIRED_SAMPLERS[self.required_sampler]
        else:
            factory = sampler if self.objective.accepts(sampler) else self.objective.default_sampler
        scheduler = self.objective.scheduler(factory)
        scheduler = for_latents(scheduler) if self.vae is not None else scheduler
        return reconfigured(scheduler, self.scheduler_overrides or {})

    @torch.no_grad()
    def preview(self, seeds: Sequence[int], inputs: Inputs, sampler: SchedulerFactory, steps: int) -> torch.Tensor:
        """The teacher's images for `seeds` (guided for text), drawn once and kept on the CPU."""
        key = (tuple(int(seed) for seed in seeds), steps)
        if key not in self._previews:
            self._previews[key] = self._draw(self.scheduler(sampler), steps, seeds, inputs).cpu()
        return self._previews[key]

    def _draw(
        self,
        scheduler: SchedulerMixin,
        steps: int,
        seeds: Sequence[int],
        inputs: Inputs,
        visit: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
        decode: bool = True,
    ) -> torch.Tensor:
        """`generate` with the teacher alone (adapters off), guided where it can be, at its size and frames."""
        guidance = self.guidance_scale if self.can_guide else 1.0
        with adapters_disabled(self.net):
            return generate(
                self.net,
                scheduler,
                steps,
                seeds,
                self.conditioning,
                inputs,
                guidance,
                vae=self.vae,
                size=(self.resolution, self.resolution),
                num_frames=self.num_frames,
                visit=visit,
                decode=decode,
            )

    def require_deterministic_sampler(self, needed_by: str) -> None:
        """A ConfigError naming `needed_by` (the option that needs it) where the teacher is a few-step student whose own
        sampler re-noises with fresh noise at every step: its images are no deterministic function of the noise."""
        if self.required_sampler is not None:
            raise ConfigError(
                f"{needed_by}: model.teacher={self.source!r} is a few-step student ({self.required_sampler} re-noises "
                "at each step), whose images are no deterministic function of the noise; give a many-step teacher"
            )

    @torch.no_grad()
    def ode_pairs(self, seeds: Sequence[int], inputs: Inputs, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(noise, x_0) per seed: the initial noise of the teacher's deterministic sampler (its objective's default,
        DDIM with eta 0 for a DDPM teacher, guided as its previews are) and where `steps` steps of it land, both in
        the teacher's space (latents for a latent teacher): the noise-image pairs of DMD's regression loss (Yin et
        al. 2023, Section 3.3). A few-step teacher's own sampler re-noises with fresh noise: no deterministic map."""
        self.require_deterministic_sampler("ode_pairs")
        first_inputs: list[torch.Tensor] = []

        def keep_first(x_t: torch.Tensor, t: torch.Tensor, output: torch.Tensor) -> None:
            if not first_inputs:  # the sampler's first input: the seed's noise (times init_noise_sigma, 1 here)
                first_inputs.append(x_t.detach().clone())

        scheduler = self.scheduler(self.objective.default_sampler)
        x0 = self._draw(scheduler, steps, seeds, inputs, visit=keep_first, decode=False)
        return first_inputs[0], x0


def _guided(unconditional: torch.Tensor, conditional: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """unconditional + w (conditional - unconditional) (Ho & Salimans 2022), w a number or one per sample (B,)."""
    if torch.is_tensor(scale):
        scale = scale.float().reshape(-1, *([1] * (conditional.ndim - 1)))
    return unconditional + scale * (conditional - unconditional)


class DistilledStudent(Protocol):
    """What the shared preview reads of a distillation method (turbo, lcm and dmd2 have these members)."""

    net: nn.Module  # the student
    conditioning: Conditioning  # the student's family
    teacher: FrozenTeacher
    class_names: list[str] | None
    metric_steps: list[int]  # the student's step counts in the grid (1, 2, 4: those it can take)
    teacher_steps: int
    trainer: Any  # the Lightning trainer (its data module's captions)

    def student_scheduler(self) -> SchedulerMixin: ...


@torch.no_grad()
def few_step_preview(
    method: DistilledStudent,
    seeds: Sequence[int],
    sampler: SchedulerFactory,
    judged_steps: int,
    prompts: Sequence[str] | None = None,
) -> Preview:
    """The grid of a distilled student: per seed, the student at each of its `metric_steps` then the teacher at
    `teacher_steps` (guided for text; `sampler` where it fits the teacher); the metrics judge the student at
    `judged_steps`."""
    data = method.trainer.datamodule
    inputs, labels = preview_inputs(
        seeds, method.conditioning, method.class_names, data.captions(), prompts, data.num_classes, data.kept_labels
    )
    scheduler = method.student_scheduler()

    side = method.teacher.resolution

    def draw(count: int) -> torch.Tensor:
        return generate(
            method.net,
            scheduler,
            count,
            seeds,
            method.conditioning,
            inputs,
            vae=method.teacher.vae,
            size=(side, side),
            num_frames=method.teacher.num_frames,
        )

    shown = method.metric_steps
    images = {count: draw(count) for count in shown}
    teacher_images = method.teacher.preview(seeds, inputs, sampler, method.teacher_steps).to(images[shown[0]].device)
    grid = torch.stack([*(images[n] for n in shown), teacher_images], dim=1).flatten(0, 1)
    judged = images[judged_steps] if judged_steps in images else draw(judged_steps)
    if method.teacher.num_frames is not None:  # clips: a row per clip in the grid, the video judge on the student
        return Preview(images=judged.flatten(0, 1), grid_images=grid, videos=judged, prompts=inputs["text"])
    return Preview(images=judged, labels=labels, grid_images=grid)


def save_student(
    checkpoint: dict[str, Any],
    frozen_prefixes: tuple[str, ...],  # what is reloaded from `model.teacher`, not saved
    student: dict[str, Any],  # the student's `denoiser_metadata`
    teacher: FrozenTeacher,
    sampling: dict[str, Any],  # how the student samples (scheduler_overrides, sampler, student_timesteps)
) -> None:
    """A distilled student's checkpoint: without the frozen networks, with a plain-data block that `load_trained`
    reads like any denoiser's, plus the teacher's objective and source, and the size the student trained at (the
    teacher's: sample.py's default for a network without a size of its own, FLUX)."""
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(frozen_prefixes)}
    checkpoint["lightdiff"] = {
        **student,
        "image_size": [teacher.resolution, teacher.resolution],
        "num_frames": teacher.num_frames,
        "teacher_objective": teacher.objective.state(),
        "teacher": teacher.source,
        **sampling,
    }
