"""Images per second, logged as `train/images_per_sec` and shown in the progress bar, the bar itself (steps of the
whole run, with its ETA), and a one-line speed summary at the end of a run."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import RichProgressBar

from lightdiff.config import ConfigError

log = logging.getLogger(__name__)


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


class ImagesPerSecond(pl.Callback):
    """Wall-clock training throughput over each logging window (all ranks' images), and progress lines in the log.

    A Rich bar does not update in a file (SLURM's output, nohup): there, every `progress_every_n_steps` steps, rank 0
    writes `step 1200/3000 (40.0%): loss 0.0421, 310 images/s, elapsed 4m02s, ETA 6m05s` to train.log."""

    def __init__(
        self,
        progress_every_n_steps: int = 100,  # a progress line in the log every N steps; 0: none
        progress_without_terminal_only: bool = True,  # only when stdout is not a terminal (where the bar shows it)
    ) -> None:
        if progress_every_n_steps < 0:
            raise ConfigError(f"callbacks.images_per_sec.progress_every_n_steps={progress_every_n_steps} must be >= 0")
        self.progress_every_n_steps = progress_every_n_steps
        self.progress_without_terminal_only = progress_without_terminal_only
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
        every = self.progress_every_n_steps
        if every and trainer.global_step % every == 0 and trainer.is_global_zero and self._wants_progress_lines():
            self._log_progress(trainer)

    def _wants_progress_lines(self) -> bool:
        return not self.progress_without_terminal_only or not sys.stdout.isatty()

    def _log_progress(self, trainer: pl.Trainer) -> None:
        assert self._run_start is not None
        elapsed = time.perf_counter() - self._run_start
        step, total = trainer.global_step, trainer.max_steps
        seconds_per_step = elapsed / max(step - self._first_step, 1)  # this session's pace
        loss = trainer.callback_metrics.get("train/loss")
        log.info(
            "step %d/%d (%.1f%%): loss %s, %.0f images/s, elapsed %s, ETA %s",
            step,
            total,
            100 * step / total,
            f"{float(loss):.4g}" if loss is not None else "n/a",
            self._run_images / max(elapsed, 1e-9),
            _duration(elapsed),
            _duration(seconds_per_step * max(total - step, 0)),
        )

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
