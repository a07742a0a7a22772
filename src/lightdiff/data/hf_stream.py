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
from torch.utils.data import Dataset

from lightdiff.data.streams import Stream, collate
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
