"""Images per second, logged as `train/images_per_sec`, and a one-line speed summary at the end of a run."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytorch_lightning as pl

log = logging.getLogger(__name__)


class ImagesPerSecond(pl.Callback):
    """Wall-clock training throughput over each logging window (all ranks' images)."""

    def __init__(self) -> None:
        self._window_start: float | None = None
        self._window_images = 0
        self._run_start: float | None = None
        self._run_images = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._run_start = self._window_start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        images = len(batch["label"]) * trainer.world_size  # every item has a label (-1 if none), cached or not
        self._window_images += images
        self._run_images += images
        if trainer.global_step % trainer.log_every_n_steps == 0 and self._window_start is not None:
            now = time.perf_counter()
            pl_module.log("train/images_per_sec", self._window_images / max(now - self._window_start, 1e-9))
            self._window_start, self._window_images = now, 0

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._run_start is not None and trainer.is_global_zero:
            seconds = time.perf_counter() - self._run_start
            log.info(
                "reached step %d; this session trained on %d images in %.1f s: %.1f images/s "
                "(sampling and checkpointing included)",
                trainer.global_step,
                self._run_images,
                seconds,
                self._run_images / max(seconds, 1e-9),
            )
