"""What a method shows of itself during training: images for the grid, and what the metrics need to judge them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Preview:
    images: torch.Tensor  # (B, 3, H, W) in [0, 1]: what the shapes metric judges
    labels: torch.Tensor | None = None  # shapes class label each image should show, if known
    grid_images: torch.Tensor | None = None  # what the grid shows, if not `images` (e.g. input | reconstruction)
    metrics: dict[str, float] = field(default_factory=dict)  # method-specific numbers (e.g. PSNR), logged as is
