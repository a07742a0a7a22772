"""The body of `python sample.py`: images + metadata.jsonl + grid.png from a checkpoint, or a diffusers export; a video
model's clips as mp4 (or gif) files, with a grid.png of their frames (a clip per row).

The output folder follows the Hugging Face imagefolder / videofolder convention (`file_name` in metadata.jsonl), so it
can be trained on (`data=image_folder`).
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from PIL import Image
from tqdm.auto import tqdm

from lightdiff.config import ConfigError, build, check_config
from lightdiff.data import ImageDataModule, MovingShapesDataset, ShapesDataset
from lightdiff.drawing import Drawing, apply_speed, device_named, load_for_sampling, scheduler_for
from lightdiff.export import export_comfyui_lora, export_kohya_lora, export_pipeline, export_single_file
from lightdiff.files import folder_written_atomically
from lightdiff.metrics import FrechetEvaluator, ShapesFeatures, shapes_metric
from lightdiff.metrics.diversity import grouped_image_variety
from lightdiff.metrics.motion import motion_metric, video_distance, video_judge
from lightdiff.sampling import (
    frames_grid,
    image_grid,
    seed_problem,
    to_uint8,
    write_video,
)
from lightdiff.speed import SamplingSpeed
from lightdiff.trained import TrainedDenoiser

log = logging.getLogger(__name__)


# What sample.py writes into `out`: a folder holding anything else is never replaced, even with overwrite=true.
SAMPLE_FILES = re.compile(r"\d{6}\.(png|mp4|gif)|metadata\.jsonl|grid\.png|metrics\.json")
# What marks a folder as an export (a diffusers pipeline or model folder, or lightdiff's parts layout).
EXPORT_MARKERS = ("model_index.json", "config.json", "lightdiff.json")


def _check_values(cfg: DictConfig) -> None:
    """Every value sample.py uses itself, checked before any file is opened."""
    for key in ("num_images", "batch_size", "steps"):
        value = cfg[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{key}={value!r} must be at least 1")
    if problem := seed_problem(cfg.seed, cfg.num_images):
        raise ConfigError(problem)
    for key, least in (("eta", 0.0), ("guidance_scale", None), ("lora_scale", None)):
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{key}={value!r} must be a finite number")
        if least is not None and value < least:
            raise ConfigError(f"{key}={value!r} must be >= {least}")
    for key in ("height", "width"):
        value = cfg[key]
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"{key}={value!r} must be a positive number of pixels (or null: the model's size)")
    for key, least in (("original_size", 1), ("crop_top_left", 0)):
        value = cfg[key]
        if value is None and key == "original_size":
            continue
        numbers = list(value) if isinstance(value, (list, ListConfig)) else []
        if len(numbers) != 2 or any(not isinstance(n, int) or isinstance(n, bool) or n < least for n in numbers):
            raise ConfigError(f"{key}={value!r} must be two whole numbers (height, width / top, left) >= {least}")


# a pipeline folder (+ diffusers LoRA file) | one original-layout Stable Diffusion file | a kohya-layout LoRA file |
# a ComfyUI-layout LoRA file (Wan; a pair of experts: one per expert)
EXPORT_FORMATS = ("diffusers", "single_file", "kohya", "comfyui")


def _check_output_folder(cfg: DictConfig) -> Path:
    """The folder to write (`export` if given, else `out`): a new or empty folder, or with overwrite=true one that
    holds an earlier output of the same kind only, since it is replaced whole (`folder_written_atomically`); for
    export_format=kohya, the .safetensors file to write (new, or replaced with overwrite=true)."""
    if cfg.export_format not in EXPORT_FORMATS:
        raise ConfigError(f"export_format={cfg.export_format!r} is not one of {EXPORT_FORMATS}")
    if cfg.export_format != "diffusers":
        if not cfg.export:
            raise ConfigError(f"export_format={cfg.export_format}: give the file to write, export=FILE.safetensors")
        target = Path(cfg.export).expanduser().absolute()
        if target.suffix != ".safetensors" or target.is_dir():
            raise ConfigError(f"export={cfg.export!r}: export_format={cfg.export_format} writes a .safetensors file")
        if target.exists() and not cfg.overwrite:
            raise ConfigError(f"export={cfg.export!r} exists; choose a new file or pass overwrite=true")
        return target
    key = "export" if cfg.export else "out"
    target = Path(cfg[key]).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise ConfigError(f"{key}={cfg[key]!r} is a file, not a folder")
    entries = sorted(target.iterdir()) if target.is_dir() else []
    if not entries:
        return target
    if not cfg.overwrite:
        raise ConfigError(f"{key}={cfg[key]!r} is not empty; choose a new folder or pass overwrite=true")
    if key == "export":
        foreign = [] if any((target / name).is_file() for name in EXPORT_MARKERS) else entries
    else:
        foreign = [entry for entry in entries if not (entry.is_file() and SAMPLE_FILES.fullmatch(entry.name))]
    if foreign:
        shown = ", ".join(entry.name for entry in foreign[:5])
        raise ConfigError(
            f"{key}={cfg[key]!r} holds what sample.py did not write ({shown}); overwrite=true replaces the whole "
            "folder, so it only replaces an earlier "
            + (
                "export (a folder with model_index.json, config.json or lightdiff.json)"
                if key == "export"
                else "samples folder (NNNNNN.png, metadata.jsonl, grid.png, metrics.json)"
            )
        )
    return target


def run(cfg: DictConfig) -> Path:
    check_config(cfg)
    _check_values(cfg)
    if cfg.get("demo") and cfg.demo.get("enabled"):  # the live page (lightdiff/demo.py), imported only when asked for
        from lightdiff.demo import serve

        serve(cfg)
        return Path(cfg.ckpt)
    target = _check_output_folder(cfg)
    trained = load_for_sampling(cfg)
    if not isinstance(trained, TrainedDenoiser):
        if not cfg.export or cfg.export_format != "diffusers":
            raise ConfigError(
                f"ckpt={cfg.ckpt!r} is an autoencoder: export it as a diffusers folder (export=DIR, "
                "export_format=diffusers) to use it as model.vae"
            )
        with folder_written_atomically(target) as staging:
            trained.save_pretrained(staging, safe_serialization=True)
        log.info("exported the autoencoder of %s to %s (diffusers %s)", cfg.ckpt, target, type(trained).__name__)
        return target
    denoiser = trained
    if cfg.export_format == "kohya":
        export_kohya_lora(denoiser, target)
        return target
    if cfg.export_format == "comfyui":
        export_comfyui_lora(denoiser, target, bool(cfg.overwrite))
        return target
    if cfg.export_format == "single_file":
        export_single_file(denoiser, target)
        return target
    if cfg.export:
        scheduler, _ = scheduler_for(cfg, denoiser)
        with folder_written_atomically(target) as staging:
            export_pipeline(denoiser, scheduler, staging, fuse_lora=cfg.export_fused)
        log.info("exported %s to %s (layouts: lightdiff/export.py)", denoiser.source, target)
        return target

    reference = reference_data(cfg) if cfg.get("metrics") else None  # before sampling: a bad choice fails at once
    speed: SamplingSpeed = build(cfg.speed)
    drawing = Drawing(cfg, denoiser, device_named(cfg.device), cfg.num_images)
    apply_speed(speed, drawing, cfg.num_images)
    frames, prompts, labels = drawing.frames, drawing.prompts, drawing.labels
    all_pixels = []
    unit = "image" if frames is None else "clip"
    started = time.perf_counter()
    with folder_written_atomically(target) as out:  # replaces `target` once every file below is written
        with (
            (out / "metadata.jsonl").open("w") as metadata,
            tqdm(total=cfg.num_images, unit=unit, desc="sampling", disable=None) as progress,
        ):
            for start in range(0, cfg.num_images, cfg.batch_size):
                count = min(cfg.batch_size, cfg.num_images - start)
                pixels = to_uint8(drawing.draw(start, count))
                all_pixels.append(pixels)
                for offset, image in enumerate(pixels):
                    index = start + offset
                    if frames is None:
                        file_name = f"{index:06d}.png"
                        Image.fromarray(image).save(out / file_name)
                    else:  # a clip (F, H, W, 3)
                        file_name = f"{index:06d}.{cfg.video_format}"
                        write_video([Image.fromarray(frame) for frame in image], out / file_name, cfg.fps)
                    metadata.write(json.dumps(drawing.record(index, file_name)) + "\n")
                progress.update(count)
        seconds = time.perf_counter() - started
        grid = image_grid if frames is None else frames_grid  # clips: one per row, a frame per column
        grid(np.concatenate(all_pixels)).save(out / "grid.png")
    log.info(
        "sampled %d %ss in %.1f s: %.2f %ss/s, %.3f s per batch of %d (%d steps, file writing included)",
        cfg.num_images,
        unit,
        seconds,
        cfg.num_images / seconds,
        unit,
        seconds / -(-cfg.num_images // cfg.batch_size),
        min(cfg.batch_size, cfg.num_images),
        cfg.steps,
    )
    log.info("wrote %d %ss, metadata.jsonl and grid.png to %s", cfg.num_images, unit, target)
    if reference is not None:  # after the samples are in place: a failing metric never costs them
        judge = judge_samples if frames is None else judge_clips
        metrics = judge(cfg, reference, np.concatenate(all_pixels), prompts, labels, device=drawing.device)
        (target / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        log.info("metrics of %d images: %s (written to %s)", cfg.num_images, metrics, target / "metrics.json")
    return target


# Data modules a run's config.yaml may name: a `_target_` read from a file is code to run, so only these are built.
_DATA_MODULES = {
    "lightdiff.data.ShapesDataModule",
    "lightdiff.data.MovingShapesDataModule",
    "lightdiff.data.VideoFolderDataModule",
    "lightdiff.data.ImageFolderDataModule",
    "lightdiff.data.HFDataModule",
    "lightdiff.data.ShardsDataModule",
}


def reference_data(cfg: DictConfig) -> ImageDataModule:
    """`data=...` if given, else the data of the run whose checkpoint this is (outputs/<run>/config.yaml)."""
    if cfg.get("data"):
        return build(cfg.data)
    run_config = Path(cfg.ckpt).expanduser().resolve().parent.parent / "config.yaml"
    if not run_config.is_file():
        raise ConfigError(
            f"metrics=fid needs reference images: give data=... (no run config at {run_config} beside ckpt)"
        )
    data = OmegaConf.load(run_config).get("data")
    if not isinstance(data, DictConfig) or data.get("_target_") not in _DATA_MODULES:
        target = data.get("_target_") if isinstance(data, DictConfig) else None
        raise ConfigError(
            f"{run_config} names no lightdiff data module (data._target_={target!r}, allowed: "
            f"{sorted(_DATA_MODULES)}); give data=..."
        )
    # Hydra instantiates nested `_target_`s too, and a resolver (oc.create, oc.decode) can make one out of a
    # string: the file is written resolved by train.py, so it may hold neither.
    arguments = {k: v for k, v in OmegaConf.to_container(data, resolve=False).items() if k != "_target_"}
    _refuse_code(arguments, "data", run_config)
    log.info("reference data for metrics: %s of %s", data._target_, run_config)
    return build(data)


def _refuse_code(node: object, key: str, source: Path) -> None:
    """Raise ConfigError naming the key of any `_target_` or `${...}` interpolation in `node` (at `key`)."""
    if isinstance(node, dict):
        for name, value in node.items():
            child = f"{key}.{name}"
            if name == "_target_":
                raise ConfigError(f"{source}: {child}={value!r}: a run config's data may name no nested _target_")
            _refuse_code(value, child, source)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            _refuse_code(value, f"{key}[{index}]", source)
    elif isinstance(node, str) and "${" in node:
        raise ConfigError(f"{source}: {key}={node!r}: a run config is written resolved; it may hold no interpolation")


def judge_samples(
    cfg: DictConfig,
    datamodule: ImageDataModule,
    pixels: np.ndarray,
    prompts: list[str] | None,
    labels: torch.Tensor | None,
    device: torch.device,
) -> dict[str, object]:
    """FID / KID of uint8 images (N, H, W, 3) against `datamodule`'s images, plus on shapes data the shapes metric and
    the variety a collapsed model loses (`image_variety`)."""
    features = build(cfg.metrics.features)
    evaluator = FrechetEvaluator(
        features,
        num_samples=cfg.metrics.num_samples,
        batch_size=cfg.metrics.batch_size,
        kid_subset_size=min(cfg.metrics.kid_subset_size, len(pixels)),
        cache_dir=cfg.metrics.cache_dir,
        seed=cfg.metrics.seed,
    ).to(device)
    evaluator.set_reference(datamodule.source_dataset, datamodule.reference_identity)
    for batch in np.array_split(pixels, max(1, len(pixels) // cfg.metrics.batch_size)):
        evaluator.update(torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255)
    result: dict[str, object] = {
        **evaluator.compute(),
        "num_images": len(pixels),
        "reference_samples": cfg.metrics.num_samples,
        "reference_data": datamodule.identity,
        "features": cfg.metrics.features._target_,
    }
    if isinstance(datamodule.source_dataset, ShapesDataset):
        result["shapes"] = shapes_metric(pixels, labels.tolist() if labels is not None else None, prompts)
        groups = prompts if prompts is not None else (labels.tolist() if labels is not None else None)
        result["variety"] = image_variety(datamodule.source_dataset, pixels, groups, cfg.metrics.num_samples)
    return result


def image_variety(
    dataset: ShapesDataset, pixels: np.ndarray, groups: list[object] | None, num_samples: int
) -> dict[str, float]:
    """Precision and recall (Kynkaanniemi et al. 2019, k = 3) of uint8 shapes images (N, H, W, 3) on `ShapesFeatures`
    against as many of the data's images (at most `num_samples`), and, where a caption or class is drawn twice, the
    spread within one as a ratio to the data's ("diversity"): what the shapes metric cannot see (a model that draws
    each prompt once, right, scores 100% there; `lightdiff.metrics.diversity.variety`)."""
    count = min(len(pixels), len(dataset), num_samples)
    items = [dataset[index] for index in range(count)]
    real = torch.stack([item["pixel_values"] for item in items]).float().div(2).add(0.5).clamp(0, 1)
    return grouped_image_variety(ShapesFeatures(), real, [item["label"] for item in items], pixels, groups)


def judge_clips(
    cfg: DictConfig,
    datamodule: ImageDataModule,
    clips: np.ndarray,
    prompts: list[str] | None,
    labels: torch.Tensor | None,
    device: torch.device,
) -> dict[str, object]:
    """The FVD substitute of uint8 clips (N, F, H, W, 3) against `datamodule`'s first `metrics.num_samples` clips
    (`lightdiff.metrics.motion.video_distance`), plus the video judge on moving-shapes data."""
    dataset = datamodule.source_dataset
    count = min(cfg.metrics.num_samples, len(dataset))
    reference = torch.stack([dataset[index]["pixel_values"] for index in range(count)]).float() / 2 + 0.5
    generated = torch.from_numpy(clips).permute(0, 1, 4, 2, 3).float() / 255
    if reference.shape[1:] != generated.shape[1:]:
        raise ConfigError(
            f"the reference clips are {tuple(reference.shape[1:])} (frames, channels, height, width), the samples "
            f"{tuple(generated.shape[1:])}: sample at the data's size and num_frames"
        )
    result: dict[str, object] = {
        "fvd_random": video_distance(reference.to(device), generated.to(device)),
        "num_clips": len(clips),
        "reference_samples": count,
        "reference_data": datamodule.identity,
    }
    if isinstance(dataset, MovingShapesDataset) and prompts is not None:
        # the motion metric and the variety it cannot see (recall, spread within a caption): `VIDEO_BAR`
        reference_prompts = [dataset[index]["text"] for index in range(count)]
        result["motion"] = video_judge(to_uint8(reference), reference_prompts, clips, prompts, ShapesFeatures())
    elif isinstance(dataset, MovingShapesDataset):
        result["motion"] = motion_metric(clips, prompts)
    return result
