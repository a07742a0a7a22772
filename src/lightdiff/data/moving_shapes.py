"""The embedded `moving_shapes` video data set: clips of one shapes-data-set shape gliding across a black picture in
a straight line at a steady speed, drawn on demand (no download), captioned "a red circle moving left".

Clip i is a pure function of (seed, i), as in `lightdiff.data.shapes`: every rank, worker and resumed run sees the
same clip for the same index. The specification (sizes, speeds, directions) is what the video judge
(`lightdiff.metrics.motion`) checks generated clips against.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from lightdiff.config import NonNegativeInt
from lightdiff.data.datamodule import ImageDataModule
from lightdiff.data.shapes import COLORS, SHAPES, class_label, draw_shape, drawn_class
from lightdiff.data.transforms import pil_to_tensor

# (column, row) unit step of each direction, in picture coordinates (rows grow downwards)
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
DIRECTION_NAMES: tuple[str, ...] = tuple(DIRECTIONS)
NUM_MOTION_CLASSES = len(SHAPES) * len(COLORS) * len(DIRECTIONS)
# The shape's side as a fraction of the picture: smaller than the still data set's (0.35-0.75), so it has room to move,
# and inside the range the shapes metric accepts (0.8 x 0.35).
MIN_SIDE, MAX_SIDE = 0.30, 0.45
# How far it travels over the clip, as a fraction of the room it has (picture side - shape side): at least half, so
# every clip moves visibly (>= 0.275 of the picture at the largest side).
MIN_TRAVEL, MAX_TRAVEL = 0.5, 1.0


def motion_label(shape: str, color: str, direction: str) -> int:
    """label = shapes class label * 4 + direction index: the 96 (shape, colour, direction) classes."""
    return class_label(shape, color) * len(DIRECTIONS) + DIRECTION_NAMES.index(direction)


def motion_caption(label: int) -> str:
    shape_label, direction = divmod(label, len(DIRECTIONS))
    shape, color = SHAPES[shape_label // len(COLORS)], tuple(COLORS)[shape_label % len(COLORS)]
    return f"a {color} {shape} moving {DIRECTION_NAMES[direction]}"


def clip_path(seed: int, index: int, resolution: int, num_frames: int) -> tuple[str, str, str, float, np.ndarray]:
    """(shape, colour, direction, side, (num_frames, 2) top-left corners (left, top)) of clip `index`, in pixels."""
    rng, shape, color = drawn_class(seed, index)
    direction = DIRECTION_NAMES[int(rng.integers(len(DIRECTIONS)))]
    side = float(rng.uniform(MIN_SIDE, MAX_SIDE)) * resolution
    room = resolution - side
    travel = float(rng.uniform(MIN_TRAVEL, MAX_TRAVEL)) * room
    start_along = float(rng.uniform(0, room - travel))  # where the motion begins on its axis, so it stays inside
    across = float(rng.uniform(0, room))  # the other coordinate, fixed
    step_x, step_y = DIRECTIONS[direction]
    fractions = np.linspace(0.0, 1.0, num_frames)
    along = start_along + travel * fractions  # distance covered from the side it leaves
    if step_x:  # horizontal: left moves from the right end of its range
        lefts = along if step_x > 0 else room - along
        corners = np.stack([lefts, np.full(num_frames, across)], axis=1)
    else:
        tops = along if step_y > 0 else room - along
        corners = np.stack([np.full(num_frames, across), tops], axis=1)
    return shape, color, direction, side, corners


def moving_shapes_clip(seed: int, index: int, resolution: int, num_frames: int) -> tuple[torch.Tensor, int, str]:
    """(frames (F, 3, H, W) in [-1, 1], motion label, caption) of clip `index`; a pure function of its arguments."""
    shape, color, direction, side, corners = clip_path(seed, index, resolution, num_frames)
    frames = [pil_to_tensor(draw_shape(shape, color, side, left, top, resolution)) for left, top in corners]
    return torch.stack(frames), motion_label(shape, color, direction), f"a {color} {shape} moving {direction}"


class MovingShapesDataset(Dataset):
    """Procedural clips; items are {"pixel_values": (F, 3, H, W) in [-1, 1], "label", "text"}: an image data set's
    items with a frame axis, so the data module, samplers and resume serve them unchanged."""

    def __init__(
        self,
        size: int = 50_000,  # number of distinct clips (one epoch)
        resolution: int = 32,  # frame side in pixels
        num_frames: int = 9,  # frames per clip
        seed: int = 0,  # data seed: clip i is a pure function of (seed, i)
    ) -> None:
        if size < 1:
            raise ValueError(f"data.size={size} must be positive")
        if resolution < 16:
            raise ValueError(f"data.resolution={resolution} is too small for a shape to move in (minimum 16)")
        if num_frames < 2:
            raise ValueError(f"data.num_frames={num_frames}: a clip needs at least 2 frames to show motion")
        self.size = size
        self.resolution = resolution
        self.num_frames = num_frames
        self.seed = seed
        self.num_classes = NUM_MOTION_CLASSES
        self.class_names = [motion_caption(label) for label in range(NUM_MOTION_CLASSES)]

    def __len__(self) -> int:
        return self.size

    def captions(self) -> list[str]:
        """The 96 distinct captions (each equally likely): all a tokenizer needs to see."""
        return list(self.class_names)

    def __getitem__(self, index: int) -> dict[str, object]:
        if not 0 <= index < self.size:
            raise IndexError(f"moving shapes index {index} out of range [0, {self.size})")
        frames, label, caption = moving_shapes_clip(self.seed, index, self.resolution, self.num_frames)
        return {"pixel_values": frames, "label": label, "text": caption}


class MovingShapesDataModule(ImageDataModule):
    """The embedded moving-shapes video data set (`data=moving_shapes`): clips (F, 3, H, W)."""

    def __init__(
        self,
        resolution: int = 32,  # frame side in pixels
        num_frames: int = 9,  # frames per clip
        size: int = 50_000,  # clips per epoch
        seed: int = 0,  # data seed: clip i is a pure function of (seed, i)
        batch_size: int = 16,  # per-device batch size (clips)
        num_workers: NonNegativeInt = 0,  # loader processes
        pin_memory: bool = False,  # page-locked batches
        persistent_workers: bool = False,  # keep workers between epochs
        val_size: int = 0,  # held-out clips for val/loss: items size .. size + val_size - 1, never trained on
        cache_latents: bool = False,  # model=video: encode the clips once through the VAE, train from the cache
        latent_cache_dir: str = "outputs/latent_cache",  # where latent caches are kept
    ) -> None:
        dataset = MovingShapesDataset(size=size, resolution=resolution, num_frames=num_frames, seed=seed)
        held_out = None
        if val_size > 0:
            longer = MovingShapesDataset(size=size + val_size, resolution=resolution, num_frames=num_frames, seed=seed)
            held_out = Subset(longer, range(size, size + val_size))
        identity = f"moving_shapes|size={size}|seed={seed}|resolution={resolution}|num_frames={num_frames}"
        super().__init__(
            dataset,
            batch_size,
            num_workers,
            pin_memory,
            persistent_workers,
            cache_latents,
            latent_cache_dir,
            identity=identity,
            val_dataset=held_out,
        )
