"""Periodic checkpoints: last.ckpt plus the k newest step checkpoints, never deleting the last one that loads."""

from __future__ import annotations

import logging

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint

from lightdiff.checkpointing import checkpoint_problem

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
        )

    def _remove_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        # Lightning calls this only after writing `_last_checkpoint_saved`; only global rank 0 deletes files.
        newest = self._last_checkpoint_saved
        if trainer.is_global_zero and newest:
            problem = checkpoint_problem(newest)
            if problem is not None:
                log.warning(
                    "keeping %s: the checkpoint written after it, %s, cannot be loaded (%s)", filepath, newest, problem
                )
                return
        super()._remove_checkpoint(trainer, filepath)
