"""Image preprocessing as config: resize the short side, centre or random crop, horizontal flip.

Written on PIL because torchvision is an optional extra (its wheels are tied to CUDA builds of torch).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N"}  # 16-bit grey (PNG, TIFF), as Pillow opens it
SIXTEEN_BIT_TO_EIGHT = 257  # 65535 / 255: maps 0..65535 onto 0..255 exactly at both ends


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """uint8 RGB PIL image -> float tensor (3, H, W) in [-1, 1], the range every model in lightdiff trains on."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB. Pillow's own `convert("RGB")` clips 16-bit grey to 255 instead of scaling it (a 16-bit PNG turns
    white): those are scaled here. 32-bit integer images are taken as 16-bit when their values fit, and floating-point
    images (mode F), whose range no file states, are refused (ValueError)."""
    if image.mode in SIXTEEN_BIT_MODES or image.mode == "I":
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"mode {image.mode} image with values {values.min()}..{values.max()}, outside 16 bits")
        eight = np.round(values / SIXTEEN_BIT_TO_EIGHT).astype(np.uint8)
        return Image.fromarray(eight).convert("RGB")  # uint8, 2-D: mode L
    if image.mode == "F":
        raise ValueError("floating-point image (mode F): its range is unknown; convert it to 8 or 16 bits")
    return image.convert("RGB")


class ImageTransform:
    """PIL image -> (3, height, width) tensor in [-1, 1], and its size and crop record."""

    def __init__(
        self,
        resolution: int,  # output side in pixels (a square), unless a call asks for another size (a bucket's)
        center_crop: bool = True,  # centre crop after resizing; false takes a random crop
        random_flip: bool = False,  # flip horizontally with probability 1/2
    ) -> None:
        if resolution < 1:
            raise ValueError(f"data.resolution={resolution} must be positive")
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip

    def __call__(self, image: Image.Image, size: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The image resized to cover `size` = (height, width) (default: the square resolution) and cropped to it;
        and its record (original height, width, crop top, left, target height, width) as SDXL conditions on it
        (Podell et al. 2023, 2.2-2.3): the crop in the resized image, mirrored with the image when it is flipped,
        as diffusers' SDXL training script records it."""
        target_height, target_width = size or (self.resolution, self.resolution)
        image = to_rgb(image)
        original_width, original_height = image.size
        scale = max(target_height / original_height, target_width / original_width)
        new_size = (
            max(target_width, round(original_width * scale)),
            max(target_height, round(original_height * scale)),
        )
        if new_size != image.size:
            image = image.resize(new_size, Image.Resampling.BICUBIC, reducing_gap=None)
        width, height = image.size
        if self.center_crop:
            left, top = (width - target_width) // 2, (height - target_height) // 2
        else:
            left = int(torch.randint(width - target_width + 1, ()))
            top = int(torch.randint(height - target_height + 1, ()))
        image = image.crop((left, top, left + target_width, top + target_height))
        pixels = pil_to_tensor(image)
        if self.random_flip and torch.rand(()) < 0.5:
            pixels = pixels.flip(-1)
            left = width - left - target_width  # where the crop lies in the mirrored image
        record = torch.tensor([original_height, original_width, top, left, target_height, target_width])
        return pixels, record
