"""Sampling with diffusers schedulers, step for step the loops of diffusers' pipelines, for every lightdiff model.

Image i of a call is drawn from its own generator (seeded `seed + i` by the callers), so an image depends on its
seed alone, not on the batch it was drawn in, and a diffusers pipeline given the same generators reproduces it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from lightdiff.diffusion.flow_matching import resolution_shift_mu
from lightdiff.nets.denoiser import image_tokens, network_output
from lightdiff.nets.families import SIZE_AND_CROP, Conditioning, Inputs, family_of, size_and_crop
from lightdiff.nets.families.base import RampsGuidance
from lightdiff.nets.vae import Autoencoder, decode_latents, latent_frames, vae_scale_factor


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


# The largest seed an image is drawn from: torch.Generator takes 64 bits, and a signed 64-bit integer is what every
# tool a seed is handed to (numpy, JSON readers, databases) keeps exactly; -1 would be taken modulo 2**64 silently.
MAX_SEED = 2**63 - 1


def seed_problem(seed: object, count: int, key: str = "seed") -> str | None:
    """Why images seed .. seed + count - 1 cannot be drawn (a message naming `key`), or None."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        return f"{key}={seed!r} must be a whole number from 0 to {MAX_SEED} (2**63 - 1)"
    if seed + count - 1 > MAX_SEED:
        return f"{key}={seed} draws seeds up to {seed + count - 1}, past {MAX_SEED} (2**63 - 1)"
    return None


def generators_for(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image: images are reproducible across devices and batch sizes."""
    return [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]


ModelFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t) -> the network's prediction


# Schedulers whose `step` has an `eta` parameter but never uses it: CogVideoXDDIMScheduler always steps
# deterministically (diffusers 0.42), so eta=1 would change nothing while metadata.jsonl recorded it.
_STEP_IGNORES_ETA = ("CogVideoXDDIMScheduler",)


def check_eta(scheduler: SchedulerMixin, eta: float) -> bool:
    """Whether `scheduler.step` uses DDIM's `eta`; a nonzero `eta` for one that does not is an error (it would draw
    the same images as eta=0)."""
    name = type(scheduler).__name__
    takes_eta = "eta" in inspect.signature(scheduler.step).parameters and name not in _STEP_IGNORES_ETA
    if eta != 0 and not takes_eta:
        raise ValueError(
            f"eta={eta} has no meaning for {name} (its step has no eta, or ignores it); only the ddim sampler takes eta"
        )
    return takes_eta


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
    timestep_arguments: dict[str, object] | None = None,  # `set_timesteps`'s other arguments (`pipeline_timesteps`)
    noise: torch.Tensor | None = None,  # x_T drawn by the caller from `generators` (`Family.initial_noise`)
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
    takes_eta = check_eta(scheduler, eta)
    if len(generators) != shape[0]:
        raise ValueError(f"{len(generators)} generators for a batch of {shape[0]}")
    if noise is None:
        noise = randn_tensor(shape, generator=generators, device=device, dtype=torch.float32)
    if noise.shape != shape:
        raise ValueError(f"noise of shape {tuple(noise.shape)} for samples of shape {shape}")
    sample = noise
    scheduler.set_timesteps(num_inference_steps, device=device, **(timestep_arguments or {}))
    # Flow-matching schedulers start from plain noise and scale nothing (they have neither attribute).
    sample = sample * getattr(scheduler, "init_noise_sigma", 1.0)
    scale_model_input = getattr(scheduler, "scale_model_input", lambda sample, t: sample)
    step_kwargs: dict[str, object] = {"generator": generators}
    if takes_eta:
        step_kwargs["eta"] = eta
    for t in scheduler.timesteps:
        # Always a float32 copy: a net compiled with CUDA graphs (speed.compile_mode=reduce-overhead) returns its
        # output in a buffer that its next call overwrites, and multistep schedulers (DPM-Solver) keep past outputs.
        model_output = model(scale_model_input(sample, t).to(dtype), t).to(torch.float32, copy=True)
        sample = scheduler.step(model_output, t, sample, **step_kwargs).prev_sample
    return sample


@torch.no_grad()
def generate(
    net: torch.nn.Module,  # the denoiser
    scheduler: SchedulerMixin,  # from `Objective.scheduler` (and `for_latents` in a latent space)
    num_inference_steps: int,
    seeds: Sequence[int],  # image i is drawn from its own generator seeded seeds[i]
    conditioning: Conditioning,  # the network's conditioning family
    inputs: Inputs,  # what each image is conditioned on: {"label": (B,)} or {"text": B prompts}, or nothing
    guidance_scale: float = 1.0,  # classifier-free guidance; 1: none
    negative_prompt: str = "",  # the unconditional input of a guided text model
    eta: float = 0.0,  # DDIM's stochasticity
    vae: Autoencoder | None = None,  # decode the samples through it (a latent model)
    size: tuple[int, int] | None = None,  # (height, width) of the images in pixels; None: the net's sample_size
    num_frames: int | None = None,  # frames per clip of a video net; None: its family's default (the pipeline's)
    visit: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,  # called at each step with the
    # network's input x_t, the timestep and its (guided) output: the trajectory a method trains along
    decode: bool = True,  # False: return the final latents as sampled (no VAE decode, no [0, 1] mapping)
) -> torch.Tensor:
    """Images in [0, 1], (B, 3, H, W), float32: step for step what DDPMPipeline / DDIMPipeline (pixels) or
    StableDiffusionPipeline / StableDiffusion3Pipeline (latents) draw from the same generators; clips (B, F, 3, H, W)
    of a video net, as CogVideoXPipeline draws them (noise in the transformer's (B, F, C, H, W) latent layout).

    Guided: out = out(x, uncond) + w (out(x, c) - out(x, uncond)) (Ho & Salimans 2022, Equation 6 with w = 1 + their
    w), both halves in one network call as the pipelines do; the same combination of velocities for a flow.
    """
    device = net.device
    factor = vae_scale_factor(vae) if vae is not None else 1
    height, width = size or sample_size(net, factor)
    if height % factor or width % factor:
        raise ValueError(f"height={height} and width={width} must be multiples of the VAE's down-sampling {factor}")
    if SIZE_AND_CROP in conditioning.reads and SIZE_AND_CROP not in inputs:
        # as StableDiffusionXLPipeline's default: an uncropped image of the size drawn
        inputs = {**inputs, SIZE_AND_CROP: size_and_crop(height, width, len(seeds))}
    generators = generators_for(seeds)
    if "generators" in conditioning.reads:  # SVD draws its frame's augmentation noise before the latents' noise
        inputs = {**inputs, "generators": generators}
    family = family_of(net)
    frames = (num_frames or family.default_num_frames(net)) if family.video else None
    if "num_frames" in conditioning.reads:  # Wan's image-to-video encodes the first frame with the clip's black rest
        inputs = {**inputs, "num_frames": frames}
    condition = conditioning(inputs).to(device)
    guided = guidance_scale > 1.0
    if guided:
        if not conditioning.has_unconditional:
            raise ValueError(f"guidance_scale={guidance_scale}: this model has no unconditional input to guide with")
        unconditional = conditioning.without_condition(inputs, [True] * len(seeds), negative_prompt)
        condition = conditioning(unconditional).to(device).cat(condition)

    shape: tuple[int, ...] = (len(seeds), family.latent_channels(net), height // factor, width // factor)
    scale: float | torch.Tensor = guidance_scale
    if frames is not None:
        shape = (len(seeds), latent_frames(vae, frames), *shape[1:])
        if isinstance(conditioning, RampsGuidance):  # StableVideoDiffusionPipeline: guidance rising over the frames
            ramp = torch.linspace(conditioning.guidance_scale_min, guidance_scale, shape[1], device=device)
            scale = ramp.reshape(1, -1, 1, 1, 1)

    def model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        prediction = network_output(net, torch.cat([x_t, x_t]) if guided else x_t, t, condition)
        if guided:
            uncond, cond = prediction.float().chunk(2)  # the guidance sum in float32, as the trajectory (denoise)
            prediction = family.guided(net, uncond, cond, scale)
        if visit is not None:
            visit(x_t, t, prediction)
        return prediction

    timesteps = pipeline_timesteps(net, scheduler, num_inference_steps, shape[-2], shape[-1])
    noise = family.initial_noise(shape, generators, device)
    sample = denoise(model, scheduler, num_inference_steps, shape, generators, device, net.dtype, eta, timesteps, noise)
    if not decode:
        return sample
    images = decode_latents(vae, sample) if vae is not None else sample
    return (images.float() / 2 + 0.5).clamp(0, 1)


def pipeline_timesteps(
    net: torch.nn.Module, scheduler: SchedulerMixin, num_inference_steps: int, height: int, width: int
) -> dict[str, object]:
    """What the network's pipeline passes to `set_timesteps` for latents `height` x `width` besides the step count:
    the family's own (FluxPipeline's sigmas: `Family.pipeline_timesteps`); a scheduler with dynamic shifting mu of
    the image's tokens (`calculate_shift`, which FluxPipeline and StableDiffusion3Pipeline compute from the
    scheduler's config)."""
    arguments: dict[str, object] = family_of(net).pipeline_timesteps(scheduler, num_inference_steps)
    if scheduler.config.get("use_dynamic_shifting"):
        arguments["mu"] = resolution_shift_mu(
            image_tokens(net, height, width),
            scheduler.config.get("base_image_seq_len", 256),
            scheduler.config.get("max_image_seq_len", 4096),
            scheduler.config.get("base_shift", 0.5),
            scheduler.config.get("max_shift", 1.15),
        )
    return arguments


def sample_size(net: torch.nn.Module, factor: int = 1) -> tuple[int, int]:
    """(height, width) in pixels a network draws by default: its family's default latent size (its `sample_size`;
    FLUX has none, rotary positions fit any size: FluxPipeline's default) times the VAE's `factor`."""
    size = family_of(net).default_sample_size(net)
    if size is None:
        raise ValueError(f"a {type(net).__name__} has no sample_size: give the size to draw")
    height, width = (size, size) if isinstance(size, int) else size
    return height * factor, width * factor


def preview_inputs(
    seeds: Sequence[int],
    conditioning: Conditioning,
    class_names: list[str] | None,
    captions: list[str],
    prompts: Sequence[str] | None = None,
    num_classes: int = 0,
    kept_labels: Sequence[int] | None = None,  # the classes the data holds (data.classes / data.exclude); None: all
) -> tuple[Inputs, torch.Tensor | None]:
    """What a training-time preview conditions seed i on: the given prompt i % prompts (the user's validation prompts),
    else class i % classes (as a label, and by name as the prompt), else the data set's caption i % captions; and the
    class labels the shapes metric judges, where the model is conditioned on them (None otherwise).

    `num_classes` is the data's label count: a folder whose metadata gives integer labels and no class names still
    has classes, drawn by index (its captions, if any, stay the prompts). Data of some classes only (`kept_labels`)
    cycles through those: a model trained without triangles is not asked for one, nor one of triangles for a circle."""
    if prompts:
        return {"label": None, "text": [prompts[int(seed) % len(prompts)] for seed in seeds]}, None
    classes = len(class_names) if class_names else num_classes
    conditioned = classes > 0 and bool(conditioning.reads)
    labels = None
    if conditioned:
        cycle = torch.as_tensor(list(kept_labels) if kept_labels is not None else range(classes))
        labels = cycle[torch.tensor(list(seeds)) % len(cycle)]
    if class_names and labels is not None:  # each image's prompt is its class's name
        return {"label": labels, "text": [class_names[int(label)] for label in labels]}, labels
    texts = class_names or captions
    prompts = [texts[int(seed) % len(texts)] for seed in seeds] if texts else None
    return {"label": labels, "text": prompts}, labels


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> uint8 (B, H, W, 3), rounding as diffusers' `numpy_to_pil` does; clips
    (B, F, 3, H, W) -> (B, F, H, W, 3). Clipped to [0, 1] first, as the pipelines' post-processing clamps: a decoder's
    overshoot (-0.01) would otherwise wrap around to white (255) in the cast."""
    return (images.movedim(-3, -1).cpu().numpy().clip(0, 1) * 255).round().astype(np.uint8)


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


def frames_grid(clips: np.ndarray, scale: int = 1) -> Image.Image:
    """uint8 clips (B, F, H, W, 3) -> one PIL grid, a clip per row and a frame per column."""
    count, frames = clips.shape[:2]
    return image_grid(clips.reshape(count * frames, *clips.shape[2:]), columns=frames, scale=scale)


def grid_video(clips: np.ndarray, scale: int = 1) -> list[Image.Image]:
    """uint8 clips (B, F, H, W, 3) -> F frames, each a square grid of every clip at that time: one video of all."""
    return [image_grid(np.ascontiguousarray(clips[:, index]), scale=scale) for index in range(clips.shape[1])]


VIDEO_FORMATS = ("mp4", "gif")


MP4_CRF = 18  # x264's constant rate factor: 18 is visually lossless (0 is lossless, 23 its default)


def write_video(frames: Sequence[Image.Image], path: Path, fps: int) -> Path:
    """Frames as an mp4 (H.264 in yuv420p, which every browser and wandb play, through imageio's ffmpeg, as diffusers'
    `export_to_video`) or a gif (diffusers' `export_to_gif`), by `path`'s suffix.

    The mp4 is written at x264's CRF 18 rather than through `export_to_video`'s `quality`, which maps to a bit rate
    that leaves small frames blotched (measured on a 32 px moving-shapes clip: 10/255 mean error at its best quality,
    1/255 at CRF 18). Sides are kept as they are (`macro_block_size=1`: 16 would resize a 24 px frame)."""
    if path.suffix == ".gif":
        from diffusers.utils import export_to_gif

        export_to_gif(list(frames), str(path), fps=fps)
    elif path.suffix == ".mp4":
        import imageio

        options = {"codec": "libx264", "quality": None, "pixelformat": "yuv420p", "macro_block_size": 1}
        with imageio.get_writer(path, fps=fps, ffmpeg_params=["-crf", str(MP4_CRF)], **options) as writer:
            for frame in frames:
                writer.append_data(np.asarray(frame.convert("RGB")))
    else:
        raise ValueError(f"{path}: a video is written as one of {VIDEO_FORMATS}")
    return path
