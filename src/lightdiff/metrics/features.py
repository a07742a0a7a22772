"""Feature networks for Frechet / kernel distances. Each takes images in [0, 1], float, (B, 3, H, W), and returns
(B, num_features).

- `InceptionFeatures`: the standard 2048-d pool features of FID (Heusel et al. 2017) through torch-fidelity's
  Inception-v3 port, the network behind published FID numbers. Optional (`pip install lightdiff[fid]`); its weights
  are downloaded on first use or read from a local file (`weights`) on offline clusters.
- `RandomConvFeatures`: a small convolutional network with fixed random weights drawn from a seed. It needs no
  download, so it is lightdiff's FID substitute on machines without Inception weights (and in the tests). Its
  distances rank models of one data set (they grow as images degrade) but are on their own scale: compare them only
  with numbers from the same seed and width, never with published FID.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lightdiff.config import ConfigError


def check_unit_range(images: torch.Tensor) -> torch.Tensor:
    """`images` must be float (B, 3, H, W) in [0, 1]; a uint8 or [-1, 1] batch would give a silently wrong number."""
    if not torch.is_floating_point(images):
        raise TypeError(f"feature networks take float images in [0, 1], got dtype {images.dtype} (divide by 255)")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"feature networks take images shaped (B, 3, H, W), got {tuple(images.shape)}")
    low, high = float(images.min()), float(images.max())
    if low < -1e-3 or high > 1 + 1e-3:
        raise ValueError(
            f"feature networks take images in [0, 1], got values in [{low:.3f}, {high:.3f}] ([-1, 1] data: x / 2 + 0.5)"
        )
    return images


class InceptionFeatures(nn.Module):
    """FID's Inception-v3 pool features (2048-d) via torch-fidelity; images are resized to 299 px inside."""

    num_features = 2048

    def __init__(
        self,
        weights: str | None = None,  # local pt_inception-2015-12-05 file; None: torch-fidelity downloads it
    ) -> None:
        super().__init__()
        if weights is not None and not Path(weights).expanduser().is_file():
            raise ConfigError(
                f"metrics.features.weights={weights!r} is not a file (the pt_inception-2015-12-05 weights)"
            )
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
        except ImportError as error:  # pragma: no cover - depends on torchmetrics' own extras
            raise ConfigError(f"Inception features need torchmetrics' image extra: {error}") from error
        try:
            self.inception = NoTrainInceptionV3(
                name="inception-v3-compat",
                features_list=[str(self.num_features)],
                feature_extractor_weights_path=str(Path(weights).expanduser()) if weights else None,
            )
        except ModuleNotFoundError as error:
            raise ConfigError(
                "metrics.features=inception needs torch-fidelity: `pip install lightdiff[fid]` (on a machine whose "
                "torch comes from the CUDA index), or choose another metrics.features._target_ (e.g. "
                f"lightdiff.metrics.features.RandomConvFeatures, offline): {error}"
            ) from error

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = (check_unit_range(images) * 255).round().clamp(0, 255).to(torch.uint8)
        return self.inception(pixels).reshape(len(images), -1).double()


class RandomConvFeatures(nn.Module):
    """Global means of each stage of a fixed random conv net (stride 2 per stage), concatenated."""

    def __init__(
        self,
        seed: int = 0,  # draws the weights; distances are comparable only under the same seed
        width: int = 32,  # channels of the first stage, doubled at each of the three stages
    ) -> None:
        super().__init__()
        widths = [3, width, 2 * width, 4 * width]
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.LeakyReLU(0.2))
            for c_in, c_out in zip(widths[:-1], widths[1:])
        )
        self.num_features = sum(widths[1:])
        generator = torch.Generator().manual_seed(seed)
        for stage in self.stages:
            conv = stage[0]
            nn.init.kaiming_normal_(conv.weight, a=0.2, nonlinearity="leaky_relu", generator=generator)
            nn.init.zeros_(conv.bias)
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> RandomConvFeatures:
        return super().train(False)  # a fixed measuring instrument: never in training mode

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = check_unit_range(images).float() * 2 - 1
        pooled = []
        for stage in self.stages:
            x = stage(x)
            pooled.append(x.mean(dim=(2, 3)))
        return torch.cat(pooled, dim=1).double()
