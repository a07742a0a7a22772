"""FID and KID of a method's images against the training data, every `every_n_steps` steps and at the end.

The images are the method's preview (`pl_module.preview(seeds, sampler, steps).images`, in [0, 1]): samples for a
diffusion model, reconstructions for the autoencoder, whose numbers are logged as rFID / rKID (`val/rfid`). The
feature network is config (`metrics.features`): Inception for published-comparable FID, or any `nn.Module` that
maps [0, 1] images to features (lightdiff/metrics/features.py). Statistics are accumulated in float64
(torchmetrics). The real data's features are computed once per run (the first `num_images` training images).
Runs on rank 0 only, like the sample grids.
"""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from lightdiff.callbacks.samples import method_previews
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
        # sync_on_compute=False: only rank 0 evaluates, and a synchronising compute() would wait for the others.
        self.fid = FrechetInceptionDistance(
            feature=features, normalize=True, reset_real_features=False, sync_on_compute=False
        )
        self.kid = KernelInceptionDistance(
            feature=features,
            normalize=True,
            reset_real_features=False,
            subset_size=min(kid_subset_size, num_images),
            sync_on_compute=False,
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

    def _update_real(self, trainer: pl.Trainer, device: torch.device) -> None:
        dataset = trainer.datamodule.source_dataset
        if len(dataset) < self.num_images:
            raise ValueError(f"metrics.num_images={self.num_images} exceeds the data set's {len(dataset)} images")
        for start in range(0, self.num_images, self.batch_size):
            indices = range(start, min(start + self.batch_size, self.num_images))
            images = torch.stack([dataset[i]["pixel_values"] for i in indices]).to(device) / 2 + 0.5
            self._update(images.clamp(0, 1), real=True)
        self._real_done = True

    def _update(self, images: torch.Tensor, real: bool) -> None:
        images = check_unit_range(images.float())
        self.fid.update(images, real=real)
        self.kid.update(images, real=real)

    @rank_zero_only
    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        device = pl_module.device
        self.fid.to(device)
        self.kid.to(device)
        if not self._real_done:
            self._update_real(trainer, device)
        seeds = list(range(self.seed, self.seed + self.num_images))
        for preview in method_previews(trainer, pl_module, seeds, self.sampler, self.steps, self.batch_size):
            self._update(preview.images, real=False)
        prefix = getattr(pl_module, "distance_prefix", "")  # "r": the images are reconstructions
        kid_mean, _ = self.kid.compute()
        metrics = {f"val/{prefix}fid": float(self.fid.compute()), f"val/{prefix}kid": float(kid_mean)}
        self.fid.reset()  # the generated images' statistics; the real ones are kept
        self.kid.reset()
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        log.info("step %d: %s over %d images", trainer.global_step, metrics, self.num_images)
        return metrics
