"""Training from WebDataset tar shards (`data=shards`), streamed, split over ranks and loader workers, resumable at the
sample.

A shard is a tar file in the layout LAION-scale sets are distributed in (img2dataset's output): `KEY.jpg` (or png,
webp), `KEY.txt` (the caption) and `KEY.json` (the original width and height, ...) per sample. The tar files are
opened and parsed by the `webdataset` library (`url_opener`, `tar_file_expander`, `group_by_keys`), so every URL form
it knows works: local paths, `https://` (curl), `pipe:COMMAND`, `gs://`; `s3://` is read through `aws s3 cp` as
webdataset's documentation does it (`S3_COMMAND`).

The order (why it is resumable at the sample). Each rank's loader has S = max(1, data.num_workers) streams, one per
worker (data/streams.py: how batches, workers and checkpoints meet). In epoch e the shard list is permuted by
randperm(seed + e); stream s of rank r of R takes shards [r * S + s :: R * S] of that order and streams each one's
samples through a shuffle buffer of `data.shuffle_buffer` raw samples (webdataset's `shuffle`, made replayable): the
buffer fills in file order, and each sample served is drawn from it by a generator seeded by (seed, e, shard), its
place taken by the next one read; at the shard's end the buffer drains the same way. A stream holds at most that
many samples' bytes, not the shard (img2dataset writes 10k-sample shards). So a stream's position is its read cursor
(epoch, shard, samples served from it) and, with aspect-ratio buckets, the places of the samples read but still
waiting for their bucket's batch: a resumed stream replays the draws (without decoding) and re-reads one shard (plus
those of its waiting samples), not the epoch. `data.shuffle_buffer=null` reads each shard whole and serves it in one
permutation (the order before streaming; resuming a checkpoint needs the order it was made with, checked).

Bad data: a sample whose image cannot be decoded, or that has no image or no caption, is skipped and counted; a
shard that cannot be read is retried `shard_retries` times (a local file that is not there: not retried; a read that
fails part-way is retried from the start, past the samples already served) and then skipped and counted (what it
served before it failed stays served). The count and the shard and key of each go to train.log
(`data.skip_bad=false` stops at the first instead).
"""

from __future__ import annotations

import importlib
import io
import itertools
import json
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

from lightdiff.config import ConfigError, NonNegativeInt, PositiveInt
from lightdiff.data.buckets import Bucket, BucketSpec, bucket_sizes, nearest_bucket, smaller_than_every_bucket
from lightdiff.data.datamodule import ImageDataModule, plain, record_stream_state, start_stream, stream_state
from lightdiff.data.image_folder import too_many_pixels
from lightdiff.data.latent_cache import vae_fingerprint
from lightdiff.data.streams import Stream, StreamLedger, collate
from lightdiff.data.transforms import ImageTransform

if TYPE_CHECKING:
    from lightdiff.nets.families.base import FirstFrameEncoding

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # the image member of a sample: the first of these present
# webdataset has no s3 opener of its own; its documentation streams s3 shards through the AWS command line
S3_COMMAND = "pipe:aws s3 cp {url} -"


def _open_s3(url: str, mode: str = "rb", bufsize: int = 8192, **options: object) -> object:
    if mode != "rb":
        raise ValueError(f"{url}: shards on s3 are read-only here (mode {mode!r})")
    return GOPEN.gopen(S3_COMMAND.format(url=url), mode, bufsize)


# webdataset.gopen the function shadows the module of the same name (`webdataset.gopen.gopen` is an AttributeError):
# import_module returns the module, with its dispatch table
GOPEN = importlib.import_module("webdataset.gopen")
GOPEN.gopen_schemes.setdefault("s3", _open_s3)


def shard_urls(urls: str | list[str]) -> list[str]:
    """The shard URLs of `data.urls`: brace patterns expanded ('train-{000000..000099}.tar'), '::' separating sets."""
    patterns = [urls] if isinstance(urls, str) else list(urls)
    expanded = []
    for pattern in patterns:
        try:
            expanded += expand_urls(str(pattern))
        except ValueError as error:  # braceexpand's UnbalancedBracesError: say which key and pattern
            raise ConfigError(
                f"data.urls={pattern!r} is not a shard pattern: {error} (a range is written 'train-{{000..099}}.tar')"
            ) from None
    if not expanded:
        raise ValueError(f"data.urls={urls!r} names no shard")
    return expanded


class BadSample(ValueError):
    """A sample that cannot be trained on; the message names the shard and key."""


class UnreadableShard(OSError):
    """A shard that could not be read after its retries; the message names it."""


def shard_members(url: str, retries: int = 2, retry_delay: float = 1.0) -> Iterator[dict]:
    """The raw samples of one shard in file order ({"__key__", "__url__", "jpg": bytes, "txt": bytes, ...}), streamed:
    one sample's bytes at a time. A read that fails is retried from the start, skipping what was already given."""
    given = 0
    for attempt in range(retries + 1):
        try:
            for index, sample in enumerate(group_by_keys(tar_file_expander(url_opener([{"url": url}])))):
                if index >= given:
                    given += 1
                    yield sample
            return
        except FileNotFoundError as error:  # a local path that does not exist will not appear on a retry
            raise UnreadableShard(f"cannot read shard {url}: no such file") from error
        except Exception as error:  # noqa: BLE001 - any failure of the reader or transport: retried, then named
            if attempt == retries:
                raise UnreadableShard(f"cannot read shard {url} ({retries + 1} attempts): {error}") from error
            log.warning("reading shard %s failed after %d sample(s) (%s); retrying", url, given, error)
            time.sleep(retry_delay)


def read_shard(url: str, retries: int = 2, retry_delay: float = 1.0) -> list[dict]:
    """The raw samples of one shard in file order, read whole (data.shuffle_buffer=null; tools and tests)."""
    return list(shard_members(url, retries, retry_delay))


def decode_sample(
    raw: dict,
    transform: ImageTransform,
    caption_key: str | None,
    buckets: list[Bucket] | None = None,
    latents: bool = False,
    text_states: bool = False,
) -> dict[str, object]:
    """One training item from a raw sample, as the image data sets give it, at the nearest of `buckets` in aspect
    ratio (its index as "bucket"; 0 without buckets), or with `latents` its stored latent moments (as the latent
    cache serves them) instead of its pixels, and with `text_states` its caption's stored text states too;
    BadSample naming shard and key."""
    where = f"sample {raw.get('__key__')!r} of shard {raw.get('__url__')}"
    if latents:
        return _stored_latents(raw, where, caption_key, text_states)
    extension = next((extension for extension in IMAGE_EXTENSIONS if extension in raw), None)
    if extension is None:
        raise BadSample(f"{where} has no image ({', '.join(IMAGE_EXTENSIONS)}); it has {sorted(raw)}")
    text = _caption(raw, where, caption_key)
    bucket = 0
    try:
        with Image.open(io.BytesIO(raw[extension])) as image:
            reason = too_many_pixels(image)  # from the header: a decompression bomb is never decoded
            if reason is not None:
                raise BadSample(f"{where}: refused as a possible decompression bomb: {reason}")
            if buckets is not None:
                if smaller_than_every_bucket(image.height, image.width, buckets):
                    raise BadSample(f"{where} is {image.height}x{image.width}, smaller than every bucket")
                bucket = nearest_bucket(image.height, image.width, buckets)
            image.load()
            before = torch.random.get_rng_state()  # a pair's sources take the target's crop and flip
            pixels, size_and_crop = transform(image, buckets[bucket] if buckets is not None else None)
        sources = _sources(raw, transform, buckets[bucket] if buckets is not None else None, before, where)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as error:
        if isinstance(error, BadSample):
            raise
        raise BadSample(f"{where}: cannot decode its {extension}: {error}") from error
    label = -1
    if "json" in raw:
        try:
            label = int(json.loads(raw["json"]).get("label", -1))
        except (json.JSONDecodeError, AttributeError, TypeError, ValueError) as error:
            raise BadSample(f"{where}: its json is not a JSON object with an integer label: {error}") from error
    item = {"pixel_values": pixels, "size_and_crop": size_and_crop, "label": label, "text": text, "bucket": bucket}
    return item if sources is None else {**item, "source_pixel_values": sources}


def _sources(
    raw: dict, transform: ImageTransform, size: Bucket | None, before: torch.Tensor, where: str
) -> torch.Tensor | None:
    """An editing pair's source(s) (`source.png`, or `source.0.png`, ...), each cropped and flipped as its target
    was (the RNG state `before` the target's transform, replayed); None for a sample without one."""
    names = (
        ["source.png"]
        if "source.png" in raw
        else sorted(k for k in raw if k.startswith("source.") and k != "source.png")
    )
    if not names:
        return None
    after, views = torch.random.get_rng_state(), []
    for name in names:
        torch.random.set_rng_state(before)
        with Image.open(io.BytesIO(raw[name])) as source:
            reason = too_many_pixels(source)
            if reason is not None:
                raise BadSample(f"{where}: its {name} refused as a possible decompression bomb: {reason}")
            source.load()
            views.append(transform(source, size)[0])
    torch.random.set_rng_state(after)
    return views[0] if names == ["source.png"] else torch.stack(views)


def _caption(raw: dict, where: str, caption_key: str | None) -> str:
    if caption_key is None:
        return ""
    if caption_key not in raw:
        raise BadSample(f"{where} has no caption ({caption_key})")
    try:
        return raw[caption_key].decode("utf-8").strip()
    except UnicodeDecodeError as error:
        raise BadSample(f"{where}: caption {caption_key} is not UTF-8 ({error})") from None


def _stored_latents(raw: dict, where: str, caption_key: str | None, text_states: bool) -> dict[str, object]:
    if "moments.npy" not in raw:
        raise BadSample(f"{where} has no latents (moments.npy): its shard was written without --vae")
    if text_states and "text.npy" not in raw:
        raise BadSample(f"{where} has no text states (text.npy): written without a caption or --text-encoder")
    try:
        moments = torch.from_numpy(np.load(io.BytesIO(raw["moments.npy"]), allow_pickle=False).astype(np.float32))
        record = json.loads(raw["json"])
        size_and_crop = torch.tensor(record["latent"]["size_and_crop"])
        label = int(record.get("label", -1))
        states = np.load(io.BytesIO(raw["text.npy"]), allow_pickle=False) if text_states else None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise BadSample(f"{where}: unreadable latents, text states or json: {error}") from error
    text = _caption(raw, where, caption_key)
    item = {"latent_moments": moments, "size_and_crop": size_and_crop, "label": label, "text": text, "bucket": 0}
    if states is not None:
        item["text_states"] = torch.from_numpy(states.astype(np.float32))
    return item


def stored_records(url: str) -> tuple[dict | None, dict | None]:
    """What the first sample of shard `url` stores besides its image: its latent record ({"vae": fingerprint,
    "resolution", ...}; None without latents) and its text-states record ({"encoder": fingerprint, "caption": its
    member}; None without text states)."""
    first = next(shard_members(url), None)
    if first is None:
        raise ValueError(f"shard {url} holds no sample")
    record = json.loads(first["json"]) if "json" in first else {}
    latent = record.get("latent") if "moments.npy" in first else None
    text = record.get("text_states") if "text.npy" in first else None
    return latent, text


@dataclass
class StreamPosition:
    """Where a stream stands: the next sample is sample `sample` (in the shard's shuffled order) of the `shard`-th
    shard of the stream's share of epoch `epoch`."""

    epoch: int = 0
    shard: int = 0
    sample: int = 0


def sample_order(seed: int, epoch: int, shard_index: int, count: int) -> list[int]:
    """The order a shard's samples are served in: a function of the run's seed, the epoch and the shard's index in
    the URL list only (so every rank, worker and resumed run agrees)."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000_003 + shard_index)
    return torch.randperm(count, generator=generator).tolist()


class ShardStream(Stream):
    """Endless batches of one rank, each made by one loader worker from its own shards (see the module docstring)."""

    def __init__(
        self,
        urls: list[str],  # every shard of the data set
        transform: ImageTransform,
        batch_size: int,  # per rank
        seed: int,  # the run's seed: shard order of epoch e and each shard's sample order follow it
        rank: int = 0,
        world_size: int = 1,
        num_streams: int = 1,  # = max(1, loader workers)
        caption_key: str | None = "txt",  # a sample's caption member; None: images only
        skip_bad: bool = True,  # skip and count bad samples and unreadable shards; false: stop at the first
        shard_retries: int = 2,
        buckets: list[Bucket] | None = None,  # aspect-ratio buckets: every batch one bucket (data/buckets.py)
        latents: bool = False,  # serve the samples' stored latent moments instead of their pixels
        text_states: bool = False,  # with `latents`: serve the captions' stored text states too
        shuffle_buffer: int | None = 1000,  # raw samples a stream holds to shuffle a shard; None: each shard whole
    ) -> None:
        if len(urls) < world_size * num_streams:
            raise ValueError(
                f"{len(urls)} shard(s) for {world_size} rank(s) x {num_streams} loader stream(s) "
                "(data.num_workers, at least 1): every stream needs a shard of its own; write more, smaller shards "
                "(python -m lightdiff.data.shard --max-count) or lower data.num_workers"
            )
        super().__init__(batch_size, seed, rank, world_size, num_streams)
        self.urls, self.transform = urls, transform
        self.caption_key, self.skip_bad, self.shard_retries = caption_key, skip_bad, shard_retries
        self.buckets, self.latents, self.text_states = buckets, latents, text_states
        self.shuffle_buffer = shuffle_buffer

    def shards_of(self, stream: int, epoch: int) -> list[int]:
        """Indices into `urls` of the shards stream `stream` of this rank reads in `epoch`, in order."""
        order = torch.randperm(len(self.urls), generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        streams_in_all = self.world_size * self.num_streams
        return order[self.rank * self.num_streams + stream :: streams_in_all]

    def batches(self, stream: int, start: dict[str, list] | None) -> Iterator[dict[str, object]]:
        """Batches of `stream` from `start` = {"cursor": [epoch, shard, sample], "pending": [[epoch, shard, sample],
        ...]}: the next draw (samples served from the shard so far), and the draws read but not yet served (waiting in
        their bucket for a batch), in the order they were read. Every batch carries the state after it."""
        cursor = StreamPosition(*start["cursor"]) if start is not None else StreamPosition()
        pending: dict[int, list[tuple[dict[str, object], list[int]]]] = {}  # bucket -> (item, where it was read)
        for where, raw in self._read_again(stream, start["pending"] if start is not None else []):
            item = self._decode(raw)
            pending.setdefault(int(item.pop("bucket")), []).append((item, where))
        skipped_samples = skipped_shards = 0  # since the last batch
        while True:
            shards = self.shards_of(stream, cursor.epoch)
            while cursor.shard < len(shards):
                try:
                    draws = itertools.islice(self.draws(cursor.epoch, shards[cursor.shard]), cursor.sample, None)
                    for raw, last in _marking_the_last(draws):
                        where = [cursor.epoch, cursor.shard, cursor.sample]
                        cursor.sample += 1
                        try:
                            item = self._decode(raw)
                        except BadSample as error:
                            if not self.skip_bad:
                                raise
                            log.warning("skipping %s", error)
                            skipped_samples += 1
                            continue
                        waiting = pending.setdefault(int(item.pop("bucket")), [])
                        waiting.append((item, where))
                        if len(waiting) == self.batch_size:
                            batch = [item for item, _ in waiting]
                            waiting.clear()
                            # a shard served to its end is left for the next one
                            after = [cursor.epoch, cursor.shard + 1, 0] if last else [*where[:2], cursor.sample]
                            still = sorted(where for items in pending.values() for _, where in items)
                            state = {"cursor": after, "pending": still}
                            yield collate(batch, stream, state, skipped_samples, skipped_shards)
                            skipped_samples, skipped_shards = 0, 0
                except UnreadableShard:
                    if not self.skip_bad:
                        raise
                    log.exception(
                        "skipping shard %s (from its sample %d on)", self.urls[shards[cursor.shard]], cursor.sample
                    )
                    skipped_shards += 1
                cursor = StreamPosition(cursor.epoch, cursor.shard + 1)
            cursor = StreamPosition(cursor.epoch + 1)

    def draws(self, epoch: int, shard_index: int) -> Iterator[dict]:
        """Shard `shard_index`'s raw samples in the order epoch `epoch` serves them (module docstring): a function of
        the run's seed, the epoch and the shard only, so every rank, worker and resumed run agrees."""
        members = shard_members(self.urls[shard_index], self.shard_retries)
        if self.shuffle_buffer is None:  # read whole, one permutation
            whole = list(members)
            return (whole[index] for index in sample_order(self.seed, epoch, shard_index, len(whole)))
        seed = (self.seed * 1_000_003 + epoch) * 1_000_003 + shard_index
        return buffered_draws(members, self.shuffle_buffer, random.Random(seed))

    def _decode(self, raw: dict) -> dict[str, object]:
        return decode_sample(raw, self.transform, self.caption_key, self.buckets, self.latents, self.text_states)

    def _read_again(self, stream: int, places: list[list[int]]) -> Iterator[tuple[list[int], dict]]:
        """The raw samples drawn at `places` ([epoch, shard, sample] of `stream`, in reading order): a resumed stream's
        samples that were waiting in their buckets; each shard they lie in is drawn again up to the last of them."""
        wanted: dict[tuple[int, int], set[int]] = {}
        for epoch, shard, sample in places:
            wanted.setdefault((epoch, shard), set()).add(sample)
        found: dict[tuple[int, int, int], dict] = {}
        for (epoch, shard), samples in wanted.items():
            draws = self.draws(epoch, self.shards_of(stream, epoch)[shard])
            for sample, raw in enumerate(itertools.islice(draws, max(samples) + 1)):
                if sample in samples:
                    found[epoch, shard, sample] = raw
        for epoch, shard, sample in places:
            yield [epoch, shard, sample], found[epoch, shard, sample]


def buffered_draws(members: Iterator[dict], size: int, generator: random.Random) -> Iterator[dict]:
    """`members` through a shuffle buffer of `size`: filled in order; when full, one drawn uniformly (by `generator`)
    is served and the next member read takes its place; at the end the rest drain in drawn order. Holds at most
    `size` members; with `size` >= the shard's length the order is a uniform permutation of the shard."""
    buffer: list[dict] = []

    def draw() -> dict:
        chosen = generator.randrange(len(buffer))
        buffer[chosen], buffer[-1] = buffer[-1], buffer[chosen]
        return buffer.pop()

    for member in members:
        buffer.append(member)
        if len(buffer) == size:
            yield draw()
    while buffer:
        yield draw()


def _marking_the_last(items: Iterator[dict]) -> Iterator[tuple[dict, bool]]:
    """(item, whether it is the last) for each of `items` (one read ahead)."""
    previous = next(items, None)
    while previous is not None:
        following = next(items, None)
        yield previous, following is None
        previous = following


class ShardHead(Dataset):
    """The first `size` good samples of the shards in URL order, decoded on first use: what a stream has no index for
    (FID reference statistics, image-to-video first frames, preview captions)."""

    def __init__(
        self,
        urls: list[str],
        transform: ImageTransform,
        caption_key: str | None,
        size: int,
        skip_bad: bool = True,  # an unreadable shard (truncated, missing) is skipped, as the training stream skips it
        shard_retries: int = 2,  # as the training stream's: further attempts before a shard is skipped
    ) -> None:
        self.urls, self.transform, self.caption_key, self.size = urls, transform, caption_key, size
        self.skip_bad, self.shard_retries = skip_bad, shard_retries
        self.first_readable: str | None = None  # the first shard that could be read (what the others must match)
        self.resolution = transform.resolution
        self.buckets: list[Bucket] | None = None  # the training stream's buckets, if any (the head is square)
        self._items: list[dict[str, object]] | None = None

    def _read(self) -> list[dict[str, object]]:
        if self._items is None:
            items: list[dict[str, object]] = []
            unreadable: list[UnreadableShard] = []
            for url in self.urls:
                try:  # streamed: only the samples the head needs are read
                    for raw in shard_members(url, self.shard_retries):
                        self.first_readable = self.first_readable or url
                        try:
                            item = decode_sample(raw, self.transform, self.caption_key)
                        except BadSample:
                            continue
                        del item["bucket"]
                        items.append(item)
                        if len(items) == self.size:
                            break
                except UnreadableShard as error:
                    if not self.skip_bad:
                        raise
                    log.warning("data.skip_bad: skipping shard %s", error)
                    unreadable.append(error)
                if len(items) == self.size:
                    break
            if self.first_readable is None and unreadable:
                raise UnreadableShard(f"no shard of data.urls can be read; the first: {unreadable[0]}")
            self._items = items
        return self._items

    def __len__(self) -> int:
        return len(self._read())

    def __getitem__(self, index: int) -> dict[str, object]:
        return self._read()[index]

    def captions(self) -> list[str]:
        return [str(item["text"]) for item in self._read() if item["text"]]


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
        # raw samples each stream holds to shuffle a shard (webdataset's shuffle buffer); null: each shard read whole
        shuffle_buffer: PositiveInt | None = 1000,
    ) -> None:
        if cache_latents and buckets:
            raise ConfigError("data.cache_latents=true with data.buckets: shards store latents of square crops only")
        self.urls = shard_urls(plain(urls))
        self.serve_latents = False  # use_latent_cache switches it on once the shards' VAE is the model's
        self.serve_text_states = False  # and this once their text encoder is the model's (frozen) one
        self.bucket_list: list[Bucket] | None = bucket_sizes(plain(buckets), resolution) if buckets else None
        self.transform = ImageTransform(resolution, center_crop, random_flip)
        self.caption_key, self.skip_bad, self.shard_retries = caption_key, skip_bad, shard_retries
        self.shuffle_buffer = shuffle_buffer
        # Read now, before anything is written: the first shard must open, and what needs indexed samples has them.
        # square crops, for FID and previews
        head = ShardHead(self.urls, self.transform, caption_key, reference_size, skip_bad, shard_retries)
        if len(head) == 0:  # reads the first shards now, so an unreadable one stops the run before it writes anything
            raise ValueError(f"no usable sample in the shards of data.urls={urls!r} (each skipped: see the log)")
        head.buckets = self.bucket_list  # what the methods check their nets against (ImageDataModule.buckets)
        held_out = None
        if val_urls is not None:
            square = ImageTransform(resolution, center_crop=True, random_flip=False)
            held_out = ShardHead(shard_urls(plain(val_urls)), square, caption_key, val_size, skip_bad, shard_retries)
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
                self.shuffle_buffer,
            )

        self.stream, loader = start_stream(self, self.ledger, stream)
        return loader

    def use_latent_cache(
        self,
        vae: AutoencoderKL,
        text_encoder_fingerprint: str | None = None,
        encode_prompts: Callable[[list[str]], torch.Tensor] | None = None,
        first_frames: FirstFrameEncoding | None = None,
    ) -> None:
        """Serve the latents the shards store (`python -m lightdiff.data.shard --vae`), once they are checked to be
        this VAE's at this resolution, and their text states (`--text-encoder`) where the model's text encoder is frozen
        and is theirs; shards without text states leave the captions to be encoded each step."""
        if first_frames is not None:
            raise ConfigError(
                "data.cache_latents=true with shards serves the latents they store, and shards store no image-to-video "
                "first-frame condition: set data.cache_latents=false (or train from a data set the cache can encode)"
            )
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
        state = stream_state(self, self.ledger, self.stream)
        return {**state, "shuffle_buffer": self.shuffle_buffer} if state else state

    def check_resume(self, state_dict: dict[str, Any], world_size: int) -> None:
        self.ledger.check_layout(state_dict, world_size)
        if not state_dict:
            return
        # a checkpoint from before the shuffle buffer (no key) served each shard whole, in one permutation: null
        saved, mine = (json.dumps(size) for size in (state_dict.get("shuffle_buffer"), self.shuffle_buffer))
        if saved != mine:
            raise ConfigError(
                f"the checkpoint's shard order was made with data.shuffle_buffer={saved}; this run says {mine}: resume "
                f"with data.shuffle_buffer={saved} (positions within a shard depend on it)"
            )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.ledger.load_state_dict(state_dict)
