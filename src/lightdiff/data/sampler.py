"""The training sampler: a seeded shuffle per epoch, split over ranks, endless, resumable at any batch.

Lightning's default (RandomSampler, or DistributedSampler under DDP) draws each epoch's order from the global RNG
and restarts the epoch from its first batch on resume, so a resumed run sees different data from the run that was
never interrupted. Here the order is a pure function of (seed, epoch), the ranks' shares are interleaved so that
step b of all ranks together is step b of one process with the same global batch, and the sampler starts the
next pass where the checkpoint left off (`resume_from`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """An endless stream of indices for one rank, epoch after epoch. In each epoch, batch b of rank r is images
    [b * G + r * B, b * G + (r + 1) * B) of the epoch's permutation, where B is the per-rank batch size and
    G = B x world size (the last partial global batch is dropped, so every rank takes the same number of steps)."""

    def __init__(
        self,
        dataset_size: int,  # number of items in the data set
        batch_size: int,  # per-rank batch size
        seed: int,  # the run's seed: the permutation of epoch e is randperm(seed + e)
        rank: int = 0,  # this process's global rank
        world_size: int = 1,  # number of ranks
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world size {world_size})")
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0  # the epoch of the next pass
        self._skip = 0  # batches of the next pass already trained on (a resumed run)
        self.batches_per_epoch = dataset_size // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the data set has {dataset_size} items, fewer than one global batch "
                f"({batch_size} per rank x {world_size} ranks)"
            )

    def resume_from(self, batches_seen: int) -> None:
        """Continue after `batches_seen` batches of training (all epochs): the next pass is the rest of that epoch."""
        self.epoch, self._skip = divmod(batches_seen, self.batches_per_epoch)

    def epoch_indices(self) -> torch.Tensor:
        """This rank's indices of the whole current epoch, in order."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.dataset_size, generator=generator)
        global_batch = self.batch_size * self.world_size
        order = order[: self.batches_per_epoch * global_batch].view(self.batches_per_epoch, self.world_size, -1)
        return order[:, self.rank].reshape(-1)

    def __iter__(self) -> Iterator[int]:
        # One endless pass, epoch after epoch: Lightning then runs one open-ended epoch (training is counted in
        # steps, trainer.max_steps), and a checkpoint never falls on one of its epoch ends, where a resumed
        # Lightning trains one batch of a fresh iterator and then opens another, a batch that no sampler position
        # can account for.
        while True:
            yield from self.epoch_indices()[self._skip * self.batch_size :].tolist()
            self.epoch, self._skip = self.epoch + 1, 0
