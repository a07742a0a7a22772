"""What every DataModule shares: `ImageDataModule` (loading, resumable order, latent caching, validation split) and
the helpers of the streamed ones. Each data set's own DataModule lives beside its data set (shapes.py,
image_folder.py, shard_stream.py, ...), so adding a data set is one module."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytorch_lightning as pl
import torch
from diffusers import AutoencoderKL
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset, Subset

from lightdiff.config import ConfigError, NonNegativeInt
from lightdiff.data.latent_cache import cached_first_frames, cached_latents, cached_text_states
from lightdiff.data.sampler import BucketBatchSampler, ResumableSampler
from lightdiff.data.streams import STREAM_STATE, Stream, StreamLedger

if TYPE_CHECKING:
    from lightdiff.nets.families.base import FirstFrameEncoding

log = logging.getLogger(__name__)

StreamT = TypeVar("StreamT", bound=Stream)


class ImageDataModule(pl.LightningDataModule):
    """Serves batches {"pixel_values": (B, 3, H, W) in [-1, 1], "label": (B,), "text": list[str]}; a video data set's
    "pixel_values" are clips (B, F, 3, H, W) (`num_frames`)."""

    def __init__(
        self,
        dataset: Dataset,  # a lightdiff image data set (shapes, image folder, HF)
        batch_size: int = 64,  # per-device batch size
        num_workers: NonNegativeInt = 0,  # loader processes; 0 loads in the training process
        pin_memory: bool = False,  # page-locked batches for faster host-to-GPU copies
        persistent_workers: bool = False,  # keep workers alive between epochs (needs num_workers > 0)
        cache_latents: bool = False,  # latent models: serve VAE posteriors encoded once (see use_latent_cache)
        latent_cache_dir: str = "outputs/latent_cache",  # where latent caches are kept
        identity: str = "",  # what makes this data set itself (source, size, preprocessing): the cache key
        random_views: bool = False,  # whether items are randomly augmented (flips, random crops)
        val_dataset: Dataset | None = None,  # the held-out split val/loss is measured on (None: no validation)
        streamed: bool = False,  # training batches come from a stream; `dataset` holds only its first items
    ) -> None:
        super().__init__()
        if cache_latents and random_views:
            raise ConfigError(
                "data.cache_latents=true stores one view of each image: set data.random_flip=false "
                "(and data.center_crop=true)"
            )
        if batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size} must be positive")
        if not streamed and len(dataset) < batch_size:
            raise ValueError(f"the data set has {len(dataset)} images, fewer than data.batch_size={batch_size}")
        if val_dataset is not None and len(val_dataset) == 0:
            raise ValueError("the held-out validation split (data.val_*) is empty")
        self.val_dataset = val_dataset
        self.source_dataset = dataset  # the images; `dataset` is what is served (the images, or their latent cache)
        self.dataset: Dataset = dataset
        self.cache_latents = cache_latents
        self.latent_cache_dir = Path(latent_cache_dir)
        self.identity = identity
        self.random_views = random_views
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.order_seed = 0  # the run's seed (train.py sets it): the shuffle of epoch e is a function of it and e
        self.sampler: ResumableSampler | BucketBatchSampler | None = None  # made by train_dataloader
        self._batches_seen: int | None = None  # from a checkpoint, until the sampler exists

    def use_latent_cache(
        self,
        vae: AutoencoderKL,
        text_encoder_fingerprint: str | None = None,
        encode_prompts: Callable[[list[str]], torch.Tensor] | None = None,
        first_frames: FirstFrameEncoding | None = None,
    ) -> None:
        """Serve {"latent_moments", "label", "text"} from the cache of this data set under `vae` (made if missing);
        with a frozen text encoder (its fingerprint and prompt encoding given) also "text_states", cached likewise;
        with an image-to-video model's `first_frames` encoding, each clip's "first_frame_condition" too."""
        cache = cached_latents(self.source_dataset, self.identity, vae, self.latent_cache_dir, self.batch_size)
        if text_encoder_fingerprint is not None and encode_prompts is not None:
            states, index = cached_text_states(
                cache.texts,
                self.identity,
                text_encoder_fingerprint,
                encode_prompts,
                self.latent_cache_dir,
                self.batch_size,
            )
            cache.attach_text_states(states, index)
        if first_frames is not None:
            conditions = cached_first_frames(
                self.source_dataset, self.identity, first_frames, self.latent_cache_dir, self.batch_size
            )
            cache.attach_first_frames(conditions)
        self.dataset = cache

    @property
    def reference_identity(self) -> str:
        """What makes the served images themselves, random augmentation included: the key of cached reference
        statistics (FID); empty when the data set has no identity (nothing is then cached)."""
        return f"{self.identity}|random_views={self.random_views}" if self.identity else ""

    @property
    def num_classes(self) -> int:
        """Number of class labels the data set provides (0 when it has none)."""
        return int(getattr(self.source_dataset, "num_classes", 0))

    @property
    def resolution(self) -> int:
        """Side in pixels of every image (before any latent encoding)."""
        return int(self.source_dataset.resolution)

    @property
    def num_frames(self) -> int | None:
        """Frames per clip of a video data set; None for images."""
        return getattr(self.source_dataset, "num_frames", None)

    def captions(self) -> list[str]:
        """Every caption of the data set (with repeats), e.g. to build a tokenizer; empty if it has none."""
        return list(self.source_dataset.captions())

    @property
    def class_names(self) -> list[str] | None:
        return getattr(self.source_dataset, "class_names", None)

    @property
    def kept_labels(self) -> list[int] | None:
        """The labels a data set of some of its classes holds (data.classes / data.exclude); None: every class."""
        return getattr(self.source_dataset, "kept_labels", None)

    @property
    def buckets(self) -> list[tuple[int, int]] | None:
        """The (height, width) aspect-ratio buckets the images are trained at (data/buckets.py); None: squares."""
        return getattr(self.source_dataset, "buckets", None)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        bucket_of = getattr(self.source_dataset, "bucket_of", None)  # the latent cache keeps the images' order
        if bucket_of is not None:  # every batch one bucket: one tensor of one size
            self.sampler = BucketBatchSampler(bucket_of, self.batch_size, self.order_seed, rank, world_size)
            batching: dict = {"batch_sampler": self.sampler}
        else:
            self.sampler = ResumableSampler(len(self.dataset), self.batch_size, self.order_seed, rank, world_size)
            # drop_last: a constant batch size keeps images/s and the loss scale comparable
            batching = {"batch_size": self.batch_size, "sampler": self.sampler, "drop_last": True}
        if self._batches_seen is not None:
            self.sampler.resume_from(self._batches_seen)
            self._batches_seen = None
        return DataLoader(
            self.dataset,
            **batching,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            # Worker seeds come from this generator, not the global RNG, whose state is the training run's own
            # (restored exactly on resume by callbacks.RandomState).
            generator=torch.Generator().manual_seed(self.order_seed),
        )

    def val_dataloader(self) -> DataLoader | list:
        """The held-out split in a fixed order, each rank its share (items rank, rank + R, ...); none without one."""
        if self.val_dataset is None:
            return []  # Lightning then runs no validation
        trainer = self.trainer
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        share = Subset(self.val_dataset, range(rank, len(self.val_dataset), world_size))
        return DataLoader(
            share,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            # a loader without its own generator draws its workers' base seed from the run's random stream
            generator=torch.Generator().manual_seed(self.order_seed),
        )

    def state_dict(self) -> dict[str, int]:
        """Where the training loader stands: saved in every checkpoint so a resumed run continues mid-epoch."""
        trainer = self.trainer
        if trainer is None or self.sampler is None:
            return {}
        # Batches trained on since the run began (Lightning's epoch counters are not fit for this: an epoch cut short
        # by max_steps counts as complete).
        return {"batches_seen": trainer.fit_loop.epoch_loop.batch_progress.total.processed}

    def check_resume(self, state_dict: dict[str, Any], world_size: int) -> None:
        """Refuse a checkpoint's data state this module cannot continue from (train.py asks before writing anything);
        an indexed data set continues from any: its position is a batch count."""

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        if state_dict:
            if self.random_views:
                log.warning(
                    "resuming with random augmentation (flips or random crops): the data order continues exactly, but "
                    "the views are drawn from the random stream in a different order, so the run will not be "
                    "bit-identical to one never interrupted"
                )
            self._batches_seen = int(state_dict["batches_seen"])


def plain(value: Any) -> Any:
    """A config value as plain lists and dicts (Hydra passes ListConfig / DictConfig)."""
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def start_stream(
    datamodule: ImageDataModule, ledger: StreamLedger, make: Callable[[int, int], StreamT]
) -> tuple[StreamT, DataLoader]:
    """This rank's stream (`make(rank, world_size)`), started where a loaded checkpoint left off, and its loader."""
    trainer = datamodule.trainer
    rank, world_size = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
    stream = make(rank, world_size)
    ledger.resume(stream, rank, world_size)
    loader = DataLoader(
        stream,
        batch_size=None,  # the workers make the batches (each from its own stream)
        num_workers=datamodule.num_workers,
        pin_memory=datamodule.pin_memory,
        generator=torch.Generator().manual_seed(datamodule.order_seed),
    )
    return stream, loader


def stream_state(datamodule: ImageDataModule, ledger: StreamLedger, stream: Stream | None) -> dict[str, Any]:
    """What a streamed data module saves in a checkpoint: every rank's stream positions (nothing before training)."""
    if datamodule.trainer is None or stream is None:
        return {}
    return ledger.state_dict(datamodule.trainer.fit_loop.epoch_loop.batch_progress.total.processed)


def record_stream_state(datamodule: ImageDataModule, ledger: StreamLedger, batch: Any) -> Any:
    """A streamed batch without its STREAM_STATE, recorded in `ledger` (the batch about to be trained on: Lightning
    calls on_before_batch_transfer for it, not for one prefetched); skips go to `train/skipped_*` (rank zero's)."""
    if not isinstance(batch, dict) or STREAM_STATE not in batch:
        return batch
    trainer = datamodule.trainer
    if ledger.record(batch.pop(STREAM_STATE)) and trainer is not None and trainer.is_global_zero:
        counts = {"train/skipped_samples": ledger.skipped_samples, "train/skipped_shards": ledger.skipped_shards}
        for logger in trainer.loggers:
            logger.log_metrics({key: float(count) for key, count in counts.items()}, step=trainer.global_step)
    return batch
