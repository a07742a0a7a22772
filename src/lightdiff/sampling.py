"""Sampling with diffusers schedulers, step for step the loop of diffusers' DDPMPipeline / DDIMPipeline.

Image i of a call is drawn from its own generator (seeded `seed + i` by the callers), so an image depends on its
seed alone, not on the batch it was drawn in, and a diffusers pipeline given the same generators reproduces it.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence

import numpy as np
import torch
from diffusers import DiTTransformer2DModel, SchedulerMixin, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from lightdiff.config import ConfigError
from lightdiff.diffusion import DDPM, FlowMatching, NoiseSchedule, Objective, PredictionType
from lightdiff.nets.denoiser import denoiser_output, num_classes

SchedulerFactory = Callable[..., SchedulerMixin]  # a diffusers scheduler class, or a partial of one


def is_flow_sampler(factory: SchedulerFactory) -> bool:
    """Whether a `sampler` (a scheduler class or a partial of one) integrates a flow (diffusers' FlowMatch*)."""
    scheduler_class = factory.func if isinstance(factory, functools.partial) else factory
    return getattr(scheduler_class, "__name__", "").startswith("FlowMatch")


def make_scheduler(
    factory: SchedulerFactory,
    schedule: NoiseSchedule,
    prediction_type: PredictionType,
    objective: Objective = DDPM(),  # noqa: B008  (a frozen dataclass: immutable)
) -> SchedulerMixin:
    """A sampling scheduler (the `sampler` config) configured with the training schedule and objective.

    A flow-matching model gets its number of training timesteps and, unless the sampler sets its own, the training
    shift (SD3, Equation 23); a sampler of the other kind than the model is a ConfigError naming both.
    """
    name = getattr(factory.func if isinstance(factory, functools.partial) else factory, "__name__", str(factory))
    if isinstance(objective, FlowMatching):
        if not is_flow_sampler(factory):
            raise ConfigError(
                f"sampler {name} is a DDPM sampler, but the model was trained with objective=flow_matching: "
                "use sampler=flow_euler"
            )
        shift = getattr(factory, "keywords", {}).get("shift", objective.shift)
        return factory(num_train_timesteps=objective.num_train_timesteps, shift=shift)
    if is_flow_sampler(factory):
        raise ConfigError(
            f"sampler {name} integrates a flow, but the model was trained with objective=ddpm: "
            "use a DDPM sampler (ddim, ddpm, dpm, euler)"
        )
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

    The trajectory stays float32 whatever the network's `dtype` (its inputs are cast to it, its outputs back): the
    noise a seed gives is drawn in float32 (torch's bf16 `randn` can draw other numbers than its fp32 one), and the
    scheduler's steps and their noise are float32 too, so `speed.dtype=bfloat16` changes only the network's rounding,
    never which image a seed is. Returns float32.
    `eta` is DDIM's stochasticity (Song et al. 2021, Equation 16): 0 is deterministic, 1 is DDPM's variance.
    """
    if num_inference_steps < 1:
        raise ValueError(f"steps={num_inference_steps} must be at least 1")
    step_parameters = inspect.signature(scheduler.step).parameters
    if eta != 0 and "eta" not in step_parameters:
        raise ValueError(f"eta={eta} has no meaning for {type(scheduler).__name__}; only the ddim sampler takes eta")
    if len(generators) != shape[0]:
        raise ValueError(f"{len(generators)} generators for a batch of {shape[0]}")
    sample = randn_tensor(shape, generator=generators, device=device, dtype=torch.float32)
    scheduler.set_timesteps(num_inference_steps, device=device)
    # Flow-matching schedulers start from plain noise and scale nothing (they have neither attribute).
    sample = sample * getattr(scheduler, "init_noise_sigma", 1.0)
    scale_model_input = getattr(scheduler, "scale_model_input", lambda sample, t: sample)
    step_kwargs: dict[str, object] = {"generator": generators}
    if "eta" in step_parameters:
        step_kwargs["eta"] = eta
    for t in scheduler.timesteps:
        # Always a float32 copy: a net compiled with CUDA graphs (speed.compile_mode=reduce-overhead) returns its
        # output in a buffer that its next call overwrites, and multistep schedulers (DPM-Solver) keep past outputs.
        model_output = model(scale_model_input(sample, t).to(dtype), t).to(torch.float32, copy=True)
        sample = scheduler.step(model_output, t, sample, **step_kwargs).prev_sample
    return sample


@torch.no_grad()
def generate(
    net: UNet2DModel | DiTTransformer2DModel,
    scheduler: SchedulerMixin,
    num_inference_steps: int,
    generators: list[torch.Generator],
    class_labels: torch.Tensor | None = None,
    eta: float = 0.0,
) -> torch.Tensor:
    """Pixel-space images in [0, 1], shaped (B, 3, H, W), float32: DDPMPipeline's / DDIMPipeline's result."""
    if class_labels is None and num_classes(net) is not None:
        raise ValueError("this model is class-conditional: give labels to sample")
    if class_labels is not None and num_classes(net) is None:
        raise ValueError("this model is unconditional: it takes no labels")
    size = net.config.sample_size
    height, width = (size, size) if isinstance(size, int) else size
    if class_labels is not None:
        class_labels = class_labels.to(net.device)

    def model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return denoiser_output(net, x_t, t, class_labels=class_labels)

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
