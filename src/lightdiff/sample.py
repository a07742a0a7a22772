"""The body of `python sample.py`: images + metadata.jsonl + grid.png from a checkpoint, or a diffusers export.

The output folder follows the Hugging Face imagefolder convention, so it can be trained on (`data=image_folder`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from lightdiff.config import ConfigError, check_config
from lightdiff.export import checkpoint_method, export_pipeline, load_autoencoder, load_denoiser
from lightdiff.sampling import generate, generators_for, image_grid, make_scheduler, to_uint8

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


def run(cfg: DictConfig) -> Path:
    check_config(cfg)
    if cfg.num_images < 1 or cfg.batch_size < 1:
        raise ConfigError(f"num_images={cfg.num_images} and batch_size={cfg.batch_size} must be positive")
    target = Path(cfg.export or cfg.out).expanduser()
    if target.exists() and any(target.iterdir()) and not cfg.overwrite:
        key = "export" if cfg.export else "out"
        raise ConfigError(f"{key}={str(target)!r} is not empty; choose a new folder or pass overwrite=true")
    if checkpoint_method(cfg.ckpt) == "autoencoder":
        if not cfg.export:
            raise ConfigError(f"ckpt={cfg.ckpt!r} is an autoencoder: export it (export=DIR) to use it as model.vae")
        folder = Path(cfg.export).expanduser()
        load_autoencoder(cfg.ckpt).save_pretrained(folder, safe_serialization=True)
        log.info("exported the autoencoder of %s to %s (diffusers AutoencoderKL)", cfg.ckpt, folder)
        return folder
    denoiser = load_denoiser(cfg.ckpt, use_ema=cfg.use_ema)
    scheduler = make_scheduler(instantiate(cfg.sampler), denoiser.schedule, denoiser.prediction_type)
    if cfg.export:
        folder = export_pipeline(denoiser, scheduler, cfg.export)
        log.info("exported %s to %s (load with diffusers' DDPMPipeline.from_pretrained)", denoiser.source, folder)
        return folder

    net = denoiser.net.to(_device(cfg.device))
    labels = _labels(cfg, net.config.num_class_embeds, cfg.num_images)
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
            images = generate(net, scheduler, cfg.steps, generators_for(seeds), class_labels=batch_labels, eta=cfg.eta)
            pixels = to_uint8(images)
            all_pixels.append(pixels)
            for offset, (seed, image) in enumerate(zip(seeds, pixels)):
                file_name = f"{start + offset:06d}.png"
                Image.fromarray(image).save(out / file_name)
                record: dict[str, object] = {"file_name": file_name, "seed": seed, **sampler_settings}
                if batch_labels is not None:
                    label = int(batch_labels[offset])
                    record["label"] = label
                    if denoiser.class_names:
                        record["text"] = denoiser.class_names[label]
                metadata.write(json.dumps(record) + "\n")
            log.info("sampled %d / %d images", start + len(seeds), cfg.num_images)
    image_grid(np.concatenate(all_pixels)).save(out / "grid.png")
    log.info("wrote %d images, metadata.jsonl and grid.png to %s", cfg.num_images, out)
    return out
