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


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of one aspect-ratio bucket each (data/buckets.py), for one rank, epoch after epoch, resumable at any
    batch like `ResumableSampler`. Epoch e: the data set's permutation randperm(seed + e) is split by bucket (each
    bucket's items in permutation order), each bucket's share cut into global batches of B x world size (its last
    partial one dropped), and the global batches shuffled together by a second draw of the same generator; rank r
    takes items [r * B, (r + 1) * B) of each. Every global batch is thus one bucket on every rank, and the number of
    batches per epoch depends only on how many items each bucket holds."""

    def __init__(
        self,
        bucket_of: list[int],  # the bucket of each item
        batch_size: int,  # per-rank batch size
        seed: int,  # the run's seed
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world size {world_size})")
        self.bucket_of = torch.tensor(bucket_of)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.epoch, self._skip = 0, 0
        global_batch = batch_size * world_size
        counts = torch.bincount(self.bucket_of)
        self.batches_per_epoch = int((counts // global_batch).sum())
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"no bucket holds a global batch ({batch_size} per rank x {world_size} ranks): the largest holds "
                f"{int(counts.max())} items; lower data.batch_size or use fewer buckets"
            )

    def resume_from(self, batches_seen: int) -> None:
        self.epoch, self._skip = divmod(batches_seen, self.batches_per_epoch)

    def epoch_batches(self) -> list[list[int]]:
        """This rank's batches of the whole current epoch, in order."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.bucket_of), generator=generator)
        global_batch = self.batch_size * self.world_size
        batches = []
        for bucket in torch.unique(self.bucket_of).tolist():
            members = order[self.bucket_of[order] == bucket]
            full = len(members) // global_batch * global_batch
            batches += list(members[:full].view(-1, global_batch))
        shuffled = torch.randperm(len(batches), generator=generator).tolist()
        start, end = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        return [batches[i][start:end].tolist() for i in shuffled]

    def __iter__(self) -> Iterator[list[int]]:
        while True:  # endless, as ResumableSampler (see there)
            yield from self.epoch_batches()[self._skip :]
            self.epoch, self._skip = self.epoch + 1, 0
