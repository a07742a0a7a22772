"""A Hugging Face data set streamed (`data=hf data.streaming=true`): read as it trains, never downloaded whole, split
over ranks and loader workers, and resumable at the sample (data/streams.py).

Each stream k of the R x S streams of a run reads `datasets.distributed.split_dataset_by_node(ds, k, R x S)` (whole
files of the data set per stream when it has enough of them, else every (R S)-th example). In epoch e the stream's
files are shuffled by `IterableDataset.shuffle(seed, buffer_size)` at epoch e; its position after a batch is
(e, `IterableDataset.state_dict()`), which `datasets` restores exactly (file and example offset). The share is read
with `IterableDataset.iter`: iterated directly inside a loader worker, `datasets` would split it over the workers
once more. The one
approximation, as `datasets` documents it: with `data.shuffle_buffer` > 1 the examples waiting in the shuffle buffer
at a checkpoint are not saved, so a resumed stream skips them (at most that many examples per stream and resume);
`data.shuffle_buffer=1` (files shuffled, examples in file order) resumes bit-identically.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from lightdiff.config import ConfigError, NonNegativeInt
from lightdiff.data.buckets import BucketSpec
from lightdiff.data.datamodule import ImageDataModule, plain, record_stream_state, start_stream, stream_state
from lightdiff.data.image_folder import HFImageDataset
from lightdiff.data.streams import Stream, StreamLedger, collate
from lightdiff.data.transforms import ImageTransform

log = logging.getLogger(__name__)


def decode_example(
    example: dict[str, Any],
    transform: ImageTransform,
    image_column: str,
    caption_column: str | None,
    label_column: str | None,
) -> dict[str, object]:
    """One training item from a streamed example; ValueError naming what is wrong with it."""
    image = example.get(image_column)
    if not isinstance(image, Image.Image):
        raise ValueError(f"column {image_column!r} holds {type(image).__name__}, not an image")
    text = ""
    if caption_column is not None:
        text = str(example.get(caption_column) or "").strip()
        if not text:
            raise ValueError(f"no caption in column {caption_column!r}")
    try:
        image.load()
        pixels, size_and_crop = transform(image)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"cannot decode its image: {error}") from error
    label = int(example[label_column]) if label_column is not None else -1
    return {"pixel_values": pixels, "size_and_crop": size_and_crop, "label": label, "text": text}


class HFStream(Stream):
    """Endless batches of one rank from a streaming `datasets.IterableDataset` (see the module docstring)."""

    def __init__(
        self,
        dataset: Any,  # a datasets.IterableDataset (load_dataset(..., streaming=True))
        transform: ImageTransform,
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        num_streams: int,
        image_column: str,
        caption_column: str | None,
        label_column: str | None,
        shuffle_buffer: int,  # examples in the shuffle buffer; 1: files shuffled only (exact resume)
        skip_bad: bool,
    ) -> None:
        super().__init__(batch_size, seed, rank, world_size, num_streams)
        self.dataset, self.transform = dataset, transform
        self.columns = (image_column, caption_column, label_column)
        self.shuffle_buffer, self.skip_bad = shuffle_buffer, skip_bad

    def batches(self, stream: int, start: dict[str, Any] | None) -> Iterator[dict[str, object]]:
        from datasets.distributed import split_dataset_by_node

        share = split_dataset_by_node(
            self.dataset, rank=self.rank * self.num_streams + stream, world_size=self.world_size * self.num_streams
        )
        share = share.shuffle(seed=self.seed, buffer_size=max(1, self.shuffle_buffer))
        epoch, state = (start["epoch"], start["state"]) if start is not None else (0, None)
        items: list[dict[str, object]] = []
        skipped = 0
        while True:
            share.set_epoch(epoch)
            if state is not None:
                share.load_state_dict(state)
                state = None
            served = 0
            # .iter, not iteration: in a loader worker `datasets` would split the share over the workers again
            for index, row in enumerate(share.iter(batch_size=1)):
                example = {column: values[0] for column, values in row.items()}
                served += 1
                try:
                    items.append(decode_example(example, self.transform, *self.columns))
                except ValueError as error:
                    if not self.skip_bad:
                        raise ValueError(f"example {index} of stream {stream} (epoch {epoch}): {error}") from error
                    log.warning("skipping example %d of stream %d (epoch %d): %s", index, stream, epoch, error)
                    skipped += 1
                    continue
                if len(items) == self.batch_size:
                    yield collate(items, stream, {"epoch": epoch, "state": share.state_dict()}, skipped, 0)
                    items, skipped = [], 0
            if served == 0 and start is None and epoch == 0:
                raise ValueError(f"stream {stream} of rank {self.rank} has no examples: fewer examples than streams")
            epoch += 1


class HFHead(Dataset):
    """The first `size` good examples of a streamed data set, decoded on first use: what a stream has no index for
    (FID reference statistics, preview captions, a tokenizer built from captions)."""

    def __init__(
        self,
        dataset: Any,
        transform: ImageTransform,
        image_column: str,
        caption_column: str | None,
        label_column: str | None,
        size: int,
    ) -> None:
        self.resolution = transform.resolution
        self.items: list[dict[str, object]] = []
        for example in dataset:
            try:
                self.items.append(decode_example(example, transform, image_column, caption_column, label_column))
            except ValueError:
                continue
            if len(self.items) == size:
                break

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, object]:
        return self.items[index]

    def captions(self) -> list[str]:
        return [str(item["text"]) for item in self.items if item["text"]]


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
        source_column: str | None = None,  # editing pairs: the column of each target's source image (or images)
    ) -> None:
        self.ledger: StreamLedger | None = None  # streaming only
        if streaming:
            if buckets is not None or cache_latents:
                raise ConfigError("data.streaming=true: data.buckets and data.cache_latents need the data set whole")
            if source_column is not None:
                raise ConfigError(f"data.source_column={source_column!r}: editing pairs are read indexed, not streamed")
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
            square = ImageTransform(resolution, center_crop=True, random_flip=False)
            held_out = HFHead(streamed(val_split), square, *columns, val_size) if val_split is not None else None
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
                plain(buckets),
                source_column,
            )
            identity = f"hf|{name}|{split}|rows={len(dataset)}|{image_column}|{caption_column}|resolution={resolution}"
            identity += f"|source={source_column}" if source_column is not None else ""
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
