"""Periodic checkpoints: last.ckpt plus the k newest step checkpoints, never deleting the last one that loads; and
the final checkpoint, written before any other end-of-run work."""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint

from lightdiff.callbacks.preemption import Preemption
from lightdiff.checkpointing import checkpoint_problem
from lightdiff.contract import FinishesTraining

log = logging.getLogger(__name__)


class StepCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint keeping `last.ckpt` and the `save_top_k` newest step checkpoints.

    Lightning deletes the oldest step checkpoint right after writing a new one; here it is deleted only once the
    file just written loads, so retention can never remove the last checkpoint a resume could start from.
    """

    def __init__(
        self,
        dirpath: str,  # the run's checkpoints/ folder
        filename: str = "step{step:07d}",  # name of the step checkpoints, in Lightning's "{metric:format}" syntax
        every_n_train_steps: int = 500,  # write one every this many optimiser steps
        save_last: bool = True,  # also (over)write last.ckpt each time
        save_top_k: int = 1,  # keep the k newest step checkpoints (-1: all, 0: none)
        auto_insert_metric_name: bool = False,  # false: "step0000500.ckpt", not "step=step0000500.ckpt"
    ) -> None:
        # "The k newest" is top-k on the step: without a monitored value Lightning only accepts save_top_k -1, 0, 1.
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor="step",
            mode="max",
            every_n_train_steps=every_n_train_steps,
            save_last=save_last,
            save_top_k=save_top_k,
            auto_insert_metric_name=auto_insert_metric_name,
            # One last.ckpt per run, replaced (atomically) at each save: Lightning would write last-v1.ckpt, -v2, ...
            # beside a last.ckpt it did not write itself (one FinalCheckpoint wrote before any periodic save), one
            # full copy per later launch.
            enable_version_counter=False,
        )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning writes last.ckpt here when no periodic save did; FinalCheckpoint (first in the callback list) has
        # just written the same state to the same file, so a second full write would only slow every run's end.
        last = Path(self.dirpath or "") / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
        final = [c for c in trainer.callbacks if isinstance(c, FinalCheckpoint) and c.saved]
        if any(c.path.absolute() == last.absolute() for c in final):
            return
        super().on_train_end(trainer, pl_module)

    def _should_remove_checkpoint(self, trainer: pl.Trainer, previous: str, current: str) -> bool:
        # Lightning never removes the file a run resumed from. A resume that fell back to a step checkpoint (last.ckpt
        # was damaged) would then keep that file for ever: here a file in this folder is pruned like any other, once
        # the newer one loads (`_remove_checkpoint`). Files elsewhere are still never touched.
        in_this_folder = self.dirpath is not None and Path(previous).absolute().parent == Path(self.dirpath).absolute()
        if previous != current and in_this_folder:
            return True
        return super()._should_remove_checkpoint(trainer, previous, current)

    def _remove_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        # Lightning calls this only after writing `_last_checkpoint_saved`; only global rank 0 deletes files.
        newest = self._last_checkpoint_saved
        if trainer.is_global_zero and newest:
            problem = checkpoint_problem(newest, check_finite=False)  # AtomicCheckpointIO refused NaN before writing
            if problem is not None:
                log.warning(
                    "keeping %s: the checkpoint written after it, %s, cannot be loaded (%s)", filepath, newest, problem
                )
                return
        super()._remove_checkpoint(trainer, filepath)


class FinalCheckpoint(pl.Callback):
    """Writes `path` (the run's last.ckpt) when training ends, before the other callbacks' end-of-run work (final
    sample grids, metrics), which may fail: train.py puts it first in the callback list. A run stopped by an
    exception (not by max_steps, max_time or a preemption signal) writes nothing here: its last periodic checkpoint
    stands. Lightning skips `on_train_end` when no step is left to train; train.py then calls `save` itself."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.saved = False

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if isinstance(pl_module, FinishesTraining):
            pl_module.finish_training()
        self.save(trainer)
        for callback in trainer.callbacks:
            if isinstance(callback, Preemption):  # a preemption signal now ends the end-of-run round at once
                callback.final_state_saved(trainer)

    def save(self, trainer: pl.Trainer) -> None:
        # The last step is saved even when max_steps is not a multiple of the checkpoint interval.
        trainer.save_checkpoint(self.path, weights_only=False)
        self.saved = True
