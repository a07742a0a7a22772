"""Images per second, logged as `train/images_per_sec` and shown in the progress bar, the bar itself (steps of the
whole run, with its ETA), and a one-line speed summary at the end of a run."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import RichProgressBar

log = logging.getLogger(__name__)


class ImagesPerSecond(pl.Callback):
    """Wall-clock training throughput over each logging window (all ranks' images)."""

    def __init__(self) -> None:
        self._window_start: float | None = None
        self._window_images = 0
        self._run_start: float | None = None
        self._run_images = 0
        self._first_step = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._run_start = self._window_start = time.perf_counter()
        self._first_step = trainer.global_step  # a resumed run's session starts here

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        images = len(batch["label"]) * trainer.world_size  # every item has a label (-1 if none), cached or not
        self._window_images += images
        self._run_images += images
        if trainer.global_step % trainer.log_every_n_steps == 0 and self._window_start is not None:
            now = time.perf_counter()
            images_per_sec = self._window_images / max(now - self._window_start, 1e-9)
            pl_module.log("train/images_per_sec", images_per_sec, prog_bar=True)
            self._window_start, self._window_images = now, 0

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._run_start is None or not trainer.is_global_zero:
            return
        seconds = time.perf_counter() - self._run_start
        steps = max(trainer.global_step - self._first_step, 1)
        memory = ""
        if pl_module.device.type == "cuda":
            memory = f"; peak GPU memory {torch.cuda.max_memory_allocated(pl_module.device) / 2**30:.2f} GiB"
        log.info(
            "speed: reached step %d; this session trained %d steps on %d images in %.1f s: %.1f images/s, "
            "%.3f s/step (sampling and checkpointing included)%s",
            trainer.global_step,
            steps,
            self._run_images,
            seconds,
            self._run_images / max(seconds, 1e-9),
            seconds / steps,
            memory,
        )


class StepProgressBar(RichProgressBar):
    """Lightning's Rich progress bar over the optimiser steps of the whole run, `global_step / max_steps`, so its
    time-remaining column is the run's ETA, a resumed run starts where it stopped, and the endless training sampler
    (data/sampler.py) shows no epochs. Loss and images/s come from the metrics logged with `prog_bar=True`."""

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps

    def _get_train_description(self, current_epoch: int) -> str:
        return "training"

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # The bar's position is the step count, not the batch index within an epoch.
        super().on_train_batch_end(trainer, pl_module, outputs, batch, trainer.global_step - 1)
