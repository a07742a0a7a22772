"""Streamed training data resumable at the sample: what `data=shards` and `data=hf data.streaming=true` share.

A rank's loader runs S = max(1, data.num_workers) streams, one per worker, each reading its own share of the data
and making whole batches. The DataLoader asks its workers for batches in turn, so the k-th batch of a rank is the
next batch of stream k mod S. Every batch carries its stream's position after it (`STREAM_STATE`: plain data, a
list or dict); the data module records it when the batch is about to be trained on and saves every rank's positions
in the checkpoint (`StreamLedger`). A resumed loader's worker w plays stream (w + batches seen) mod S from its saved
position, so the resumed run sees exactly the batches the uninterrupted one would have.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from lightdiff.config import ConfigError

log = logging.getLogger(__name__)

STREAM_STATE = "stream_state"  # the batch key of {"stream", "position", "skipped_samples", "skipped_shards"}


class Stream(IterableDataset):
    """Batches of one rank from S streams (one per loader worker); subclasses yield from `batches(stream, start)`."""

    def __init__(self, batch_size: int, seed: int, rank: int, world_size: int, num_streams: int) -> None:
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size, self.num_streams = rank, world_size, num_streams
        self.start: dict[int, Any] = {}  # each stream's saved position (a resumed run); absent: the beginning
        self.rotation = 0  # worker w plays stream (w + rotation) mod S, so a resumed run's first batch is the next one

    def __iter__(self) -> Any:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != self.num_streams:
            raise RuntimeError(f"{type(self).__name__} made for {self.num_streams} streams runs in {workers} workers")
        stream = (worker + self.rotation) % self.num_streams
        return self.batches(stream, self.start.get(stream))

    def batches(self, stream: int, start: Any) -> Any:
        raise NotImplementedError


def collate(items: list[dict[str, Any]], stream: int, position: Any, skipped_samples: int, skipped_shards: int) -> dict:
    """A batch as the DataLoader's default collation makes it, plus the stream's state after it (STREAM_STATE)."""
    served = "latent_moments" if "latent_moments" in items[0] else "pixel_values"  # stored latents, or pixels
    stacked = [served, "text_states"] if "text_states" in items[0] else [served]  # with them, the captions' states
    return {
        **{key: torch.stack([item[key] for item in items]) for key in stacked},
        "size_and_crop": torch.stack([item["size_and_crop"] for item in items]),
        "label": torch.tensor([item["label"] for item in items]),
        "text": [item["text"] for item in items],
        STREAM_STATE: {
            "stream": stream,
            "position": position,
            "skipped_samples": skipped_samples,
            "skipped_shards": skipped_shards,
        },
    }


class StreamLedger:
    """Where each stream of this rank stands after the last batch trained on, and what was skipped on the way."""

    def __init__(self, num_streams: int) -> None:
        self.num_streams = num_streams
        self.positions: dict[int, Any] = {}
        self.skipped_samples = self.skipped_shards = 0  # on this rank, over the whole run
        self._saved: dict[str, Any] | None = None  # a checkpoint's state until the stream exists

    def record(self, state: dict[str, Any]) -> bool:
        """Take a batch's STREAM_STATE; whether it skipped anything."""
        self.positions[int(state["stream"])] = state["position"]
        skipped = int(state["skipped_samples"]), int(state["skipped_shards"])
        self.skipped_samples += skipped[0]
        self.skipped_shards += skipped[1]
        if any(skipped):
            log.warning(
                "data.skip_bad: %d sample(s) and %d shard(s) skipped on this rank so far (reasons above)",
                self.skipped_samples,
                self.skipped_shards,
            )
        return any(skipped)

    def state_dict(self, batches_seen: int) -> dict[str, Any]:
        """Every rank's positions (a collective under DDP: Lightning asks every rank for the checkpoint's state)."""
        mine = {"positions": dict(self.positions), "skipped": [self.skipped_samples, self.skipped_shards]}
        ranks: list[Any] = [mine]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            ranks = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(ranks, mine)
        return {"batches_seen": batches_seen, "world_size": len(ranks), "num_streams": self.num_streams, "ranks": ranks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._saved = dict(state) if state else None

    def check_layout(self, state: dict[str, Any], world_size: int) -> None:
        """Refuse a checkpoint's stream state made for another number of ranks or loader streams: train.py asks before
        the run folder is touched, `resume` again inside fit."""
        if not state:
            return
        saved = (state["world_size"], state["num_streams"])
        if saved != (world_size, self.num_streams):
            raise ConfigError(
                f"the checkpoint's data streams were made for {saved[0]} rank(s) x {saved[1]} loader stream(s); "
                f"this run has {world_size} x {self.num_streams}: resume with the same number of devices and "
                f"data.num_workers={saved[1] if saved[1] > 1 else '0 or 1'} (the data order depends on both)"
            )

    def resume(self, stream: Stream, rank: int, world_size: int) -> None:
        """Start `stream` where the loaded checkpoint's left off (nothing without one)."""
        state, self._saved = self._saved, None
        if state is None:
            return
        self.check_layout(state, world_size)
        mine = state["ranks"][rank]
        self.positions = {int(index): position for index, position in mine["positions"].items()}
        self.skipped_samples, self.skipped_shards = mine["skipped"]
        stream.start = dict(self.positions)
        stream.rotation = state["batches_seen"] % self.num_streams
