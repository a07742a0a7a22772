"""Preemption: on SIGTERM (a cluster taking the node back) or SLURM's warning signal, save `last.ckpt` at the end
of the current batch and stop cleanly; under SLURM, requeue the job, which then resumes from that checkpoint in the
same deterministic run folder and continues the same wandb run (the run id is stored there).

A preempted run leaves at once: after the checkpoint, `Preempted` ends `fit` (no end-of-training round: final grids,
samples, metrics and exports would run for minutes past SLURM's KillWait, and their "final" numbers would not be
final), and `train.py` exits with `PREEMPTED_EXIT_STATUS`. A signal that arrives once training has ended (the final
checkpoint is on disk, `callbacks.FinalCheckpoint` says so) stops the end-of-run round where it stands.

Lightning's own SLURM requeue saves `hpc_ckpt_N.ckpt` files beside the run and finds them only when no checkpoint
path is given; train.py turns it off (SLURMEnvironment(auto_requeue=False)) so that one mechanism owns resumption.
Submit with `#SBATCH --signal=B:USR1@120` (or `--signal=USR1@120` with srun) to get the warning before the limit.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

log = logging.getLogger(__name__)

# The exit status of a preempted run: EX_TEMPFAIL of sysexits.h ("a temporary failure; retry"), so a launcher or
# script can tell "stopped, resume me" from success (0) and from an error (1).
PREEMPTED_EXIT_STATUS = 75


class Preempted(Exception):  # noqa: N818  (a stop, not an error)
    """Raised out of `fit` once a preemption signal's checkpoint is on disk; train.py turns it into
    PREEMPTED_EXIT_STATUS."""

    def __init__(self, step: int, received: str) -> None:
        super().__init__(f"preempted at step {step} ({received})")
        self.step = step
        self.received = received


class Preemption(pl.Callback):
    """Turns the configured signals into "checkpoint at the end of this batch, then stop"."""

    def __init__(
        self,
        checkpoint_path: str,  # where to save (the run's checkpoints/last.ckpt, which a resume picks up)
        signals: list[str] = ["SIGTERM", "SIGUSR1"],  # noqa: B006  (Hydra passes lists; never mutated)
        requeue: bool = True,  # under SLURM, `scontrol requeue` the job after saving
    ) -> None:
        unknown = [name for name in signals if not isinstance(getattr(signal, name, None), signal.Signals)]
        if unknown:
            raise ValueError(f"callbacks.preemption.signals: {unknown} are not signal names (e.g. SIGTERM, SIGUSR1)")
        self.checkpoint_path = Path(checkpoint_path)
        self.signals = [signal.Signals[name] for name in signals]
        self.requeue = requeue
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}
        self._final_saved_at: int | None = None  # the step of the final checkpoint, once written

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum)
        if self._final_saved_at is not None:  # training is over and its state saved: nothing left worth waiting for
            raise Preempted(self._final_saved_at, self.received.name)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Installed after Lightning's own handlers, replacing them for these signals: Lightning's SIGTERM handling
        # raises at the end of whichever batch the signal lands in, possibly after this callback's turn, so the
        # checkpoint would be skipped. Here one place decides: save at the end of the batch, then stop.
        if threading.current_thread() is not threading.main_thread():
            log.warning("not in the main thread: preemption signals are not handled")
            return
        for signum in self.signals:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def final_state_saved(self, trainer: pl.Trainer) -> None:
        """Called by `FinalCheckpoint` once the final checkpoint is written, before the end-of-run round: from now on
        a signal stops the run at once (and one that came while training ended stops it now)."""
        self._final_saved_at = trainer.global_step
        if self.received is not None:
            raise Preempted(trainer.global_step, self.received.name)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Not at on_train_end: the end-of-run round (other callbacks' on_train_end) runs under these handlers.
        self._restore_handlers()
        self._final_saved_at = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum, previous in self._previous.items():
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        # Every rank must take the same decision (the save is collective), whichever rank the signal reached.
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        received = self.received.name if self.received is not None else "a signal on another rank"
        log.warning(
            "%s received: saving %s at step %d and stopping", received, self.checkpoint_path, trainer.global_step
        )
        trainer.save_checkpoint(self.checkpoint_path)
        trainer.strategy.barrier("preemption checkpoint")
        if trainer.is_global_zero and self.requeue and self.received == signal.SIGUSR1:
            self._requeue_slurm_job()
        # Out of fit now, on every rank (the decision above was collective): on_train_end's round is skipped.
        raise Preempted(trainer.global_step, received)

    @property
    def pending(self) -> bool:
        """A signal arrived and the batch has not ended yet: callbacks skip work that would delay the save."""
        return self.received is not None

    @staticmethod
    def _requeue_slurm_job() -> None:
        job_id = os.environ.get("SLURM_JOB_ID")
        if array_job := os.environ.get("SLURM_ARRAY_JOB_ID"):
            job_id = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        if not job_id or not re.fullmatch(r"[0-9_]+", job_id):
            log.warning("SIGUSR1 outside a SLURM job (SLURM_JOB_ID=%r): not requeueing", job_id)
            return
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
        if result.returncode == 0:
            log.info("requeued SLURM job %s; it resumes from the run folder", job_id)
        else:
            log.error("scontrol requeue %s failed (%d): %s", job_id, result.returncode, result.stderr.strip())


def preemption_pending(trainer: pl.Trainer) -> bool:
    """Whether a preemption signal waits for the end of this batch: a periodic grid or metric would only delay the
    save that must land before the cluster's SIGKILL."""
    return any(isinstance(callback, Preemption) and callback.pending for callback in trainer.callbacks)
