"""The shapes data set's determinism, captions and specification; the shapes metric's verdicts."""

import argparse

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from lightdiff.data.shapes import (
    COLORS,
    MAX_SIDE,
    MIN_SIDE,
    SHAPES,
    ShapesDataset,
    class_label,
    draw_shape,
    label_to_caption,
    shapes_sample,
)
from lightdiff.metrics import judge_image, shapes_metric
from lightdiff.metrics.shapes import class_balanced_seeds


def _real_images(count: int, resolution: int, seed: int = 0) -> tuple[np.ndarray, list[int], list[str]]:
    samples = [shapes_sample(seed, i, resolution) for i in range(count)]
    return np.stack([np.asarray(s[0]) for s in samples]), [s[1] for s in samples], [s[2] for s in samples]


def test_sample_is_a_pure_function_of_seed_and_index() -> None:
    dataset = ShapesDataset(size=100, resolution=32, seed=3)
    first, again = dataset[17], ShapesDataset(size=100, resolution=32, seed=3)[17]
    assert torch.equal(first["pixel_values"], again["pixel_values"])
    assert first["text"] == again["text"] and first["label"] == again["label"]
    other_seed = ShapesDataset(size=100, resolution=32, seed=4)[17]
    assert not torch.equal(first["pixel_values"], other_seed["pixel_values"])
    assert first["pixel_values"].shape == (3, 32, 32)
    assert first["pixel_values"].min() >= -1 and first["pixel_values"].max() <= 1


def test_captions_labels_and_pixels_agree() -> None:
    images, labels, captions = _real_images(300, 32)
    for image, label, caption in zip(images, labels, captions):
        assert caption == label_to_caption(label)
        _, color, shape = caption.split()
        assert label == class_label(shape, color)
        # the brightest pixels carry exactly the palette colour (the shape's interior is never anti-aliased away)
        brightest = image.reshape(-1, 3)[image.reshape(-1, 3).sum(axis=1).argmax()]
        assert tuple(int(c) for c in brightest) == COLORS[color]
        assert image[0, 0].tolist() == [0, 0, 0] or image[-1, -1].tolist() == [0, 0, 0]
    assert len(set(labels)) == 24  # 300 draws cover every class


def test_shape_sizes_follow_the_specification() -> None:
    images, _, captions = _real_images(300, 64)
    for image, caption in zip(images, captions):
        rows, columns = np.nonzero(image.max(axis=-1) > 127)
        width, height = columns.max() - columns.min() + 1, rows.max() - rows.min() + 1
        assert MIN_SIDE * 64 - 2 <= width <= MAX_SIDE * 64 + 2, caption
        assert MIN_SIDE * 64 - 2 <= height <= MAX_SIDE * 64 + 2, caption
        if caption.endswith("triangle"):  # apex up: the top row of the shape is much narrower than the bottom
            top, bottom = image[rows.min()].max(axis=-1) > 127, image[rows.max()].max(axis=-1) > 127
            assert top.sum() < bottom.sum() / 2


@pytest.mark.parametrize("resolution", [16, 32])
def test_metric_scores_real_shapes_high(resolution: int) -> None:
    images, labels, captions = _real_images(400, resolution, seed=7)
    by_label = shapes_metric(images, labels=labels)
    by_prompt = shapes_metric(images, prompts=captions)
    assert by_label == by_prompt
    assert by_label["valid"] >= 0.98 and by_label["both"] >= 0.98
    assert by_label["coverage"] == 1.0


def test_metric_scores_noise_and_wrong_labels_low() -> None:
    rng = np.random.default_rng(0)
    assert shapes_metric(rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8))["valid"] == 0.0
    assert shapes_metric(np.zeros((8, 32, 32, 3), np.uint8))["valid"] == 0.0
    images, labels, _ = _real_images(200, 32)
    shifted = [(label + 1) % 24 for label in labels]  # same shape, next colour (or next shape at a wrap)
    scores = shapes_metric(images, labels=shifted)
    assert scores["valid"] >= 0.98 and scores["color"] == 0.0 and scores["both"] == 0.0


def test_metric_falls_as_images_degrade() -> None:
    images, labels, _ = _real_images(200, 32)
    rng = np.random.default_rng(1)
    scores = []
    for noise in (0, 15, 30, 60):
        noisy = np.clip(images.astype(np.int32) + rng.normal(0, noise, images.shape), 0, 255).astype(np.uint8)
        scores.append(shapes_metric(noisy, labels=labels)["both"])
    assert scores[0] > scores[1] > scores[2] > scores[3]
    assert scores[3] < 0.1
    # two shapes in one image are not valid, whatever their kinds and colours
    pairs = []
    for shape in SHAPES:
        for color in COLORS:
            left = np.asarray(draw_shape(shape, color, side=12, left=1, top=10, resolution=32))
            right = np.asarray(draw_shape("square", "white", side=12, left=18, top=10, resolution=32))
            pairs.append(np.maximum(left, right))
            assert judge_image(left).valid
    assert shapes_metric(np.stack(pairs))["valid"] == 0.0
    blurred = np.stack([np.asarray(Image.fromarray(i).filter(ImageFilter.GaussianBlur(3))) for i in images[:50]])
    assert shapes_metric(blurred)["valid"] < scores[0]


def test_metric_refuses_float_images() -> None:
    with pytest.raises(TypeError, match="uint8"):
        shapes_metric(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        shapes_metric(np.zeros((2, 3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="2 labels for 1 images"):
        shapes_metric(np.zeros((1, 8, 8, 3), np.uint8), labels=[0, 1])


def test_judge_names_shape_and_colour() -> None:
    image, _, caption = shapes_sample(0, 5, 32)
    judgement = judge_image(np.asarray(image))
    assert judgement.valid and f"a {judgement.color} {judgement.shape}" == caption


def test_class_balanced_seeds_gives_each_class_as_many_images_and_names_a_bad_range() -> None:
    """The studies' --seeds START:STOP (seed mod 24 picks the caption): each class the same count, or refused."""
    seeds = class_balanced_seeds("1000:1048")
    assert seeds == list(range(1000, 1048))
    assert np.bincount([seed % 24 for seed in seeds]).tolist() == [2] * 24
    for bad in ["1000:1050", "10:10", "48:0", "a:b", "1000"]:
        with pytest.raises(argparse.ArgumentTypeError, match=f"--seeds {bad}: "):
            class_balanced_seeds(bad)
    parser = argparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--seeds", type=class_balanced_seeds, default="0:24")
    assert parser.parse_args([]).seeds == list(range(24))  # the default string goes through the same check
    with pytest.raises(argparse.ArgumentError, match="multiple of 24"):
        parser.parse_args(["--seeds", "0:25"])
