"""Image preprocessing as config: resize the short side, centre or random crop, horizontal flip.

Written on PIL because torchvision is an optional extra (its wheels are tied to CUDA builds of torch).
"""

from __future__ import annotations

import torch
from PIL import Image

from lightdiff.data.shapes import pil_to_tensor


class ImageTransform:
    """PIL image -> (3, resolution, resolution) tensor in [-1, 1]."""

    def __init__(
        self,
        resolution: int,  # output side in pixels
        center_crop: bool = True,  # centre crop after resizing; false takes a random crop
        random_flip: bool = False,  # flip horizontally with probability 1/2
    ) -> None:
        if resolution < 1:
            raise ValueError(f"data.resolution={resolution} must be positive")
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        width, height = image.size
        scale = self.resolution / min(width, height)
        new_size = (max(self.resolution, round(width * scale)), max(self.resolution, round(height * scale)))
        if new_size != image.size:
            image = image.resize(new_size, Image.Resampling.BICUBIC, reducing_gap=None)
        width, height = image.size
        if self.center_crop:
            left, top = (width - self.resolution) // 2, (height - self.resolution) // 2
        else:
            left = int(torch.randint(width - self.resolution + 1, ()))
            top = int(torch.randint(height - self.resolution + 1, ()))
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        pixels = pil_to_tensor(image)
        if self.random_flip and torch.rand(()) < 0.5:
            pixels = pixels.flip(-1)
        return pixels
