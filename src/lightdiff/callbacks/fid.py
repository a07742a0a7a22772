"""FID and KID of a method's images against the training data, every `every_n_steps` steps and at the end.

The images are the method's preview (`pl_module.preview(seeds, sampler, steps).images`, in [0, 1]): samples for a
diffusion model, reconstructions for the autoencoder, whose numbers are logged as rFID / rKID (`val/rfid`). The
feature network is config (`metrics.features`): Inception for published-comparable FID, or any `nn.Module` that
maps [0, 1] images to features (lightdiff/metrics/features.py). Statistics are accumulated in float64
(torchmetrics).

Reference statistics (the first `num_images` training images) are computed once, by rank 0, and cached on disk
under a key made of the data set's identity (source, size, resolution, preprocessing), `num_images` and a hash of
the feature network; a later run, or another run on the same data, reuses them (logged as a cache hit).

Multi-GPU: rank r generates seeds r, r + W, r + 2W, ... of the `num_images` (no padding, so no image is counted
twice), and compute() sums the statistics of all ranks. Only rank 0 holds the reference statistics (the others
hold zeros), so the sum counts them once. Every rank must call `evaluate` at the same steps, which the step-based
schedule guarantees; the result equals the single-process one on the same images.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from lightdiff.callbacks.samples import method_previews
from lightdiff.checkpointing import save_atomically
from lightdiff.data.latent_cache import module_fingerprint
from lightdiff.metrics.features import check_unit_range
from lightdiff.sampling import SchedulerFactory

log = logging.getLogger(__name__)


class FrechetDistance(pl.Callback):
    """Logs `val/fid` and `val/kid` (`val/rfid`, `val/rkid` for methods whose images are reconstructions)."""

    def __init__(
        self,
        features: nn.Module,  # maps float images in [0, 1] (B, 3, H, W) to features (B, D)
        sampler: SchedulerFactory,  # the diffusers scheduler that generates (the `sampler` config group)
        every_n_steps: int = 5000,  # optimiser steps between evaluations; 0: only at the end of training
        num_images: int = 1000,  # generated images per evaluation, and real images in the reference set
        batch_size: int = 100,  # images generated at once
        steps: int = 50,  # denoising steps per image
        seed: int = 0,  # image i uses seed + i (the autoencoder reconstructs data set image seed + i)
        kid_subset_size: int = 1000,  # KID's subset size (at most num_images)
        cache_dir: str | None = "outputs/fid_cache",  # reference statistics kept here; None: never cached
    ) -> None:
        if every_n_steps < 0:
            raise ValueError(f"metrics.every_n_steps={every_n_steps} must be >= 0")
        if num_images < 2:
            raise ValueError(f"metrics.num_images={num_images}: a covariance needs at least 2 images")
        self.sampler = sampler
        self.every_n_steps = every_n_steps
        self.num_images = num_images
        self.batch_size = batch_size
        self.steps = steps
        self.seed = seed
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.features = features
        self.fid = FrechetInceptionDistance(feature=features, normalize=True, reset_real_features=False)
        self.kid = KernelInceptionDistance(
            feature=features, normalize=True, reset_real_features=False, subset_size=min(kid_subset_size, num_images)
        )
        self._real_done = False
        self._last_step = -1

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self._last_step:
            self._last_step = step
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step != self._last_step:
            self.evaluate(trainer, pl_module)

    def _reference_path(self, trainer: pl.Trainer) -> Path | None:
        datamodule = trainer.datamodule
        if self.cache_dir is None or not getattr(datamodule, "identity", ""):
            return None
        network = module_fingerprint({"class": type(self.features).__qualname__}, self.features)
        preprocessing = f"random_views={getattr(datamodule, 'random_views', None)}"
        key = f"{datamodule.identity}|{preprocessing}|num_images={self.num_images}|features={network}"
        return self.cache_dir / f"reference-{hashlib.sha256(key.encode()).hexdigest()[:20]}.pt"

    def _reference_statistics(self, trainer: pl.Trainer, device: torch.device) -> None:
        """Rank 0: load the reference statistics or compute and cache them; other ranks hold none (zeros)."""
        self._real_done = True
        dataset = trainer.datamodule.source_dataset
        if len(dataset) < self.num_images:  # checked on every rank, so none is left waiting for the others
            raise ValueError(f"metrics.num_images={self.num_images} exceeds the data set's {len(dataset)} images")
        if trainer.global_rank != 0:
            return
        path = self._reference_path(trainer)
        if path is not None and path.exists():
            stored = torch.load(path, map_location=device, weights_only=True)
            self.fid.real_features_sum = stored["features_sum"]
            self.fid.real_features_cov_sum = stored["features_cov_sum"]
            self.fid.real_features_num_samples = stored["num_samples"]
            self.kid.real_features = [stored["features"]]
            log.info("FID reference statistics: cache hit %s", path)
            return
        for start in range(0, self.num_images, self.batch_size):
            indices = range(start, min(start + self.batch_size, self.num_images))
            images = torch.stack([dataset[i]["pixel_values"] for i in indices]).to(device) / 2 + 0.5
            self._update(images.clamp(0, 1), real=True)
        if path is not None:
            stored = {
                "features_sum": self.fid.real_features_sum,
                "features_cov_sum": self.fid.real_features_cov_sum,
                "num_samples": self.fid.real_features_num_samples,
                "features": torch.cat(self.kid.real_features),
            }
            save_atomically({k: v.cpu() for k, v in stored.items()}, path)
            log.info("FID reference statistics: cache miss, %d images written to %s", self.num_images, path)

    def _update(self, images: torch.Tensor, real: bool) -> None:
        images = check_unit_range(images.float())
        self.fid.update(images, real=real)
        self.kid.update(images, real=real)

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Every rank generates its share; every rank gets the metrics; rank 0 logs them."""
        device = pl_module.device
        self.fid.to(device)
        self.kid.to(device)
        if not self._real_done:
            self._reference_statistics(trainer, device)
        seeds = list(range(self.seed, self.seed + self.num_images))[trainer.global_rank :: trainer.world_size]
        for preview in method_previews(trainer, pl_module, seeds, self.sampler, self.steps, self.batch_size):
            self._update(preview.images, real=False)
        prefix = getattr(pl_module, "distance_prefix", "")  # "r": the images are reconstructions
        for name in ("real_features", "fake_features"):  # torchmetrics gathers KID's feature lists element by
            parts = getattr(self.kid, name)  # element, so every rank must hold the same number: one tensor each
            empty = torch.empty(0, len(self.fid.real_features_sum), dtype=torch.float64, device=device)
            setattr(self.kid, name, [torch.cat(parts) if parts else empty])
        with torch.random.fork_rng(devices=[]):  # KID draws its subsets: the same each time, training's RNG untouched
            torch.manual_seed(self.seed)
            kid_mean, _ = self.kid.compute()  # synchronises the ranks' statistics when distributed
        metrics = {f"val/{prefix}fid": float(self.fid.compute()), f"val/{prefix}kid": float(kid_mean)}
        self.fid.reset()  # the generated images' statistics; the reference ones are kept
        self.kid.reset()
        if trainer.global_rank == 0:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
            log.info("step %d: %s over %d images", trainer.global_step, metrics, self.num_images)
        return metrics
