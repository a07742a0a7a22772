"""The embedded edit task (`data=shapes_edit`): (source, instruction, target) triples of the shapes data, the target
drawn exactly (no download, no model in the loop).

Item i is a pure function of (seed, i): a shape as `data.shapes` draws it, one edit among those its layout allows, and
the same shape with that one attribute changed, everything else kept:
- colour: "make it blue" (another of the eight colours);
- shape: "turn it into a square" (another of the three);
- position: "move it left" / "right" / "up" / "down" (by a quarter of the side of the picture, where there is room);
- size: "make it bigger" / "make it smaller" (by `SIZE_STEP`, about the centre, within the data set's sizes).
`lightdiff.metrics.edits` judges an edit right when the asked attribute changed as asked and the others were kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from torch.utils.data import Dataset, Subset

from lightdiff.config import NonNegativeInt
from lightdiff.data.datamodule import ImageDataModule
from lightdiff.data.shapes import COLOR_NAMES, MAX_SIDE, MIN_SIDE, SHAPES, class_label, draw_shape, shapes_layout
from lightdiff.data.transforms import pil_to_tensor

MOVE_STEP = 0.25  # a move's length, as a fraction of the picture's side
SIZE_STEP = 1.4  # a size edit scales the side by this (bigger) or its inverse (smaller)
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


@dataclass(frozen=True)
class Layout:
    """One shapes picture: (shape, colour) and its bounding box (side, left, top) in pixels."""

    shape: str
    color: str
    side: float
    left: float
    top: float

    def draw(self, resolution: int) -> Image.Image:
        return draw_shape(self.shape, self.color, self.side, self.left, self.top, resolution)


@dataclass(frozen=True)
class Edit:
    """What an instruction asks: the attribute (`color`, `shape`, `position`, `size`) and its new value (a colour, a
    shape, a direction, `bigger` / `smaller`)."""

    attribute: str
    value: str

    @property
    def instruction(self) -> str:
        return {
            "color": f"make it {self.value}",
            "shape": f"turn it into a {self.value}",
            "position": f"move it {self.value}",
            "size": f"make it {self.value}",
        }[self.attribute]


def parse_instruction(instruction: str) -> Edit:
    """The `Edit` an instruction of this task asks (a ValueError for any other text)."""
    words = instruction.lower().split()
    last = words[-1] if words else ""
    if words[:2] == ["make", "it"] and last in COLOR_NAMES:
        return Edit("color", last)
    if words[:3] == ["turn", "it", "into"] and last in SHAPES:
        return Edit("shape", last)
    if words[:2] == ["move", "it"] and last in DIRECTIONS:
        return Edit("position", last)
    if words[:2] == ["make", "it"] and last in ("bigger", "smaller"):
        return Edit("size", last)
    raise ValueError(f"{instruction!r} is not an instruction of the shapes edit task (e.g. 'make it red')")


def possible_edits(layout: Layout, resolution: int) -> list[Edit]:
    """The edits `layout` allows: every other colour and shape, the moves with room for a full step, and the sizes
    that stay within the data set's (`MIN_SIDE`..`MAX_SIDE` of the picture) and fit about the same centre."""
    edits = [Edit("color", color) for color in COLOR_NAMES if color != layout.color]
    edits += [Edit("shape", shape) for shape in SHAPES if shape != layout.shape]
    step = MOVE_STEP * resolution
    room = {
        "left": layout.left,
        "right": resolution - layout.left - layout.side,
        "up": layout.top,
        "down": resolution - layout.top - layout.side,
    }
    edits += [Edit("position", direction) for direction, space in room.items() if space >= step]
    centre_x, centre_y = layout.left + layout.side / 2, layout.top + layout.side / 2
    for value, factor in (("bigger", SIZE_STEP), ("smaller", 1 / SIZE_STEP)):
        side = layout.side * factor
        half = side / 2
        fits = min(centre_x, centre_y) >= half and max(centre_x, centre_y) + half <= resolution
        if MIN_SIDE * resolution <= side <= MAX_SIDE * resolution and fits:
            edits.append(Edit("size", value))
    return edits


def edited(layout: Layout, edit: Edit, resolution: int) -> Layout:
    """`layout` with `edit` applied, nothing else changed."""
    if edit.attribute == "color":
        return Layout(layout.shape, edit.value, layout.side, layout.left, layout.top)
    if edit.attribute == "shape":
        return Layout(edit.value, layout.color, layout.side, layout.left, layout.top)
    if edit.attribute == "position":
        dx, dy = DIRECTIONS[edit.value]
        step = MOVE_STEP * resolution
        return Layout(layout.shape, layout.color, layout.side, layout.left + dx * step, layout.top + dy * step)
    factor = SIZE_STEP if edit.value == "bigger" else 1 / SIZE_STEP
    side = layout.side * factor
    shift = (layout.side - side) / 2  # about the centre
    return Layout(layout.shape, layout.color, side, layout.left + shift, layout.top + shift)


def edit_sample(seed: int, index: int, resolution: int) -> tuple[Layout, Edit, Layout]:
    """(source layout, edit, target layout) of item `index`; a pure function of (seed, index, resolution)."""
    source = Layout(*shapes_layout(seed, index, resolution))
    rng = np.random.default_rng([seed, index, 1])  # the edit's own stream, apart from the layout's
    edits = possible_edits(source, resolution)
    attributes = sorted({edit.attribute for edit in edits})  # each possible attribute equally likely, then its value
    attribute = attributes[int(rng.integers(len(attributes)))]
    choices = [edit for edit in edits if edit.attribute == attribute]
    edit = choices[int(rng.integers(len(choices)))]
    return source, edit, edited(source, edit, resolution)


class ShapesEditDataset(Dataset):
    """Items {"pixel_values": the target, "source_pixel_values": the source, "text": the instruction, "label": the
    target's shapes class}, images (3, H, W) in [-1, 1]."""

    def __init__(self, size: int = 50_000, resolution: int = 32, seed: int = 0) -> None:
        if size < 1:
            raise ValueError(f"data.size={size} must be positive")
        if resolution < 16:
            raise ValueError(f"data.resolution={resolution} is too small for moves and size edits (minimum 16)")
        self.size, self.resolution, self.seed = size, resolution, seed

    def __len__(self) -> int:
        return self.size

    def captions(self) -> list[str]:
        """Every instruction of the task: all a tokenizer needs to see."""
        edits = [Edit("color", c) for c in COLOR_NAMES] + [Edit("shape", s) for s in SHAPES]
        edits += [Edit("position", d) for d in DIRECTIONS] + [Edit("size", v) for v in ("bigger", "smaller")]
        return [edit.instruction for edit in edits]

    def __getitem__(self, index: int) -> dict[str, object]:
        if not 0 <= index < self.size:
            raise IndexError(f"shapes_edit index {index} out of range [0, {self.size})")
        source, edit, target = edit_sample(self.seed, index, self.resolution)
        return {
            "pixel_values": pil_to_tensor(target.draw(self.resolution)),
            "source_pixel_values": pil_to_tensor(source.draw(self.resolution)),
            "text": edit.instruction,
            "label": class_label(target.shape, target.color),
        }


class ShapesEditDataModule(ImageDataModule):
    """The embedded edit task (`data=shapes_edit`)."""

    def __init__(
        self,
        resolution: int = 32,  # image side in pixels
        size: int = 50_000,  # triples per epoch
        seed: int = 0,  # data seed: triple i is a pure function of (seed, i)
        batch_size: int = 64,  # per-device batch size
        num_workers: NonNegativeInt = 0,  # loader processes
        pin_memory: bool = False,  # page-locked batches
        persistent_workers: bool = False,  # keep workers between epochs
        cache_latents: bool = False,  # encode targets and sources once through the VAE, train from the cache
        latent_cache_dir: str = "outputs/latent_cache",  # where latent caches are kept
        val_size: int = 0,  # held-out triples for val/loss: items size .. size + val_size - 1, never trained on
    ) -> None:
        dataset = ShapesEditDataset(size, resolution, seed)
        whole = ShapesEditDataset(size + val_size, resolution, seed)
        held_out = Subset(whole, range(size, size + val_size)) if val_size > 0 else None
        identity = f"shapes_edit|size={size}|seed={seed}|resolution={resolution}"
        super().__init__(
            dataset,
            batch_size,
            num_workers,
            pin_memory,
            persistent_workers,
            cache_latents,
            latent_cache_dir,
            identity,
            val_dataset=held_out,
        )
