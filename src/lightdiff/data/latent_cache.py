"""Latent caching: encode a data set once through a frozen VAE (and a frozen text encoder) and train from the store.

The latent cache holds each image's posterior moments (mean and log-variance of q(z | x)), so training still draws
a fresh z ~ q(z | x) every step, as it does when encoding on the fly. Its file name is a hash of the data set's
identity (source, size, resolution, preprocessing) and of the VAE (config and weights).

The text cache, made only when the text encoder is frozen, holds the encoder's hidden states of each distinct
caption once (a data set of 24 captions stores 24 entries, however many images it has) and, per image, which entry
is its caption. Its key is the data set's identity and a hash of the tokenizer and the text encoder. The two caches
are separate files, so changing the text encoder keeps the latents and changing the VAE keeps the text states.
Both are stored as float16 (half the disk and memory; the difference is below the noise the model is trained on).

The first-frame cache, made for an image-to-video model whose condition is a function of each clip's first frame and
the frozen VAE alone (Wan's: the frame and black frames through the VAE, `FirstFrameEncoding`), holds that condition
per clip, so such a model trains from cached latents too (musubi-tuner caches Wan's image latents likewise). Its key
is the data set's identity and the encoding's fingerprint (the VAE's weights and the conditioning's kind).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from lightdiff.files import save_atomically
from lightdiff.nets.vae import Autoencoder, posterior_moments, vae_fingerprint

if TYPE_CHECKING:
    from lightdiff.nets.families.base import FirstFrameEncoding

log = logging.getLogger(__name__)


def _cache_path(cache_dir: Path, kind: str, *parts: str) -> Path:
    return Path(cache_dir) / f"{kind}-{hashlib.sha256('|'.join(parts).encode()).hexdigest()[:20]}.pt"


class LatentCacheDataset(Dataset):
    """Items {"latent_moments": (2C, h, w), "size_and_crop": (6,), "label", "text"} (+ "text_states": (tokens, width)
    once a text cache is attached; + "source_latent_moments" of an editing pair's source(s)) in the order of the data
    set they were encoded from; a clip's moments are in `lightdiff.nets.vae.posterior_moments`' layout."""

    def __init__(
        self,
        moments: torch.Tensor | list[torch.Tensor],  # (N, 2C, h, w), or N tensors of their buckets' sizes
        labels: torch.Tensor,
        texts: list[str],
        resolution: int,
        sizes_and_crops: torch.Tensor | None = None,  # (N, 6); None (a cache from before they were kept): uncropped
        source_moments: list[torch.Tensor] | None = None,  # editing pairs: each target's source(s)' moments
    ) -> None:
        self.moments = moments
        self.source_moments = source_moments
        self.labels = labels
        self.texts = texts
        if sizes_and_crops is None:
            sizes_and_crops = torch.tensor([resolution, resolution, 0, 0, resolution, resolution]).expand(
                len(moments), 6
            )
        self.sizes_and_crops = sizes_and_crops
        self.resolution = resolution  # of the images the latents encode
        self.text_states: torch.Tensor | None = None  # (distinct captions, tokens, width)
        self.text_index: torch.Tensor | None = None  # (images,): the row of text_states of each image's caption
        self.first_frames: torch.Tensor | None = None  # (clips, ...): each clip's image-to-video condition

    def attach_text_states(self, states: torch.Tensor, index: torch.Tensor) -> None:
        if len(index) != len(self):
            raise ValueError(f"text cache of {len(index)} images for a latent cache of {len(self)}")
        self.text_states, self.text_index = states, index

    def attach_first_frames(self, conditions: torch.Tensor) -> None:
        if len(conditions) != len(self):
            raise ValueError(f"first-frame cache of {len(conditions)} clips for a latent cache of {len(self)}")
        self.first_frames = conditions

    def __len__(self) -> int:
        return len(self.moments)

    def __getitem__(self, index: int) -> dict[str, object]:
        item: dict[str, object] = {
            "latent_moments": self.moments[index].float(),
            "size_and_crop": self.sizes_and_crops[index],
            "label": int(self.labels[index]),
            "text": self.texts[index],
        }
        if self.text_states is not None and self.text_index is not None:
            item["text_states"] = self.text_states[self.text_index[index]].float()
        if self.source_moments is not None:
            item["source_latent_moments"] = self.source_moments[index].float()
        if self.first_frames is not None:
            item["first_frame_condition"] = self.first_frames[index].float()
        return item

    def captions(self) -> list[str]:
        return [text for text in self.texts if text]


@torch.no_grad()
def cached_latents(
    dataset: Dataset, identity: str, vae: Autoencoder, cache_dir: Path, batch_size: int = 64
) -> LatentCacheDataset:
    """Load the cache of (`identity`, `vae`) from `cache_dir`, or encode `dataset` and write it (atomically)."""
    path = _cache_path(cache_dir, "latents", identity, vae_fingerprint(vae))
    resolution = int(dataset.resolution)
    if path.exists():
        stored = torch.load(path, map_location="cpu", weights_only=True)
        log.info("latent cache hit: %s (%d images)", path, len(stored["moments"]))
        return LatentCacheDataset(
            stored["moments"],
            stored["labels"],
            stored["texts"],
            resolution,
            stored.get("sizes_and_crops"),
            stored.get("source_moments"),
        )
    log.info("latent cache miss: encoding %d images into %s", len(dataset), path)
    count = len(dataset)
    moments: list[torch.Tensor | None] = [None] * count
    sources: list[torch.Tensor | None] = [None] * count  # editing pairs' sources, encoded with their targets
    labels, texts = torch.zeros(count, dtype=torch.long), [""] * count
    uncropped = torch.tensor([resolution, resolution, 0, 0, resolution, resolution])
    sizes_and_crops = uncropped.repeat(count, 1)  # what LatentCacheDataset assumes where none were kept
    device = next(vae.parameters()).device
    # One bucket at a time (data/buckets.py): a batch must be one size; without buckets, one group of everything.
    bucket_of = getattr(dataset, "bucket_of", None) or [0] * count
    for bucket in sorted(set(bucket_of)):
        indices = [index for index in range(count) if bucket_of[index] == bucket]
        done = 0
        for batch in DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False):
            pixels = batch["pixel_values"].to(device, vae.dtype)  # the VAE may be half precision (frozen_dtype)
            encoded = posterior_moments(vae, pixels).half().cpu()  # images' or clips' (lightdiff.nets.vae)
            source_moments = None
            if "source_pixel_values" in batch:  # (B, 3, H, W), or (B, K, 3, H, W) for K references
                source_pixels = batch["source_pixel_values"].to(device, vae.dtype)
                flat = source_pixels.flatten(0, source_pixels.ndim - 4)
                source_moments = posterior_moments(vae, flat).half().cpu().unflatten(0, source_pixels.shape[:-3])
            for offset, index in enumerate(indices[done : done + len(encoded)]):
                moments[index] = encoded[offset]
                if source_moments is not None:
                    sources[index] = source_moments[offset]
                labels[index] = int(batch["label"][offset])
                texts[index] = batch["text"][offset]
                if "size_and_crop" in batch:  # images' SDXL micro-conditioning; clips have none
                    sizes_and_crops[index] = batch["size_and_crop"][offset]
            done += len(encoded)
    shapes = {tuple(moment.shape) for moment in moments}
    # one tensor when every image has one size; a list of per-image tensors across buckets
    stacked: torch.Tensor | list[torch.Tensor] = torch.stack(moments) if len(shapes) == 1 else list(moments)
    paired = list(sources) if sources[0] is not None else None
    stored = {
        "moments": stacked,
        "labels": labels,
        "texts": texts,
        "sizes_and_crops": sizes_and_crops,
        "identity": identity,
        "source_moments": paired,
    }
    save_atomically(stored, path)
    return LatentCacheDataset(stacked, labels, texts, resolution, sizes_and_crops, paired)


@torch.no_grad()
def cached_text_states(
    texts: Sequence[str],
    identity: str,
    encoder_fingerprint: str,
    encode: Callable[[list[str]], torch.Tensor],
    cache_dir: Path,
    batch_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(states of each distinct caption (U, tokens, width), row of each of `texts` (N,)), loaded from `cache_dir`
    or made with `encode` (prompts -> hidden states, the method's own encoding) and written atomically."""
    path = _cache_path(cache_dir, "text", identity, encoder_fingerprint)
    if path.exists():
        stored = torch.load(path, map_location="cpu", weights_only=True)
        log.info("text cache hit: %s (%d distinct captions)", path, len(stored["captions"]))
        return stored["states"], stored["index"]
    distinct = sorted(set(texts))
    log.info("text cache miss: encoding %d distinct captions into %s", len(distinct), path)
    states = torch.cat([encode(distinct[i : i + batch_size]).half().cpu() for i in range(0, len(distinct), batch_size)])
    row = {caption: index for index, caption in enumerate(distinct)}
    index = torch.tensor([row[text] for text in texts], dtype=torch.int64)
    save_atomically({"states": states, "index": index, "captions": distinct, "identity": identity}, path)
    return states, index


@torch.no_grad()
def cached_first_frames(
    dataset: Dataset, identity: str, encoding: FirstFrameEncoding, cache_dir: Path, batch_size: int = 64
) -> torch.Tensor:
    """Each clip's image-to-video condition (N, ...) in the order of `dataset`, loaded from `cache_dir` or made with
    `encoding` from the clips and written atomically."""
    path = _cache_path(cache_dir, "first-frames", identity, encoding.fingerprint)
    if path.exists():
        stored = torch.load(path, map_location="cpu", weights_only=True)
        log.info("first-frame cache hit: %s (%d clips)", path, len(stored["conditions"]))
        return stored["conditions"]
    log.info("first-frame cache miss: encoding %d clips' first frames into %s", len(dataset), path)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    conditions = torch.cat([encoding.encode(batch["pixel_values"]).half().cpu() for batch in loader])
    save_atomically({"conditions": conditions, "identity": identity}, path)
    return conditions
