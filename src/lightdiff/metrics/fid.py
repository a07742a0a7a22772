"""FID (Heusel et al. 2017) and KID (Binkowski et al. 2018) of generated images against a reference set.

`FrechetEvaluator` wraps torchmetrics' `FrechetInceptionDistance` and `KernelInceptionDistance` (float64
statistics) around one feature network, and adds what a training framework needs:

- reference statistics (the first `num_samples` images of a data set) computed once, by rank 0, and cached on disk
  under a key made of the data set's identity (source, size, resolution, preprocessing), `num_samples` and a hash of
  the feature network, so a later run on the same data reuses them (logged as a cache hit);
- multi-process correctness: each rank adds only its own generated images, compute() sums the statistics of all
  ranks, and only rank 0 holds the reference statistics (the others hold zeros), so the sum counts them once;
- KID's random subsets drawn from a fixed seed, without touching the training's RNG.

Images are float (B, 3, H, W) in [0, 1]; anything else is refused (`check_unit_range`).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from lightdiff.files import module_fingerprint, save_atomically
from lightdiff.metrics.features import check_unit_range

log = logging.getLogger(__name__)


class FrechetEvaluator:
    """Accumulates generated images and computes {"fid", "kid"} against cached reference statistics."""

    def __init__(
        self,
        features: nn.Module,  # float images in [0, 1] (B, 3, H, W) -> features (B, D)
        num_samples: int = 1000,  # reference images (the first of the data set)
        batch_size: int = 100,  # reference images read at once
        kid_subset_size: int = 1000,  # KID's subset size (at most the number of images)
        cache_dir: str | Path | None = None,  # reference statistics kept here; None: never cached
        seed: int = 0,  # KID's subsets
    ) -> None:
        if num_samples < 2:
            raise ValueError(f"metrics.num_samples={num_samples}: a covariance needs at least 2 images")
        self.features = features
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.seed = seed
        self.fid = FrechetInceptionDistance(feature=features, normalize=True, reset_real_features=False)
        self.kid = KernelInceptionDistance(
            feature=features, normalize=True, reset_real_features=False, subset_size=min(kid_subset_size, num_samples)
        )
        self.has_reference = False

    def to(self, device: torch.device) -> FrechetEvaluator:
        self.fid.to(device)
        self.kid.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.fid.device

    def reference_path(self, identity: str) -> Path | None:
        if self.cache_dir is None or not identity:
            return None
        network = module_fingerprint({"class": type(self.features).__qualname__}, self.features)
        key = f"{identity}|num_samples={self.num_samples}|features={network}"
        return self.cache_dir / f"reference-{hashlib.sha256(key.encode()).hexdigest()[:20]}.pt"

    def set_reference(self, dataset: Dataset, identity: str, rank: int = 0) -> None:
        """Reference statistics of `dataset`'s first `num_samples` items ({"pixel_values": [-1, 1]}): loaded from
        the cache or computed (and cached) on rank 0; other ranks hold none."""
        if len(dataset) < self.num_samples:  # checked on every rank, so none is left waiting for the others
            raise ValueError(f"metrics.num_samples={self.num_samples} exceeds the data set's {len(dataset)} images")
        self.has_reference = True
        if rank != 0:
            return
        path = self.reference_path(identity)
        if path is not None and path.exists():
            stored = torch.load(path, map_location=self.device, weights_only=True)
            self.fid.real_features_sum = stored["features_sum"]
            self.fid.real_features_cov_sum = stored["features_cov_sum"]
            self.fid.real_features_num_samples = stored["num_samples"]
            self.kid.real_features = [stored["features"]]
            log.info("FID reference statistics: cache hit %s", path)
            return
        for start in range(0, self.num_samples, self.batch_size):
            indices = range(start, min(start + self.batch_size, self.num_samples))
            images = torch.stack([dataset[i]["pixel_values"] for i in indices]).to(self.device) / 2 + 0.5
            if images.ndim == 5:  # clips: their frames, as a video method's previews give them (Preview.images)
                images = images.flatten(0, 1)
            self._update(images.clamp(0, 1), real=True)
        if path is not None:
            stored = {
                "features_sum": self.fid.real_features_sum,
                "features_cov_sum": self.fid.real_features_cov_sum,
                "num_samples": self.fid.real_features_num_samples,
                "features": torch.cat(self.kid.real_features),
            }
            save_atomically({k: v.cpu() for k, v in stored.items()}, path)
            log.info("FID reference statistics: cache miss, %d images written to %s", self.num_samples, path)

    def _update(self, images: torch.Tensor, real: bool) -> None:
        images = check_unit_range(images.float())
        self.fid.update(images, real=real)
        self.kid.update(images, real=real)

    def update(self, images: torch.Tensor) -> None:
        """Add generated images, float (B, 3, H, W) in [0, 1]."""
        self._update(images.to(self.device), real=False)

    def compute(self) -> dict[str, float]:
        """{"fid", "kid"} of the generated images so far (all ranks' when distributed), then forget them."""
        if not self.has_reference:
            raise RuntimeError("set_reference must be called before compute")
        for name in ("real_features", "fake_features"):  # torchmetrics gathers KID's feature lists element by
            parts = getattr(self.kid, name)  # element, so every rank must hold the same number: one tensor each
            empty = torch.empty(0, len(self.fid.real_features_sum), dtype=torch.float64, device=self.device)
            setattr(self.kid, name, [torch.cat(parts) if parts else empty])
        with torch.random.fork_rng(devices=[]):  # KID draws its subsets: the same each time, training's RNG untouched
            torch.manual_seed(self.seed)
            kid_mean, _ = self.kid.compute()  # synchronises the ranks' statistics when distributed
        metrics = {"fid": float(self.fid.compute()), "kid": float(kid_mean)}
        self.fid.reset()  # the generated images' statistics; the reference ones are kept
        self.kid.reset()
        return metrics
