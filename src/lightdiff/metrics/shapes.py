"""The shapes metric: how many generated images are a valid shapes-data-set image, of the asked-for class.

Input is explicit: uint8 RGB images shaped (N, H, W, 3) (numpy or torch). Anything else is refused, because a
[-1, 1] or [0, 1] float image read as uint8 would score as an all-black failure without a word.

Each image is judged on its own:
- foreground coverage alpha = brightness / brightness of the shape's core (so anti-aliased edges count
  fractionally), brightness being the maximum over RGB;
- valid: exactly one foreground blob (stray pixels outside it at most 3% of its area), a dark background,
  a size within the data set's range, one colour near one of the eight palette colours, and a recognised shape;
- shape, from two scale-free numbers: fill = area / (soft width x soft height) (square 1, circle pi/4,
  triangle 1/2) and the drop of the area centroid below the box centre (triangle apex up: 1/6 of the height).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from lightdiff.data.shapes import COLOR_NAMES, COLORS, MAX_SIDE, MIN_SIDE, NUM_CLASSES, SHAPES, class_label

_PALETTE = np.array([COLORS[name] for name in COLOR_NAMES], dtype=np.float64)
FOREGROUND = 80  # brightness (0-255) above which a pixel belongs to a shape; the darkest colour peaks at 180
_MAX_BACKGROUND = 30  # mean brightness allowed for the background away from the shape
_MAX_COLOR_DISTANCE = 60.0  # RGB distance to the nearest palette colour
_FILL = {"circle": np.pi / 4, "square": 1.0}
_FILL_TOLERANCE = 0.1
_TRIANGLE_DROP = 1 / 6


@dataclass(frozen=True)
class ShapeJudgement:
    valid: bool  # one shape of the data set on a dark background
    shape: str | None  # recognised shape, None if none
    color: str | None  # nearest palette colour, None if none is close
    fill: float = float("nan")  # area / (soft width x soft height): square 1, circle pi/4, triangle 1/2; nan: no blob


def _as_uint8_images(images: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    if images.dtype != np.uint8:
        raise TypeError(
            f"the shapes metric takes uint8 RGB images (N, H, W, 3), got dtype {images.dtype}; "
            "convert [-1, 1] tensors with lightdiff.sampling.to_uint8 first"
        )
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"the shapes metric takes images shaped (N, H, W, 3), got {tuple(images.shape)}")
    return images


@dataclass(frozen=True)
class _Blob:
    """The largest foreground blob of an image and its coverage."""

    brightness: np.ndarray  # (H, W): max over RGB
    blob: np.ndarray  # (H, W) bool: the blob's pixels above FOREGROUND
    stray: int  # foreground pixels outside it
    alpha: np.ndarray  # (H, W): coverage in [0, 1] over the blob and its anti-aliased one-pixel rim


def _largest_blob(image: np.ndarray) -> _Blob | None:
    brightness = image.astype(np.float64).max(axis=-1)
    foreground = brightness > FOREGROUND
    components, count = ndimage.label(foreground)
    if count == 0:
        return None
    areas = ndimage.sum(foreground, components, index=np.arange(1, count + 1))
    blob = components == (int(np.argmax(areas)) + 1)
    # The shape's own pixels: the blob and its anti-aliased one-pixel rim.
    region = ndimage.binary_dilation(blob, iterations=1)
    core = np.percentile(brightness[blob], 90)
    alpha = np.where(region, np.clip(brightness / core, 0, 1), 0.0)
    return _Blob(brightness, blob, int(foreground.sum() - blob.sum()), alpha)


def shape_geometry(image: np.ndarray) -> tuple[float, float, float] | None:
    """(centre x, centre y, side) in pixels of the shape in one uint8 (H, W, 3) image: the centre of its coverage's
    bounding profile and the side sqrt(width x height) (the same soft extents `judge_image` measures); None if the
    image has no foreground."""
    found = _largest_blob(image)
    if found is None:
        return None
    alpha = found.alpha
    columns, rows = alpha.max(axis=0), alpha.max(axis=1)
    centre_x = float((np.arange(len(columns)) * columns).sum() / columns.sum())
    centre_y = float((np.arange(len(rows)) * rows).sum() / rows.sum())
    return centre_x + 0.5, centre_y + 0.5, float(np.sqrt(columns.sum() * rows.sum()))


def judge_image(image: np.ndarray) -> ShapeJudgement:
    """Judge one uint8 (H, W, 3) image."""
    resolution = min(image.shape[:2])
    pixels = image.astype(np.float64)
    found = _largest_blob(image)
    if found is None:
        return ShapeJudgement(False, None, None)
    brightness, blob, stray, alpha = found.brightness, found.blob, found.stray, found.alpha
    background = ~ndimage.binary_dilation(blob, iterations=2)
    background_dark = background.any() and brightness[background].mean() <= _MAX_BACKGROUND
    area = alpha.sum()
    width, height = alpha.max(axis=0).sum(), alpha.max(axis=1).sum()
    rows = np.arange(alpha.shape[0], dtype=np.float64)
    row_profile = alpha.max(axis=1)
    box_centre = (rows * row_profile).sum() / row_profile.sum()
    area_centre = (rows * alpha.sum(axis=1)).sum() / area
    fill = area / (width * height)
    drop = (area_centre - box_centre) / height

    if drop > _TRIANGLE_DROP / 2 and abs(fill - 0.5) <= 0.15:
        shape: str | None = "triangle"
    elif abs(drop) <= _TRIANGLE_DROP / 2:
        nearest = min(_FILL, key=lambda name: abs(_FILL[name] - fill))
        shape = nearest if abs(_FILL[nearest] - fill) <= _FILL_TOLERANCE else None
    else:
        shape = None

    solid = alpha > 0.9
    mean_color = pixels[solid].mean(axis=0) if solid.any() else pixels[blob].mean(axis=0)
    distances = np.linalg.norm(_PALETTE - mean_color, axis=1)
    color = COLOR_NAMES[int(np.argmin(distances))] if distances.min() <= _MAX_COLOR_DISTANCE else None
    # One colour: two overlapping shapes can form a plausible blob, but not a uniformly coloured one.
    solid_pixels = pixels[solid] if solid.any() else pixels[blob]
    uniform = np.mean(np.linalg.norm(solid_pixels - mean_color, axis=1) <= _MAX_COLOR_DISTANCE) >= 0.9

    side = np.sqrt(width * height) / resolution
    plausible_size = 0.8 * MIN_SIDE <= side <= MAX_SIDE + 2 / resolution
    square_box = 0.7 <= width / height <= 1.4
    valid = bool(
        background_dark
        and stray <= max(1.0, 0.03 * blob.sum())
        and plausible_size
        and square_box
        and shape is not None
        and color is not None
        and uniform
    )
    return ShapeJudgement(valid, shape, color, float(fill))


def parse_prompt(prompt: str) -> tuple[str | None, str | None]:
    words = prompt.lower().split()
    shape = next((w for w in words if w in SHAPES), None)
    color = next((w for w in words if w in COLORS), None)
    return shape, color


def wanted_classes(
    count: int, labels: Sequence[int] | None = None, prompts: Sequence[str] | None = None
) -> list[tuple[str | None, str | None]] | None:
    """(shape, colour) each of `count` images was made for, from shapes class labels or prompts; None if neither."""
    if labels is not None and prompts is not None:
        raise ValueError("give labels or prompts, not both")
    if labels is not None:
        if len(labels) != count:
            raise ValueError(f"{len(labels)} labels for {count} images")
        return [(SHAPES[int(lbl) // len(COLORS)], COLOR_NAMES[int(lbl) % len(COLORS)]) for lbl in labels]
    if prompts is not None:
        if len(prompts) != count:
            raise ValueError(f"{len(prompts)} prompts for {count} images")
        return [parse_prompt(p) for p in prompts]
    return None


def summarise_judgements(
    judgements: Sequence[ShapeJudgement], wanted: Sequence[tuple[str | None, str | None]] | None = None
) -> dict[str, float]:
    """Fractions valid (and right in colour, shape and both where `wanted` is known) and class coverage."""
    valid = np.array([j.valid for j in judgements])
    seen_classes = {class_label(j.shape, j.color) for j in judgements if j.valid and j.shape and j.color}
    result = {"valid": float(valid.mean()), "coverage": len(seen_classes) / (len(SHAPES) * len(COLORS))}
    if wanted is not None:
        right_shape = np.array([j.valid and j.shape == w[0] for j, w in zip(judgements, wanted)])
        right_color = np.array([j.valid and j.color == w[1] for j, w in zip(judgements, wanted)])
        result.update(
            shape=float(right_shape.mean()),
            color=float(right_color.mean()),
            both=float((right_shape & right_color).mean()),
        )
    return result


def shapes_metric(
    images: np.ndarray | torch.Tensor,
    labels: Sequence[int] | None = None,
    prompts: Sequence[str] | None = None,
) -> dict[str, float]:
    """Fractions of `images` that are valid, of the right colour, shape and both; class coverage.

    `labels` (shapes class labels) or `prompts` ("a red circle") say what each image was made for; without
    either, only validity and coverage (the share of the 24 classes seen among valid images) are reported.
    """
    images = _as_uint8_images(images)
    wanted = wanted_classes(len(images), labels, prompts)
    return summarise_judgements([judge_image(image) for image in images], wanted)


def cut_by_border(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """(N,) bools: whether each uint8 image's shape is cut off by the picture's border: foreground in the outer row or
    column and the image not a valid shapes image (`judge_image`: a cut shape has the wrong box or fill). A whole shape
    that merely touches the border stays valid: 35.6% of the square shapes data touch it, 0.2% count as cut. A model
    trained on centre crops of wider pictures learns cut shapes (SDXL's reason for crop conditioning and buckets,
    Podell et al. 2023, Sections 2.2-2.3)."""
    images = _as_uint8_images(images)
    return touches_border(images) & np.array([not judge_image(image).valid for image in images])


def touches_border(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """(N,) bools: whether each uint8 image has foreground in its outer row or column (the raw count behind
    `cut_by_border`, which also asks the shapes judge whether the shape is whole)."""
    foreground = _as_uint8_images(images).max(axis=-1) > FOREGROUND
    edges = [foreground[:, 0, :], foreground[:, -1, :], foreground[:, :, 0], foreground[:, :, -1]]
    return np.stack([edge.any(axis=1) for edge in edges]).any(axis=0)


def class_balanced_seeds(text: str) -> list[int]:
    """The seeds START..STOP-1 of a `START:STOP` argument, where seed mod 24 picks the caption: refused (argparse's
    `type=` error, naming the value) unless the range is non-empty and a multiple of the 24 classes long, so every
    class is judged on as many images as every other."""
    start, _, stop = text.partition(":")
    try:
        seeds = list(range(int(start), int(stop)))
    except ValueError:
        seeds = []
    if not seeds or len(seeds) % NUM_CLASSES:
        raise argparse.ArgumentTypeError(
            f"--seeds {text}: need START:STOP, a non-empty range whose length is a multiple of {NUM_CLASSES}"
        )
    return seeds
