"""Drawing with a loaded model: what `sample.py` and the demo page share, so the page's pixels are sample.py's.

`load_for_sampling` reads `ckpt` (with `lora` applied), `scheduler_for` makes the sampler it asks for, and a
`Drawing` turns one set of settings (prompt or label, seed, steps, guidance, size, frames) into images
seed .. seed + count - 1 and their metadata.jsonl records; `apply_speed` switches the speed path on and checks it.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from lightdiff.config import ConfigError
from lightdiff.nets.families import SIZE_AND_CROP, family_of, size_and_crop
from lightdiff.nets.families.base import EmbedsGuidance, ReadsLabels, TextEncoders
from lightdiff.nets.lora import has_adapters, load_lora_file, set_adapter_scale
from lightdiff.nets.summary import components, summary_table
from lightdiff.nets.vae import frame_count_problem, vae_scale_factor
from lightdiff.sampling import VIDEO_FORMATS, check_eta, for_latents, generate, reconfigured
from lightdiff.speed import SamplingSpeed, fast_path_difference
from lightdiff.trained import REQUIRED_SAMPLERS, TrainedDenoiser, load_trained

log = logging.getLogger(__name__)


class FastPathMismatch(RuntimeError):
    """The sampling speed path moved the images further from the plain fp32 path than its tolerance allows."""


def device_named(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _labels(cfg: DictConfig, num_classes: int | None, count: int) -> torch.Tensor | None:
    if num_classes is None:
        if cfg.label is not None:
            raise ConfigError(f"label={cfg.label} given, but the model takes no class labels")
        return None
    if cfg.label is None:
        return torch.arange(count) % num_classes
    if not 0 <= int(cfg.label) < num_classes:
        raise ConfigError(f"label={cfg.label} is outside the model's classes 0..{num_classes - 1}")
    return torch.full((count,), int(cfg.label))


def _prompts(cfg: DictConfig, denoiser: TrainedDenoiser, count: int) -> list[str] | None:
    """Image i's prompt: `prompt`, or line i % n of `prompts_file`, or (shapes models) class caption i % 24."""
    if "text" not in denoiser.conditioning.reads:
        if cfg.prompt is not None or cfg.prompts_file is not None:
            raise ConfigError("prompt / prompts_file given, but the model is not text-conditioned")
        return None
    if cfg.prompt is not None and cfg.prompts_file is not None:
        raise ConfigError("give prompt or prompts_file, not both")
    if cfg.prompt is not None:
        prompts = [str(cfg.prompt)]
    elif cfg.prompts_file is not None:
        path = Path(cfg.prompts_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"prompts_file={cfg.prompts_file!r} is not a file")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ConfigError(f"prompts_file={cfg.prompts_file!r} holds no prompt")
    elif denoiser.class_names:
        prompts = list(denoiser.class_names)
    else:
        raise ConfigError("this model is text-conditioned: give prompt=... or prompts_file=...")
    return [prompts[index % len(prompts)] for index in range(count)]


def _image_size(cfg: DictConfig, denoiser: TrainedDenoiser) -> tuple[int, int]:
    """(height, width) in pixels: `height` / `width`, each defaulting to the model's own size."""
    factor = vae_scale_factor(denoiser.vae) if denoiser.vae is not None else 1
    default_height, default_width = denoiser.default_size()
    height, width = cfg.height or default_height, cfg.width or default_width
    if height % factor or width % factor:
        raise ConfigError(f"height={height} / width={width} must be multiples of the VAE's down-sampling {factor}")
    return height, width


def _picture(value: str, key: str, size: tuple[int, int]) -> torch.Tensor:
    """The image file `key=value`, resized to `size` (height, width), in [-1, 1] (1, 3, H, W)."""
    try:
        with Image.open(Path(value).expanduser()) as opened:
            picture = opened.convert("RGB").resize((size[1], size[0]), Image.Resampling.BICUBIC)
    except (OSError, ValueError) as error:
        raise ConfigError(f"{key}={value!r} cannot be read as an image: {error}") from error
    pixels = torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1).float() / 127.5 - 1
    return pixels[None]


def _first_frame(cfg: DictConfig, denoiser: TrainedDenoiser, size: tuple[int, int]) -> torch.Tensor | None:
    """The frame an image-to-video model animates (`image=FILE`), resized to `size`, in [-1, 1] (1, 3, H, W)."""
    if "image" not in denoiser.conditioning.reads:
        if cfg.image is not None:
            raise ConfigError(f"image={cfg.image!r} given, but {type(denoiser.net).__name__} is not image-conditioned")
        return None
    if cfg.image is None:
        raise ConfigError("this model animates an image (image-to-video): give image=FILE (its first frame)")
    return _picture(cfg.image, "image", size)


def _source(cfg: DictConfig, denoiser: TrainedDenoiser, size: tuple[int, int]) -> torch.Tensor | None:
    """The image an editing model edits (`source=FILE`), resized to `size`, in [-1, 1] (1, 3, H, W)."""
    if "source_pixel_values" not in denoiser.conditioning.reads:
        if cfg.source is not None:
            raise ConfigError(f"source={cfg.source!r} given, but {type(denoiser.net).__name__} is not an editing model")
        return None
    if cfg.source is None:
        raise ConfigError("this model edits an image (model.edit=true): give source=FILE and the instruction as prompt")
    return _picture(cfg.source, "source", size)


def _num_frames(cfg: DictConfig, denoiser: TrainedDenoiser) -> int | None:
    """Frames per clip of a video model: `num_frames`, defaulting to what it trained on; None for an image model."""
    if not family_of(denoiser.net).video:
        if cfg.num_frames is not None:
            raise ConfigError(f"num_frames={cfg.num_frames}: {type(denoiser.net).__name__} draws images, not clips")
        return None
    frames = cfg.num_frames or denoiser.num_frames or family_of(denoiser.net).default_num_frames(denoiser.net)
    if not isinstance(frames, int) or isinstance(frames, bool):
        raise ConfigError(f"num_frames={frames!r} must be a whole number of frames")
    problem = frame_count_problem(denoiser.vae, frames)
    if problem is not None:
        raise ConfigError(f"num_frames={frames}: {problem}")
    if cfg.video_format not in VIDEO_FORMATS:
        raise ConfigError(f"video_format={cfg.video_format!r} is not one of {VIDEO_FORMATS}")
    if not isinstance(cfg.fps, int) or cfg.fps < 1:
        raise ConfigError(f"fps={cfg.fps!r} must be a positive whole number")
    return frames


def _apply_lora(cfg: DictConfig, denoiser: TrainedDenoiser) -> None:
    """`lora=FILE` adds a diffusers-format LoRA file's adapters to the model; `lora_scale` scales whichever adapters
    it has (the file's or its checkpoint's). Everything is checked before any file is written."""
    if cfg.lora:
        if has_adapters(denoiser.net):
            raise ConfigError(
                f"lora={cfg.lora!r}: ckpt={cfg.ckpt!r} already has LoRA adapters; apply one set at a time"
            )
        conditioning = denoiser.conditioning
        encoders = conditioning.text_encoders() if isinstance(conditioning, TextEncoders) else {}
        load_lora_file(denoiser.net, cfg.lora, encoders.get("text_encoder"))
        log.info("applied the LoRA adapters of %s (scale %g)", cfg.lora, cfg.lora_scale)
    adapted = has_adapters(denoiser.net)
    if not adapted and (cfg.lora_scale != 1.0 or cfg.export_fused):
        key = "export_fused=true" if cfg.export_fused else f"lora_scale={cfg.lora_scale}"
        raise ConfigError(f"{key}: ckpt={cfg.ckpt!r} has no LoRA adapters (give lora=FILE)")
    if cfg.export_format == "kohya" and (cfg.export_fused or cfg.lora_scale != 1.0):
        raise ConfigError(
            "export_format=kohya writes the adapters as trained (a loader takes the scale): drop export_fused / "
            "lora_scale, or export a fused pipeline folder (export_format=diffusers export_fused=true)"
        )
    if cfg.export and adapted and cfg.lora_scale != 1.0 and not cfg.export_fused and cfg.export_format == "diffusers":
        raise ConfigError(
            f"lora_scale={cfg.lora_scale} with export: the LoRA file holds the adapters as trained and diffusers "
            "takes the scale when it loads them (pipe.set_adapters); pass export_fused=true to bake the scale in"
        )
    if adapted:
        set_adapter_scale(denoiser.net, cfg.lora_scale)
        set_adapter_scale(denoiser.conditioning, cfg.lora_scale)  # a text encoder's adapters, if it has any


def load_for_sampling(cfg: DictConfig) -> TrainedDenoiser | torch.nn.Module:
    """`ckpt` (a lightdiff checkpoint or a pipeline folder) with `lora` applied at `lora_scale`; an autoencoder-stage
    checkpoint comes back as its autoencoder."""
    trained = load_trained(cfg.ckpt, use_ema=cfg.use_ema)  # the file is read once, whatever it holds
    if not isinstance(trained, TrainedDenoiser):  # an autoencoder-stage checkpoint
        if cfg.lora or cfg.lora_scale != 1.0 or cfg.export_fused:
            raise ConfigError(
                f"lora / lora_scale / export_fused: ckpt={cfg.ckpt!r} is an autoencoder, which takes no adapters"
            )
        return trained
    _apply_lora(cfg, trained)
    parts = {"net": trained.net, "vae": trained.vae, "conditioning": trained.conditioning}
    networks = torch.nn.ModuleDict({name: part for name, part in parts.items() if part is not None})
    log.info("the networks of %s:\n%s", cfg.ckpt, summary_table(components(networks)))
    return trained


def scheduler_for(cfg: DictConfig, denoiser: TrainedDenoiser) -> tuple[object, DictConfig]:
    """(the scheduler `cfg.sampler` makes for this model, the sampler config it was made from)."""
    # sampler=auto (the default) holds one sampler per objective (conf/sampler/auto.yaml): take the model's, with
    # what its objective needs of it (a zero-terminal-SNR model: trailing timesteps)
    sampler_cfg = cfg.sampler
    if "_target_" not in cfg.sampler:
        sampler_cfg = OmegaConf.merge(
            cfg.sampler[denoiser.objective.name], denoiser.objective.default_sampler_overrides
        )
    # A sampler of the other kind (DDPM vs flow matching) than the model is a ConfigError.
    # A model that fits one sampler only (a latent consistency model: LCMScheduler) takes it whatever `sampler` says.
    factory = REQUIRED_SAMPLERS[denoiser.required_sampler] if denoiser.required_sampler else instantiate(sampler_cfg)
    scheduler = denoiser.objective.scheduler(factory)
    if denoiser.vae is not None:
        scheduler = for_latents(scheduler)
    scheduler = reconfigured(scheduler, denoiser.scheduler_overrides or {})  # e.g. a turbo student's timesteps
    return scheduler, sampler_cfg


class Drawing:
    """What sample.py draws with a loaded model for one set of settings (`cfg`: prompt, seed, steps, guidance, sampler,
    size, ...): images start .. start + count - 1, each from seed + its index, and each one's metadata.jsonl record.
    The demo page (lightdiff.demo) draws through it too, so its pixels are sample.py's."""

    def __init__(self, cfg: DictConfig, denoiser: TrainedDenoiser, device: torch.device, count: int) -> None:
        self.cfg, self.denoiser, self.device = cfg, denoiser, device
        self.scheduler, sampler_cfg = scheduler_for(cfg, denoiser)
        check_eta(self.scheduler, cfg.eta)  # before any image is drawn
        self.net = denoiser.net.to(device)
        self.conditioning = denoiser.conditioning.to(device)
        self.prompts = _prompts(cfg, denoiser, count)
        self.size = _image_size(cfg, denoiser)
        self.frames = _num_frames(cfg, denoiser)
        self.first_frame = _first_frame(cfg, denoiser, self.size)
        self.source = _source(cfg, denoiser, self.size)
        # SDXL: the size and crop ids as StableDiffusionXLPipeline takes them
        self.sized = SIZE_AND_CROP in self.conditioning.reads
        if not self.sized and (cfg.original_size is not None or list(cfg.crop_top_left) != [0, 0]):
            raise ConfigError(
                "original_size / crop_top_left given, but the model takes no size conditioning (SDXL does)"
            )
        # A conditioning that reads labels has a class count (ClassLabels.num_classes); others take none.
        reads_labels = "label" in self.conditioning.reads and isinstance(self.conditioning, ReadsLabels)
        classes = self.conditioning.num_classes if reads_labels else None
        self.labels = _labels(cfg, classes, count)
        # guidance is for text models and image-to-video ones (the conditioning frame against none)
        guided = self.prompts is not None or self.first_frame is not None
        self.guidance_scale = cfg.guidance_scale if guided else 1.0
        # a network that takes the scale as its input (a consistency model, a guidance-embedding FLUX): one call a step
        embeds = isinstance(self.conditioning, EmbedsGuidance)
        self.embedded_guidance = embeds and self.conditioning.guidance_scale is not None
        if denoiser.vae is not None:
            denoiser.vae.to(device)
        # what ran, as the scheduler was built: the class the objective picked (an SNR-shifted schedule's CogVideoX
        # DDIM), and the configured keys' values after the model's changes (a latent model's unclipped x0)
        self.sampler_settings: dict[str, object] = {
            "sampler": type(self.scheduler).__name__,
            "steps": cfg.steps,
            "eta": cfg.eta,
            **{
                key: self.scheduler.config.get(key, value)
                for key, value in OmegaConf.to_container(sampler_cfg).items()
                if not key.startswith("_")
            },
        }

    @torch.inference_mode()  # no autograd bookkeeping at all (no_grad still keeps version counters): a few % on CPU
    def draw(self, start: int, count: int) -> torch.Tensor:
        """Images start .. start + count - 1 in [0, 1], each from its own seed, with the net as it is now."""
        cfg = self.cfg
        guidance_scale = self.guidance_scale
        if self.embedded_guidance:  # set at each draw: another Drawing of the same model may have set it otherwise
            self.conditioning.guidance_scale, guidance_scale = guidance_scale, 1.0
        seeds = list(range(cfg.seed + start, cfg.seed + start + count))
        inputs = {
            "label": self.labels[start : start + count] if self.labels is not None else None,
            "text": self.prompts[start : start + count] if self.prompts is not None else None,
        }
        if self.first_frame is not None:
            inputs["image"] = self.first_frame.expand(count, -1, -1, -1).to(self.device)
        if self.source is not None:
            inputs["source_pixel_values"] = self.source.expand(count, -1, -1, -1).to(self.device)
        if self.sized:
            original = list(cfg.original_size) if cfg.original_size is not None else None
            inputs[SIZE_AND_CROP] = size_and_crop(*self.size, count, original, list(cfg.crop_top_left))
        return generate(
            self.net,
            self.scheduler,
            cfg.steps,
            seeds,
            self.conditioning,
            inputs,
            guidance_scale,
            cfg.negative_prompt,
            cfg.eta,
            self.denoiser.vae,
            self.size,
            self.frames,
        )

    def record(self, index: int, file_name: str) -> dict[str, object]:
        """Image `index`'s line of metadata.jsonl: how to draw it again."""
        cfg, denoiser = self.cfg, self.denoiser
        record: dict[str, object] = {"file_name": file_name, "seed": cfg.seed + index, **self.sampler_settings}
        if self.frames is not None:
            record["num_frames"], record["fps"] = self.frames, cfg.fps
        if self.first_frame is not None:  # the guidance rises over the frames to guidance_scale (SVD)
            record["image"], record["guidance_scale"] = str(cfg.image), cfg.guidance_scale
        if self.source is not None:
            record["source"] = str(cfg.source)
        if cfg.lora or has_adapters(self.net):
            record["lora"] = cfg.lora or denoiser.source
            record["lora_scale"] = cfg.lora_scale
        record["height"], record["width"] = self.size
        if self.sized:
            record["original_size"] = list(cfg.original_size or self.size)
            record["crop_top_left"] = list(cfg.crop_top_left)
        if self.prompts is not None:
            record["text"] = self.prompts[index]
            record["guidance_scale"] = cfg.guidance_scale
            record["negative_prompt"] = cfg.negative_prompt
        if self.labels is not None:
            label = int(self.labels[index])
            record["label"] = label
            if denoiser.class_names:
                record["text"] = denoiser.class_names[label]
        return record


def apply_speed(speed: SamplingSpeed, drawing: Drawing, count: int) -> None:
    """Turn the speed path's switches on for the drawing's model; with `speed.check`, its first images (of `count`)
    are drawn the plain way (fp32, eager) first and FastPathMismatch stops sampling if the switches moved them too
    far."""
    if speed.is_plain:
        return
    check_count = min(speed.check_images, count)
    plain_images = drawing.draw(0, check_count) if speed.check else None  # before the switches: fp32, eager
    speed.apply(drawing.net)
    drawing.conditioning.to(dtype=drawing.net.dtype)  # the whole pipeline in one dtype, as diffusers' pipelines are
    if drawing.denoiser.vae is not None:
        drawing.denoiser.vae.to(dtype=drawing.net.dtype)
    drawing.sampler_settings["speed"] = dataclasses.asdict(speed)
    if plain_images is None:
        return
    difference = fast_path_difference(plain_images, drawing.draw(0, check_count))
    if difference > speed.allowed_difference:
        raise FastPathMismatch(
            f"the speed path ({speed}) moves the first {check_count} images by up to {difference:.4f} "
            f"(mean |difference| in [0, 1]) from the plain fp32 path, more than speed.tolerance="
            f"{speed.allowed_difference}; turn the switch that causes it off, or raise speed.tolerance"
        )
    log.info(
        "speed path checked on %d images: mean |difference| from fp32 eager <= %.2e (tolerance %.0e)",
        check_count,
        difference,
        speed.allowed_difference,
    )
