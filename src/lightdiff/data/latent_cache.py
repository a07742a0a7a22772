"""Latent caching: encode a data set once through a frozen VAE and train from the stored posteriors.

The cache holds each image's posterior moments (mean and log-variance of q(z | x)), so training still draws a fresh
z ~ q(z | x) every step, as it does when encoding on the fly. Its file name is a hash of the data set's identity
(source, size, resolution, preprocessing) and of the VAE (config and weights): change either and a new cache is made.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from torch.utils.data import DataLoader, Dataset

log = logging.getLogger(__name__)


def vae_fingerprint(vae: AutoencoderKL) -> str:
    """Hash of the VAE's config and weights."""
    digest = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class LatentCacheDataset(Dataset):
    """Items {"latent_moments": (2C, h, w), "label", "text"} in the order of the data set they were encoded from."""

    def __init__(self, moments: torch.Tensor, labels: torch.Tensor, texts: list[str], resolution: int) -> None:
        self.moments = moments
        self.labels = labels
        self.texts = texts
        self.resolution = resolution  # of the images the latents encode

    def __len__(self) -> int:
        return len(self.moments)

    def __getitem__(self, index: int) -> dict[str, object]:
        return {
            "latent_moments": self.moments[index].float(),
            "label": int(self.labels[index]),
            "text": self.texts[index],
        }

    def captions(self) -> list[str]:
        return [text for text in self.texts if text]


@torch.no_grad()
def cached_latents(
    dataset: Dataset, identity: str, vae: AutoencoderKL, cache_dir: Path, batch_size: int = 64
) -> LatentCacheDataset:
    """Load the cache of (`identity`, `vae`) from `cache_dir`, or encode `dataset` and write it (atomically)."""
    key = hashlib.sha256(f"{identity}|{vae_fingerprint(vae)}".encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"latents-{key}.pt"
    resolution = int(dataset.resolution)
    if path.exists():
        stored = torch.load(path, map_location="cpu", weights_only=True)
        log.info("latent cache hit: %s (%d images)", path, len(stored["moments"]))
        return LatentCacheDataset(stored["moments"], stored["labels"], stored["texts"], resolution)
    log.info("latent cache miss: encoding %d images into %s", len(dataset), path)
    moments, labels, texts = [], [], []
    device = next(vae.parameters()).device
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        moments.append(vae.encode(batch["pixel_values"].to(device)).latent_dist.parameters.half().cpu())
        labels.append(torch.as_tensor(batch["label"]))
        texts += list(batch["text"])
    stored = {"moments": torch.cat(moments), "labels": torch.cat(labels), "texts": texts, "identity": identity}
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(descriptor, "wb") as handle:
        torch.save(stored, handle)
    os.replace(temporary, path)
    return LatentCacheDataset(stored["moments"], stored["labels"], texts, resolution)
