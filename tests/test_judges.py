"""Judges that see collapse (issue 41): the shapes feature network reads position and size, precision / recall and the
within-caption spread have their closed forms, and the distillation and video bars fail one fixed image per caption
while the data passes them."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lightdiff.data import MovingShapesDataset, ShapesDataset
from lightdiff.metrics import (
    FrechetEvaluator,
    RandomConvFeatures,
    ShapesFeatures,
    precision_recall,
    within_group_distance,
)
from lightdiff.metrics import shapes_features as shapes_features_module
from lightdiff.metrics.motion import VIDEO_BAR, video_judge
from lightdiff.metrics.shapes_features import SHIPPED_DIR, labelled_shapes, recipe_hash, weights_file
from lightdiff.sampling import to_uint8

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def features() -> ShapesFeatures:
    return ShapesFeatures()


def _compare_script():
    spec = importlib.util.spec_from_file_location("distillation_compare", REPO / "experiments/distillation/compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_shipped_feature_network_reads_shape_colour_centre_and_side(features: ShapesFeatures) -> None:
    assert features.path == weights_file(SHIPPED_DIR)  # shipped: nothing trained where it is used
    images, shapes, colours, geometry = labelled_shapes(240, seed=77)  # a draw it never saw
    read = features.predict(images)
    assert (read["shape"] == shapes.numpy()).mean() >= 0.95 and (read["colour"] == colours.numpy()).mean() >= 0.95
    assert np.abs(read["centre"] - geometry[:, :2].numpy()).mean() < 0.05
    assert np.abs(read["side"] - geometry[:, 2].numpy()).mean() < 0.05
    # Moving every shape 4 px right (of 32) moves what it reads by 1/8 of the picture, and its features.
    moved = torch.roll(images, shifts=4, dims=-1)
    inside = (geometry[:, 0] + geometry[:, 2] / 2 < 0.85).numpy()  # shapes the roll does not wrap round the edge
    shift = features.predict(moved)["centre"][inside, 0] - read["centre"][inside, 0]
    assert abs(float(np.median(shift)) - 0.125) < 0.03
    assert (
        torch.norm(features(moved) - features(images), dim=1).mean() > 0.5 * torch.norm(features(images), dim=1).std()
    )


def test_a_recipe_without_weights_is_trained_and_one_that_fails_calibration_is_refused(tmp_path, monkeypatch) -> None:
    shipped = weights_file(SHIPPED_DIR)
    monkeypatch.setitem(shapes_features_module.RECIPE, "version", 999)  # a new recipe: the shipped file is not it
    assert weights_file(SHIPPED_DIR) != shipped and recipe_hash() in weights_file(tmp_path).name
    broken = shapes_features_module._ShapesNet(int(shapes_features_module.RECIPE["width"]), 128)
    path = weights_file(tmp_path)
    calibration = {"shape_accuracy": 0.34, "colour_accuracy": 0.99, "centre_error": 0.01, "side_error": 0.01}
    save_file(broken.state_dict(), path, metadata={"calibration": json.dumps(calibration)})
    with pytest.raises(RuntimeError, match=r"fails its calibration.*'shape_accuracy': 0\.34"):
        ShapesFeatures(tmp_path)


def test_the_recipe_trains_the_same_weights_twice(monkeypatch) -> None:
    """The recipe is deterministic (fixed seeds, one thread): a shortened recipe trained twice gives identical weights,
    and another initialisation seed does not (the negative control). The full recipe is the same code at 1200 steps;
    the shipped file is its output (`ShapesFeatures(cache_dir)` with the shipped file absent retrains it: ~2 min)."""
    monkeypatch.setitem(shapes_features_module.RECIPE, "steps", 4)
    monkeypatch.setitem(shapes_features_module.RECIPE, "train_images", 64)
    first, second = shapes_features_module.train_shapes_net(), shapes_features_module.train_shapes_net()
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    monkeypatch.setitem(shapes_features_module.RECIPE, "init_seed", 1)
    other = shapes_features_module.train_shapes_net()
    assert not torch.equal(first.state_dict()["embed.1.weight"], other.state_dict()["embed.1.weight"])


def test_precision_and_recall_have_their_closed_forms() -> None:
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(600, 4, generator=generator)
    same = torch.randn(600, 4, generator=generator)
    far = same + 20
    collapsed = torch.zeros(600, 4)  # one point, repeated: the mode of the real distribution
    half = torch.cat([real[:300], real[:300] + 20])  # a two-mode "real" set, and a model that draws one mode
    one_mode = torch.randn(600, 4, generator=generator)
    assert min(precision_recall(real, same).values()) > 0.85
    assert precision_recall(real, far) == {"precision": 0.0, "recall": 0.0}
    assert precision_recall(real, collapsed) == {"precision": 1.0, "recall": 0.0}
    split = precision_recall(half, one_mode)
    assert split["precision"] > 0.85 and abs(split["recall"] - 0.5) < 0.06
    with pytest.raises(ValueError, match="k=3 nearest neighbours need more than 3"):
        precision_recall(real[:3], same)


def test_within_group_distance_is_the_mean_pairwise_rms_distance() -> None:
    vectors = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0], [1.0, 1.0], [7.0, 7.0]])
    # group 0: one pair at distance 5 (RMS over 2 dims: 5 / sqrt 2); group 1: identical; group 2: one image, left out
    assert within_group_distance(vectors, [0, 0, 1, 1, 2]) == pytest.approx((5 / 2**0.5 + 0) / 2)
    assert within_group_distance(vectors[[2, 3]], [0, 0]) == 0.0
    with pytest.raises(ValueError, match="no group of 2 images has two members"):
        within_group_distance(vectors[:2], [0, 1])


def test_the_distillation_bar_fails_one_image_per_caption_and_passes_the_data(features: ShapesFeatures) -> None:
    """compare.py's judge, with a second draw of the data as the 'teacher' (the best a teacher can be): a third draw
    of the data meets the bar, the collapse control (right about every prompt) fails it, on recall and diversity,
    and the old random-feature FID alone would have passed it."""
    compare = _compare_script()
    count = 240
    seeds = list(range(10000, 10000 + count))
    reference = ShapesDataset(size=count, resolution=16, seed=0)
    evaluators = {"shapes": FrechetEvaluator(features, num_samples=count)}
    evaluators["random"] = FrechetEvaluator(RandomConvFeatures(seed=0), num_samples=count)
    for evaluator in evaluators.values():
        evaluator.set_reference(reference, identity="")
    reference_features = features(torch.stack([reference[i]["pixel_values"] for i in range(count)]) / 2 + 0.5)

    def data_row(seed: int) -> dict:
        data = ShapesDataset(size=count, resolution=16, seed=seed)
        images = torch.stack([data[i]["pixel_values"] for i in range(count)]).clamp(-1, 1) / 2 + 0.5
        labels = [int(data[i]["label"]) for i in range(count)]
        prompts = [compare.CAPTIONS[label] for label in labels]
        return compare.judge(images, prompts, labels, evaluators, features, reference_features)

    teacher = data_row(1)
    data = compare.with_ratios(data_row(2), teacher)
    prompts = [compare.CAPTIONS[seed % 24] for seed in seeds]
    collapsed = compare.judge(
        compare.collapse_control(seeds), prompts, [s % 24 for s in seeds], evaluators, features, reference_features
    )
    collapsed = compare.with_ratios(collapsed, teacher)
    assert data["meets_bar"] and data["recall_vs_teacher"] > 0.8
    assert not collapsed["meets_bar"]
    assert collapsed["prompt_adherence"] == 1.0 and collapsed["precision"] > 0.9  # right, and each image plausible
    assert collapsed["recall"] == 0.0 and collapsed["within_caption_distance"] == 0.0
    assert collapsed["fid_vs_teacher"] > 2 * compare.BAR["fid_vs_teacher"]  # far from the data on these features
    table = compare.table_line(collapsed | {"model": "collapse control", "steps": 0, "images_per_second": None})
    assert table.startswith("| collapse control | - | - | 100.0% |") and table.endswith("| no |")


def test_the_video_bar_fails_one_clip_per_caption_and_passes_the_data(features: ShapesFeatures) -> None:
    def clips(seed: int, count: int) -> tuple[np.ndarray, list[str]]:
        data = MovingShapesDataset(size=count, resolution=32, num_frames=9, seed=seed)
        items = [data[index] for index in range(count)]
        return to_uint8(torch.stack([item["pixel_values"] for item in items]) / 2 + 0.5), [i["text"] for i in items]

    reference, reference_prompts = clips(0, 192)
    real, prompts = clips(1, 192)
    data = video_judge(reference, reference_prompts, real, prompts, features)
    assert data["right"] == 1.0 and data["recall"] > 0.8 and data["diversity_vs_reference"] > 0.8 and data["meets_bar"]
    first_of_caption = {prompt: index for index, prompt in reversed(list(enumerate(prompts)))}
    collapsed = real[[first_of_caption[prompt] for prompt in prompts]]  # each caption's first clip, repeated
    judged = video_judge(reference, reference_prompts, collapsed, prompts, features)
    assert judged["right"] == 1.0 >= VIDEO_BAR["right"]  # the motion metric alone would pass it
    # 96 captions in 192 clips: about two clips per caption, so recall (k = 3) sees little; the spread within a
    # caption is what fails it. With 20 images per caption (the distillation test above) recall falls to 0.
    assert (
        judged["within_caption_distance"] == 0.0
        and judged["diversity_vs_reference"] < VIDEO_BAR["diversity_vs_reference"]
    )
    assert judged["recall"] < data["recall"] and not judged["meets_bar"]


@pytest.mark.parametrize("video", [False, True], ids=["images", "clips"])
def test_the_preview_collapse_diagnostics_see_one_image_per_caption(video: bool) -> None:
    """callbacks.samples logs recall, precision and diversity of every preview batch against the data's own items: a
    second draw of the data is as varied as the data (diversity near 1, recall 1); the collapse control, the same
    batch with every caption's first image repeated, is right about every caption and has diversity 0."""
    from types import SimpleNamespace

    from lightdiff.callbacks.samples import SampleGrid

    kind = MovingShapesDataset if video else ShapesDataset
    size = {"size": 64, "resolution": 32} | ({"num_frames": 9} if video else {})
    reference = SimpleNamespace(source_dataset=kind(seed=0, **size))
    items = [kind(seed=1, **size)[index] for index in range(64)]
    batch = to_uint8(torch.stack([item["pixel_values"] for item in items]) / 2 + 0.5)
    groups = [item["text"] if video else item["label"] for item in items]
    grid = SampleGrid(sampler=None)
    data = grid._variety(reference, batch, groups)
    assert data["recall"] == 1.0 and 0.9 <= data["diversity"] <= 1.1 and data["precision"] >= 0.85
    first: dict[object, np.ndarray] = {}
    collapsed = np.stack([first.setdefault(group, image) for group, image in zip(groups, batch)])
    assert grid._variety(reference, collapsed, groups)["diversity"] == 0.0
    assert set(grid._variety(reference, batch, None)) == {"precision", "recall"}  # no captions: no spread
    assert grid._variety(reference, batch[:3], groups[:3]) == {}  # k = 3 needs four items
