"""Sampling with diffusers schedulers, step for step the loop of diffusers' DDPMPipeline / DDIMPipeline.

Image i of a call is drawn from its own generator (seeded `seed + i` by the callers), so an image depends on its
seed alone, not on the batch it was drawn in, and a diffusers pipeline given the same generators reproduces it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import numpy as np
import torch
from diffusers import SchedulerMixin, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from lightdiff.diffusion import NoiseSchedule, PredictionType

SchedulerFactory = Callable[..., SchedulerMixin]  # a diffusers scheduler class, or a partial of one


def make_scheduler(
    factory: SchedulerFactory, schedule: NoiseSchedule, prediction_type: PredictionType
) -> SchedulerMixin:
    """A sampling scheduler (the `sampler` config) configured with the training schedule and objective."""
    return factory(**schedule.scheduler_kwargs(), prediction_type=prediction_type)


def for_latents(scheduler: SchedulerMixin) -> SchedulerMixin:
    """The scheduler as diffusers' StableDiffusionPipeline runs it: no clipping of x0 to [-1, 1] (latents are not
    bounded like pixels) and `steps_offset=1`; the pipeline rewrites both when it is built, so sampling with this
    scheduler reproduces an exported pipeline."""
    fixes = {key: value for key, value in (("clip_sample", False), ("steps_offset", 1)) if key in scheduler.config}
    return reconfigured(scheduler, fixes)


def reconfigured(scheduler: SchedulerMixin, changes: dict[str, object]) -> SchedulerMixin:
    """A scheduler of the same class with `changes` to its config (e.g. a turbo student's trailing timesteps)."""
    if not changes:
        return scheduler
    # Private keys dropped: `_use_default_values` would make from_config ignore the changes.
    config = {key: value for key, value in scheduler.config.items() if not key.startswith("_")}
    return type(scheduler).from_config({**config, **changes})


def generators_for(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image: images are reproducible across devices and batch sizes."""
    return [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]


ModelFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t) -> the network's prediction


@torch.no_grad()
def denoise(
    model: ModelFunction,
    scheduler: SchedulerMixin,
    num_inference_steps: int,
    shape: tuple[int, ...],
    generators: list[torch.Generator],
    device: torch.device,
    dtype: torch.dtype,
    eta: float = 0.0,
) -> torch.Tensor:
    """The sampling loop of diffusers' pipelines: noise from `generators`, then one scheduler step per timestep.

    `eta` is DDIM's stochasticity (Song et al. 2021, Equation 16): 0 is deterministic, 1 is DDPM's variance.
    """
    if num_inference_steps < 1:
        raise ValueError(f"steps={num_inference_steps} must be at least 1")
    step_parameters = inspect.signature(scheduler.step).parameters
    if eta != 0 and "eta" not in step_parameters:
        raise ValueError(f"eta={eta} has no meaning for {type(scheduler).__name__}; only the ddim sampler takes eta")
    if len(generators) != shape[0]:
        raise ValueError(f"{len(generators)} generators for a batch of {shape[0]}")
    sample = randn_tensor(shape, generator=generators, device=device, dtype=dtype)
    scheduler.set_timesteps(num_inference_steps, device=device)
    sample = sample * scheduler.init_noise_sigma
    step_kwargs: dict[str, object] = {"generator": generators}
    if "eta" in step_parameters:
        step_kwargs["eta"] = eta
    for t in scheduler.timesteps:
        model_output = model(scheduler.scale_model_input(sample, t), t)
        sample = scheduler.step(model_output, t, sample, **step_kwargs).prev_sample
    return sample


@torch.no_grad()
def generate(
    net: UNet2DModel,
    scheduler: SchedulerMixin,
    num_inference_steps: int,
    generators: list[torch.Generator],
    class_labels: torch.Tensor | None = None,
    eta: float = 0.0,
) -> torch.Tensor:
    """Pixel-space images in [0, 1], shaped (B, 3, H, W), float32: DDPMPipeline's / DDIMPipeline's result."""
    if class_labels is None and net.config.num_class_embeds is not None:
        raise ValueError("this model is class-conditional: give labels to sample")
    if class_labels is not None and net.config.num_class_embeds is None:
        raise ValueError("this model is unconditional: it takes no labels")
    size = net.config.sample_size
    height, width = (size, size) if isinstance(size, int) else size
    if class_labels is not None:
        class_labels = class_labels.to(net.device)

    def model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return net(x_t, t, class_labels=class_labels).sample

    shape = (len(generators), net.config.in_channels, height, width)
    sample = denoise(model, scheduler, num_inference_steps, shape, generators, net.device, net.dtype, eta)
    return (sample.float() / 2 + 0.5).clamp(0, 1)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> uint8 (B, H, W, 3), rounding as diffusers' `numpy_to_pil` does."""
    return (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


def grid_columns(count: int) -> int:
    """Columns of the default (square) grid of `count` images."""
    return int(np.ceil(np.sqrt(count)))


def image_grid(images: np.ndarray, columns: int | None = None, scale: int = 1) -> Image.Image:
    """uint8 (B, H, W, 3) -> one PIL grid, `columns` wide (default: square), optionally upscaled (nearest)."""
    count, height, width, _ = images.shape
    columns = columns or grid_columns(count)
    rows = int(np.ceil(count / columns))
    grid = np.zeros((rows * height, columns * width, 3), dtype=np.uint8)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        grid[row * height : (row + 1) * height, column * width : (column + 1) * width] = image
    picture = Image.fromarray(grid)
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
    return picture
