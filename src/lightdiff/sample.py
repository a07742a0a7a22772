"""The body of `python sample.py`: images + metadata.jsonl + grid.png from a checkpoint, or a diffusers export.

The output folder follows the Hugging Face imagefolder convention, so it can be trained on (`data=image_folder`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from lightdiff.config import ConfigError, build, check_config
from lightdiff.data import ImageDataModule, ShapesDataset
from lightdiff.export import TrainedDenoiser, export_pipeline, load_trained
from lightdiff.methods.latent import generate_latent
from lightdiff.metrics import FrechetEvaluator, shapes_metric
from lightdiff.sampling import (
    for_latents,
    generate,
    generators_for,
    image_grid,
    make_scheduler,
    reconfigured,
    to_uint8,
)

log = logging.getLogger(__name__)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _labels(cfg: DictConfig, num_classes: int | None, count: int) -> torch.Tensor | None:
    if num_classes is None:
        if cfg.label is not None:
            raise ConfigError(f"label={cfg.label} given, but the model is unconditional")
        return None
    if cfg.label is None:
        return torch.arange(count) % num_classes
    if not 0 <= int(cfg.label) < num_classes:
        raise ConfigError(f"label={cfg.label} is outside the model's classes 0..{num_classes - 1}")
    return torch.full((count,), int(cfg.label))


def _prompts(cfg: DictConfig, denoiser: TrainedDenoiser, count: int) -> list[str] | None:
    """Image i's prompt: `prompt`, or line i % n of `prompts_file`, or (shapes models) class caption i % 24."""
    if not denoiser.is_text_model:
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


def run(cfg: DictConfig) -> Path:
    check_config(cfg)
    if cfg.num_images < 1 or cfg.batch_size < 1:
        raise ConfigError(f"num_images={cfg.num_images} and batch_size={cfg.batch_size} must be positive")
    target = Path(cfg.export or cfg.out).expanduser()
    if target.exists() and any(target.iterdir()) and not cfg.overwrite:
        key = "export" if cfg.export else "out"
        raise ConfigError(f"{key}={str(target)!r} is not empty; choose a new folder or pass overwrite=true")
    trained = load_trained(cfg.ckpt, use_ema=cfg.use_ema)  # the file is read once, whatever it holds
    if isinstance(trained, AutoencoderKL):
        if not cfg.export:
            raise ConfigError(f"ckpt={cfg.ckpt!r} is an autoencoder: export it (export=DIR) to use it as model.vae")
        folder = Path(cfg.export).expanduser()
        trained.save_pretrained(folder, safe_serialization=True)
        log.info("exported the autoencoder of %s to %s (diffusers AutoencoderKL)", cfg.ckpt, folder)
        return folder
    denoiser = trained
    scheduler = make_scheduler(instantiate(cfg.sampler), denoiser.schedule, denoiser.prediction_type)
    if denoiser.is_text_model:
        scheduler = for_latents(scheduler)
    scheduler = reconfigured(scheduler, denoiser.scheduler_overrides or {})  # e.g. a turbo student's timesteps
    if cfg.export:
        folder = export_pipeline(denoiser, scheduler, cfg.export)
        log.info("exported %s to %s (load with diffusers' DDPMPipeline.from_pretrained)", denoiser.source, folder)
        return folder

    reference = reference_data(cfg) if cfg.get("metrics") else None  # before sampling: a bad choice fails at once
    device = _device(cfg.device)
    net = denoiser.net.to(device)
    prompts = _prompts(cfg, denoiser, cfg.num_images)
    labels = None if denoiser.is_text_model else _labels(cfg, net.config.num_class_embeds, cfg.num_images)
    if denoiser.is_text_model:
        denoiser.vae.to(device)
        denoiser.text_encoder.to(device)
    out = Path(cfg.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    sampler_settings = {
        "sampler": get_object(cfg.sampler._target_).__name__,
        "steps": cfg.steps,
        "eta": cfg.eta,
        **{k: v for k, v in OmegaConf.to_container(cfg.sampler).items() if not k.startswith("_")},
    }
    all_pixels = []
    with (out / "metadata.jsonl").open("w") as metadata:
        for start in range(0, cfg.num_images, cfg.batch_size):
            seeds = list(range(cfg.seed + start, cfg.seed + min(start + cfg.batch_size, cfg.num_images)))
            batch_labels = labels[start : start + len(seeds)] if labels is not None else None
            if prompts is not None:
                batch_prompts = prompts[start : start + len(seeds)]
                images = generate_latent(
                    net,
                    denoiser.vae,
                    denoiser.tokenizer,
                    denoiser.text_encoder,
                    scheduler,
                    batch_prompts,
                    seeds,
                    cfg.steps,
                    cfg.guidance_scale,
                    cfg.negative_prompt,
                    cfg.eta,
                )
            else:
                images = generate(
                    net, scheduler, cfg.steps, generators_for(seeds), class_labels=batch_labels, eta=cfg.eta
                )
            pixels = to_uint8(images)
            all_pixels.append(pixels)
            for offset, (seed, image) in enumerate(zip(seeds, pixels)):
                file_name = f"{start + offset:06d}.png"
                Image.fromarray(image).save(out / file_name)
                record: dict[str, object] = {"file_name": file_name, "seed": seed, **sampler_settings}
                if prompts is not None:
                    record["text"] = batch_prompts[offset]
                    record["guidance_scale"] = cfg.guidance_scale
                    record["negative_prompt"] = cfg.negative_prompt
                if batch_labels is not None:
                    label = int(batch_labels[offset])
                    record["label"] = label
                    if denoiser.class_names:
                        record["text"] = denoiser.class_names[label]
                metadata.write(json.dumps(record) + "\n")
            log.info("sampled %d / %d images", start + len(seeds), cfg.num_images)
    image_grid(np.concatenate(all_pixels)).save(out / "grid.png")
    log.info("wrote %d images, metadata.jsonl and grid.png to %s", cfg.num_images, out)
    if reference is not None:
        metrics = judge_samples(cfg, reference, np.concatenate(all_pixels), prompts, labels, device)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        log.info("metrics of %d images: %s (written to %s)", cfg.num_images, metrics, out / "metrics.json")
    return out


# Data modules a run's config.yaml may name: a `_target_` read from a file is code to run, so only these are built.
_DATA_MODULES = {
    "lightdiff.data.ShapesDataModule",
    "lightdiff.data.ImageFolderDataModule",
    "lightdiff.data.HFDataModule",
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
    """FID / KID of uint8 images (N, H, W, 3) against `datamodule`'s images, plus the shapes metric on shapes data."""
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
    return result
