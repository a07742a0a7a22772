"""One LightningDataModule for every image data set: the data set is the config's choice, loading is shared."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytorch_lightning as pl
import torch
from diffusers import AutoencoderKL
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset, Subset

from lightdiff.config import ConfigError, NonNegativeInt
from lightdiff.data.buckets import Bucket, BucketSpec, bucket_sizes
from lightdiff.data.hf_stream import HFHead, HFStream
from lightdiff.data.image_folder import HFImageDataset, ImageFolderDataset
from lightdiff.data.latent_cache import cached_latents, cached_text_states, vae_fingerprint
from lightdiff.data.moving_shapes import MovingShapesDataset
from lightdiff.data.sampler import BucketBatchSampler, ResumableSampler
from lightdiff.data.shapes import ShapesDataset
from lightdiff.data.shard_stream import ShardHead, ShardStream, shard_urls, stored_records
from lightdiff.data.streams import STREAM_STATE, Stream, StreamLedger
from lightdiff.data.transforms import ImageTransform
from lightdiff.data.video_folder import VideoFolderDataset

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
    ) -> None:
        """Serve {"latent_moments", "label", "text"} from the cache of this data set under `vae` (made if missing);
        with a frozen text encoder (its fingerprint and prompt encoding given) also "text_states", cached likewise."""
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


def _plain(value: Any) -> Any:
    """A config value as plain lists and dicts (Hydra passes ListConfig / DictConfig)."""
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


class ShapesDataModule(ImageDataModule):
    """The embedded shapes data set (`data=shapes`)."""

    def __init__(
        self,
        resolution: int = 32,  # image side in pixels
        size: int = 50_000,  # images per epoch
        seed: int = 0,  # data seed: image i is a pure function of (seed, i)
        random_flip: bool = False,  # horizontal flip
        batch_size: int = 64,  # per-device batch size
        num_workers: NonNegativeInt = 0,  # loader processes
        pin_memory: bool = False,  # page-locked batches
        persistent_workers: bool = False,  # keep workers between epochs
        cache_latents: bool = False,  # latent models: encode once through the VAE, train from the cache
        latent_cache_dir: str = "outputs/latent_cache",  # where latent caches are kept
        classes: list[str] | None = None,  # captions of the classes to keep ("a blue triangle"); None: all 24
        exclude: list[str] | None = None,  # captions of classes to leave out
        aspect_ratios: list[float] | None = None,  # variable aspect: pictures of these width / height ratios
        buckets: BucketSpec | None = None,  # aspect-ratio buckets (data/buckets.py); None: centre-cropped squares
        val_size: int = 0,  # held-out images for val/loss: items size .. size + val_size - 1, never trained on
    ) -> None:
        def shapes(count: int) -> ShapesDataset:
            return ShapesDataset(
                size=count,
                resolution=resolution,
                seed=seed,
                random_flip=random_flip,
                classes=classes,
                exclude=exclude,
                aspect_ratios=_plain(aspect_ratios),
                buckets=_plain(buckets),
            )

        dataset = shapes(size)
        held_out = Subset(shapes(size + val_size), range(size, size + val_size)) if val_size > 0 else None
        identity = f"shapes|size={size}|seed={seed}|resolution={resolution}"
        if len(dataset.kept_labels) < len(dataset.class_names):  # the full set keeps the identity caches know it by
            identity += f"|classes={','.join(map(str, dataset.kept_labels))}"
        if dataset.aspect_ratios is not None:
            identity += f"|aspect_ratios={dataset.aspect_ratios}|buckets={dataset.buckets}"
        super().__init__(
            dataset,
            batch_size,
            num_workers,
            pin_memory,
            persistent_workers,
            cache_latents,
            latent_cache_dir,
            identity,
            random_views=random_flip,
            val_dataset=held_out,
        )


class MovingShapesDataModule(ImageDataModule):
    """The embedded moving-shapes video data set (`data=moving_shapes`): clips (F, 3, H, W)."""

    def __init__(
        self,
        resolution: int = 32,  # frame side in pixels
        num_frames: int = 9,  # frames per clip
        size: int = 50_000,  # clips per epoch
        seed: int = 0,  # data seed: clip i is a pure function of (seed, i)
        batch_size: int = 16,  # per-device batch size (clips)
        num_workers: NonNegativeInt = 0,  # loader processes
        pin_memory: bool = False,  # page-locked batches
        persistent_workers: bool = False,  # keep workers between epochs
        val_size: int = 0,  # held-out clips for val/loss: items size .. size + val_size - 1, never trained on
        cache_latents: bool = False,  # model=video: encode the clips once through the VAE, train from the cache
        latent_cache_dir: str = "outputs/latent_cache",  # where latent caches are kept
    ) -> None:
        dataset = MovingShapesDataset(size=size, resolution=resolution, num_frames=num_frames, seed=seed)
        held_out = None
        if val_size > 0:
            longer = MovingShapesDataset(size=size + val_size, resolution=resolution, num_frames=num_frames, seed=seed)
            held_out = Subset(longer, range(size, size + val_size))
        identity = f"moving_shapes|size={size}|seed={seed}|resolution={resolution}|num_frames={num_frames}"
        super().__init__(
            dataset,
            batch_size,
            num_workers,
            pin_memory,
            persistent_workers,
            cache_latents,
            latent_cache_dir,
            identity=identity,
            val_dataset=held_out,
        )


class VideoFolderDataModule(ImageDataModule):
    """A folder of clips (video files or frame folders) with optional metadata.jsonl captions
    (`data=video_folder data.root=DIR`)."""

    def __init__(
        self,
        root: str,  # the folder of clips
        resolution: int = 32,  # frame side in pixels (resized, centre-cropped)
        num_frames: int = 9,  # frames per clip: the first ones, frame_stride apart
        frame_stride: int = 1,  # every frame_stride-th frame
        skip_bad: bool = False,  # skip (and count) unreadable or too short clips instead of stopping
        batch_size: int = 16,  # per-device batch size (clips)
        num_workers: NonNegativeInt = 2,  # loader processes
        pin_memory: bool = True,  # page-locked batches
        persistent_workers: bool = True,  # keep workers between epochs
        cache_latents: bool = False,  # model=video: encode the clips once through the VAE, train from the cache
        latent_cache_dir: str = "outputs/latent_cache",  # where latent caches are kept
    ) -> None:
        dataset = VideoFolderDataset(root, resolution, num_frames, frame_stride, skip_bad)
        newest = max(path.stat().st_mtime_ns for path in dataset.paths)
        identity = (
            f"video_folder|{dataset.root.resolve()}|clips={len(dataset)}|newest={newest}|resolution={resolution}"
            f"|num_frames={num_frames}|frame_stride={frame_stride}"
        )
        super().__init__(
            dataset, batch_size, num_workers, pin_memory, persistent_workers, cache_latents, latent_cache_dir, identity
        )


class ImageFolderDataModule(ImageDataModule):
    """A folder of images with optional metadata.jsonl (`data=image_folder data.root=DIR`)."""

    def __init__(
        self,
        root: str,  # the image folder
        resolution: int = 32,  # output side in pixels
        center_crop: bool = True,  # centre crop; false takes a random crop
        random_flip: bool = True,  # horizontal flip
        skip_bad: bool = False,  # skip (and count) unreadable images instead of stopping
        scan_cache_dir: str | None = None,  # where the start-up scan's answer is kept per folder state (None: not kept)
        batch_size: int = 64,  # per-device batch size
        num_workers: NonNegativeInt = 2,  # loader processes
        pin_memory: bool = True,  # page-locked batches
        persistent_workers: bool = True,  # keep workers between epochs
        cache_latents: bool = False,  # latent models: encode once through the VAE, train from the cache
        latent_cache_dir: str = "outputs/latent_cache",  # where latent caches are kept
        buckets: BucketSpec | None = None,  # aspect-ratio buckets (data/buckets.py); None: square crops at resolution
        val_root: str | None = None,  # a held-out image folder for val/loss (centre-cropped, not flipped)
    ) -> None:
        dataset = ImageFolderDataset(
            root, resolution, center_crop, random_flip, skip_bad, scan_cache_dir, _plain(buckets)
        )
        held_out = ImageFolderDataset(val_root, resolution, True, False, skip_bad, scan_cache_dir) if val_root else None
        newest = max(path.stat().st_mtime_ns for path in dataset.paths)
        identity = f"image_folder|{dataset.root.resolve()}|files={len(dataset)}|newest={newest}|resolution={resolution}"
        if dataset.buckets is not None:
            identity += f"|buckets={dataset.buckets}"
        super().__init__(
            dataset,
            batch_size,
            num_workers,
            pin_memory,
            persistent_workers,
            cache_latents,
            latent_cache_dir,
            identity,
            random_views=random_flip or not center_crop,
            val_dataset=held_out,
        )


class HFDataModule(ImageDataModule):
    """A data set read by `datasets.load_dataset` (`data=hf data.name=HUB_ID_OR_FOLDER`), indexed, or streamed without
    being downloaded whole (`data.streaming=true`: data/hf_stream.py, resumable at the sample like data=shards)."""

    def __init__(
        self,
        name: str,  # hub id or local folder
        resolution: int = 32,  # output side in pixels
        split: str = "train",  # split to train on
        image_column: str = "image",  # column of images
        caption_column: str | None = None,  # column of captions, if any
        label_column: str | None = None,  # column of integer labels, if any
        center_crop: bool = True,  # centre crop; false takes a random crop
        random_flip: bool = True,  # horizontal flip
        cache_dir: str | None = None,  # `datasets` download cache
        batch_size: int = 64,  # per-device batch size
        num_workers: NonNegativeInt = 2,  # loader processes
        pin_memory: bool = True,  # page-locked batches
        persistent_workers: bool = True,  # keep workers between epochs
        cache_latents: bool = False,  # latent models: encode once through the VAE, train from the cache
        latent_cache_dir: str = "outputs/latent_cache",  # where latent caches are kept
        buckets: BucketSpec | None = None,  # aspect-ratio buckets (data/buckets.py); None: square crops at resolution
        val_split: str | None = None,  # a held-out split for val/loss (e.g. "validation"; centre-cropped, not flipped)
        streaming: bool = False,  # stream the data set (load_dataset(streaming=True)) instead of downloading it
        shuffle_buffer: int = 1000,  # streaming: examples shuffled in a buffer; 1: exact resume (module docstring)
        skip_bad: bool = True,  # streaming: skip and count examples without an image or caption; false: stop
        reference_size: int = 1000,  # streaming: first examples kept for previews, captions, FID reference
        val_size: int = 256,  # streaming: examples of val_split measured
    ) -> None:
        self.ledger: StreamLedger | None = None  # streaming only
        if streaming:
            if buckets is not None or cache_latents:
                raise ConfigError("data.streaming=true: data.buckets and data.cache_latents need the data set whole")
            import datasets

            def streamed(which: str) -> Any:
                stream = datasets.load_dataset(name, split=which, streaming=True, cache_dir=cache_dir)
                for key, column in (("image", image_column), ("caption", caption_column), ("label", label_column)):
                    if column is not None and stream.column_names is not None and column not in stream.column_names:
                        known = stream.column_names
                        raise KeyError(f"data.{key}_column={column!r} is not a column of {name!r}; columns: {known}")
                return stream

            columns = (image_column, caption_column, label_column)
            self.transform = ImageTransform(resolution, center_crop, random_flip)
            self.source = streamed(split)
            dataset: Dataset = HFHead(self.source, self.transform, *columns, reference_size)
            plain = ImageTransform(resolution, center_crop=True, random_flip=False)
            held_out = HFHead(streamed(val_split), plain, *columns, val_size) if val_split is not None else None
            self.columns, self.shuffle_buffer, self.skip_bad = columns, shuffle_buffer, skip_bad
            self.ledger = StreamLedger(max(1, num_workers))
            self.stream: HFStream | None = None
            persistent_workers = False  # the stream is endless: one loader iterator serves the whole run
            identity = f"hf-stream|{name}|{split}|{image_column}|{caption_column}|resolution={resolution}"
        else:
            held_out = None
            if val_split is not None:
                held_out = HFImageDataset(
                    name, resolution, val_split, image_column, caption_column, label_column, True, False, cache_dir
                )
            dataset = HFImageDataset(
                name,
                resolution,
                split,
                image_column,
                caption_column,
                label_column,
                center_crop,
                random_flip,
                cache_dir,
                _plain(buckets),
            )
            identity = f"hf|{name}|{split}|rows={len(dataset)}|{image_column}|{caption_column}|resolution={resolution}"
            if dataset.buckets is not None:
                identity += f"|buckets={dataset.buckets}"
        super().__init__(
            dataset,
            batch_size,
            num_workers,
            pin_memory,
            persistent_workers,
            cache_latents,
            latent_cache_dir,
            identity,
            random_views=random_flip or not center_crop,
            val_dataset=held_out,
            streamed=streaming,
        )

    def train_dataloader(self) -> DataLoader:
        if self.ledger is None:
            return super().train_dataloader()

        def stream(rank: int, world_size: int) -> HFStream:
            return HFStream(
                self.source,
                self.transform,
                self.batch_size,
                self.order_seed,
                rank,
                world_size,
                self.ledger.num_streams,
                *self.columns,
                self.shuffle_buffer,
                self.skip_bad,
            )

        self.stream, loader = start_stream(self, self.ledger, stream)
        return loader

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return batch if self.ledger is None else record_stream_state(self, self.ledger, batch)

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() if self.ledger is None else stream_state(self, self.ledger, self.stream)

    def check_resume(self, state_dict: dict[str, Any], world_size: int) -> None:
        if self.ledger is not None:
            self.ledger.check_layout(state_dict, world_size)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.ledger is None:
            super().load_state_dict(state_dict)
        else:
            self.ledger.load_state_dict(state_dict)


class ShardsDataModule(ImageDataModule):
    """WebDataset tar shards streamed from local paths, https:// or s3:// (`data=shards data.urls=...`): each rank and
    loader worker reads its own shards, and a resumed run continues at the sample it stopped at (data/shard_stream.py).
    """

    def __init__(
        self,
        urls: str | list[str],  # shard URLs: 'DIR/train-{000000..000099}.tar', 's3://b/x-{0..9}.tar', or a list
        resolution: int = 32,  # output side in pixels
        center_crop: bool = True,  # centre crop; false takes a random crop
        random_flip: bool = False,  # horizontal flip
        caption_key: str | None = "txt",  # each sample's caption member; null: images only (no caption needed)
        skip_bad: bool = True,  # skip and count bad samples and unreadable shards (train.log); false: stop at the first
        shard_retries: int = 2,  # further attempts at a shard that fails to read before it is skipped
        reference_size: int = 1000,  # samples (the first, in URL order) for FID statistics, previews and captions
        batch_size: int = 64,  # per-device batch size
        num_workers: NonNegativeInt = 2,  # loader processes, each reading its own shards (as many per rank)
        pin_memory: bool = False,  # page-locked batches
        val_urls: str | list[str] | None = None,  # held-out shards for val/loss (their first val_size samples)
        val_size: int = 256,  # held-out samples read from val_urls
        buckets: BucketSpec | None = None,  # aspect-ratio buckets (data/buckets.py); None: square crops at resolution
        cache_latents: bool = False,  # latent models: the shards' stored latents (shard --vae) and text states
    ) -> None:
        if cache_latents and buckets:
            raise ConfigError("data.cache_latents=true with data.buckets: shards store latents of square crops only")
        self.urls = shard_urls(_plain(urls))
        self.serve_latents = False  # use_latent_cache switches it on once the shards' VAE is the model's
        self.serve_text_states = False  # and this once their text encoder is the model's (frozen) one
        self.bucket_list: list[Bucket] | None = bucket_sizes(_plain(buckets), resolution) if buckets else None
        self.transform = ImageTransform(resolution, center_crop, random_flip)
        self.caption_key, self.skip_bad, self.shard_retries = caption_key, skip_bad, shard_retries
        # Read now, before anything is written: the first shard must open, and what needs indexed samples has them.
        # square crops, for FID and previews
        head = ShardHead(self.urls, self.transform, caption_key, reference_size, skip_bad)
        if len(head) == 0:  # reads the first shards now, so an unreadable one stops the run before it writes anything
            raise ValueError(f"no usable sample in the shards of data.urls={urls!r} (each skipped: see the log)")
        head.buckets = self.bucket_list  # what the methods check their nets against (ImageDataModule.buckets)
        held_out = None
        if val_urls is not None:
            plain = ImageTransform(resolution, center_crop=True, random_flip=False)
            held_out = ShardHead(shard_urls(_plain(val_urls)), plain, caption_key, val_size, skip_bad)
        identity = f"shards|{self.urls[0]}..{self.urls[-1]}|shards={len(self.urls)}|resolution={resolution}"
        super().__init__(
            head,
            batch_size,
            num_workers,
            pin_memory,
            persistent_workers=False,  # the stream is endless: one loader iterator serves the whole run
            cache_latents=cache_latents,
            identity=identity,
            random_views=random_flip or not center_crop,
            val_dataset=held_out,
            streamed=True,
        )
        self.stream: ShardStream | None = None
        self.ledger = StreamLedger(max(1, num_workers))

    def train_dataloader(self) -> DataLoader:
        def stream(rank: int, world_size: int) -> ShardStream:
            return ShardStream(
                self.urls,
                self.transform,
                self.batch_size,
                self.order_seed,
                rank,
                world_size,
                self.ledger.num_streams,
                self.caption_key,
                self.skip_bad,
                self.shard_retries,
                self.bucket_list,
                self.serve_latents,
                self.serve_text_states,
            )

        self.stream, loader = start_stream(self, self.ledger, stream)
        return loader

    def use_latent_cache(
        self,
        vae: AutoencoderKL,
        text_encoder_fingerprint: str | None = None,
        encode_prompts: Callable[[list[str]], torch.Tensor] | None = None,
    ) -> None:
        """Serve the latents the shards store (`python -m lightdiff.data.shard --vae`), once they are checked to be
        this VAE's at this resolution, and their text states (`--text-encoder`) where the model's text encoder is frozen
        and is theirs; shards without text states leave the captions to be encoded each step."""
        first = self.source_dataset.first_readable or self.urls[0]  # a truncated first shard skipped (skip_bad)
        record, text_record = stored_records(first)
        if record is None:
            raise ConfigError(
                f"data.cache_latents=true: shard {self.urls[0]} stores no latents; write the shards with "
                "python -m lightdiff.data.shard SRC OUT --vae VAE --resolution R, or set data.cache_latents=false"
            )
        if record["vae"] != vae_fingerprint(vae) or record["resolution"] != self.resolution:
            raise ConfigError(
                f"data.cache_latents=true: shard {self.urls[0]} stores latents of another VAE or resolution "
                f"(VAE {record['vae']} at {record['resolution']} px; the model's VAE is {vae_fingerprint(vae)}, "
                f"data.resolution={self.resolution}): write them with the model's VAE, or set data.cache_latents=false"
            )
        self.serve_latents = True
        if text_encoder_fingerprint is None:  # no text, or an encoder that trains: its states change every step
            return
        if text_record is None:
            log.info("shards store no text states (shard --text-encoder): captions are encoded every step")
            return
        if text_record["encoder"] != text_encoder_fingerprint or text_record["caption"] != self.caption_key:
            # refused rather than ignored: a cluster run meant to encode nothing would quietly encode every caption
            raise ConfigError(
                f"data.cache_latents=true: shard {self.urls[0]} stores text states of another text encoder or caption "
                f"(encoder {text_record['encoder']}, caption {text_record['caption']!r}; the model's encoder is "
                f"{text_encoder_fingerprint}, data.caption_key={self.caption_key!r}): write the shards with "
                "--text-encoder set to the run's model.pretrained, or without --text-encoder"
            )
        self.serve_text_states = True

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return record_stream_state(self, self.ledger, batch)

    def state_dict(self) -> dict[str, Any]:
        return stream_state(self, self.ledger, self.stream)

    def check_resume(self, state_dict: dict[str, Any], world_size: int) -> None:
        self.ledger.check_layout(state_dict, world_size)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.ledger.load_state_dict(state_dict)


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
