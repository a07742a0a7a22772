"""Random number generator states of every rank, in every checkpoint: a resumed run draws the same noise, timesteps
and dropout as the run that was never interrupted.

Lightning saves weights, optimisers, schedulers and loop counters, but no RNG state (and `seed_everything` on
resume restarts the streams from the seed). This callback stores the states of torch (CPU and every CUDA device),
numpy and Python's `random` for each rank, and puts them back just before the first training batch after a resume:
anything that runs between the restore and that batch (set-up hooks, metric networks) cannot shift the streams.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

log = logging.getLogger(__name__)


def capture_random_state() -> dict[str, Any]:
    """This process's RNG states, as tensors and plain data (checkpoints are loaded with weights_only=True)."""
    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {
            "kind": numpy_state[0],
            "keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
            "position": int(numpy_state[2]),
            "has_gauss": int(numpy_state[3]),
            "cached_gaussian": float(numpy_state[4]),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_random_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_random_state`."""
    torch.set_rng_state(state["torch"])
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss"]))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RandomState(pl.Callback):
    """Saves the RNG states of all ranks in each checkpoint; restores this rank's on resume."""

    def __init__(self) -> None:
        self._to_restore: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return "random_state"

    def state_dict(self) -> dict[str, Any]:
        # Every rank dumps the checkpoint (only rank 0 writes it), so the states can be gathered here.
        state = capture_random_state()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            states: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(states, state)
        else:
            states = [state]
        return {"ranks": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._to_restore = state_dict

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._to_restore is None:
            return
        states = self._to_restore["ranks"]
        self._to_restore = None
        if len(states) != trainer.world_size:
            log.warning(
                "the checkpoint holds random states of %d ranks, this run has %d: the random streams restart from "
                "the seed, so the resumed run will not repeat the interrupted one exactly",
                len(states),
                trainer.world_size,
            )
            return
        restore_random_state(states[trainer.global_rank])
