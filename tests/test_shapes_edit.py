"""The shapes edit task (data=shapes_edit) and its judge (lightdiff.metrics.edits): exact targets that the judge scores
right, controls it scores wrong, instructions parsed or refused by name."""

import numpy as np
import pytest
import torch

from lightdiff.data.shapes_edit import (
    DIRECTIONS,
    Edit,
    ShapesEditDataModule,
    ShapesEditDataset,
    edit_sample,
    parse_instruction,
)
from lightdiff.metrics.edits import edit_metrics, judge_edit
from lightdiff.sampling import to_uint8


def _triples(count: int, resolution: int = 32) -> tuple[np.ndarray, np.ndarray, list[str]]:
    data = ShapesEditDataset(size=count, resolution=resolution)
    items = [data[i] for i in range(count)]
    sources = to_uint8(torch.stack([item["source_pixel_values"] for item in items]) / 2 + 0.5)
    targets = to_uint8(torch.stack([item["pixel_values"] for item in items]) / 2 + 0.5)
    return sources, targets, [str(item["text"]) for item in items]


def test_every_edit_changes_one_attribute_and_the_judge_scores_the_exact_targets_right() -> None:
    """Each triple's target differs from its source in the edited attribute alone; the judge scores >= 97% of the
    exact targets right for every attribute (the misses: the shapes judge's own rare misreads of a small triangle);
    the source returned unchanged is never right (nothing asked happened), another triple's target rarely keeps
    the source."""
    fields = {
        "color": [{"color"}],
        "shape": [{"shape"}],
        "position": [{"left"}, {"top"}],
        "size": [{"side", "left", "top"}],
    }
    for index in range(200):
        source, edit, target = edit_sample(0, index, 32)
        changed = {
            name for name in ("shape", "color", "side", "left", "top") if getattr(source, name) != getattr(target, name)
        }
        assert changed in fields[edit.attribute], (index, edit)
    sources, targets, instructions = _triples(400)
    metrics = edit_metrics(sources, targets, instructions)
    assert {key for key in metrics if key.startswith("edit_right_")} == {f"edit_right_{a}" for a in fields}
    assert metrics["edit_right"] >= 0.97 and min(metrics[f"edit_right_{a}"] for a in fields) >= 0.95, metrics
    unchanged = edit_metrics(sources, sources, instructions)
    assert unchanged["edit_accuracy"] == 0.0 and unchanged["edit_preservation"] >= 0.95  # control: nothing asked
    shuffled = edit_metrics(sources, np.roll(targets, 1, axis=0), instructions)
    assert shuffled["edit_right"] <= 0.15 and shuffled["edit_preservation"] <= 0.25  # control: another picture


def test_a_move_the_wrong_way_or_a_recoloured_move_is_judged_wrong() -> None:
    source, edit, target = next(
        (s, e, t) for s, e, t in (edit_sample(0, i, 32) for i in range(100)) if e.attribute == "position"
    )

    def draw(layout) -> np.ndarray:
        return np.asarray(layout.draw(32))

    assert judge_edit(draw(source), draw(target), edit.instruction).right
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}[edit.value]
    assert not judge_edit(draw(source), draw(target), Edit("position", opposite).instruction).asked
    recoloured = type(target)(
        target.shape, "white" if target.color != "white" else "red", target.side, target.left, target.top
    )
    judged = judge_edit(draw(source), draw(recoloured), edit.instruction)
    assert judged.asked and not judged.kept


def test_items_are_a_pure_function_of_seed_and_index_and_batches_carry_the_source() -> None:
    first, again = ShapesEditDataset(size=8)[3], ShapesEditDataset(size=8)[3]
    assert torch.equal(first["pixel_values"], again["pixel_values"]) and first["text"] == again["text"]
    other = ShapesEditDataset(size=8, seed=1)[3]
    assert not torch.equal(first["source_pixel_values"], other["source_pixel_values"])
    data = ShapesEditDataModule(size=8, batch_size=4)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["pixel_values"].shape == batch["source_pixel_values"].shape == (4, 3, 32, 32)
    assert all(parse_instruction(text).attribute in {"color", "shape", "position", "size"} for text in batch["text"])
    assert set(ShapesEditDataset(size=1).captions()) >= {"make it red", "turn it into a square", "move it left"}
    assert len(DIRECTIONS) == 4


def test_bad_edit_input_is_named() -> None:
    with pytest.raises(ValueError, match="'paint it red' is not an instruction of the shapes edit task"):
        parse_instruction("paint it red")
    with pytest.raises(ValueError, match="data.resolution=8 is too small"):
        ShapesEditDataset(resolution=8)


# ----- editing pairs in an image folder (metadata.jsonl's source_file_name) -------------------------------------------


def _pair_folder(root, lines: list[dict], images: dict[str, tuple[int, int]]) -> None:
    import json

    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    for index, (name, (height, width)) in enumerate(sorted(images.items())):
        pixels = np.random.default_rng(index).integers(0, 255, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / name)
    (root / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_a_pair_folder_crops_and_flips_source_and_target_alike(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each source goes through its target's random crop and flip: with a source that is a copy of its target, the
    two tensors are equal on every draw; drawing the source's crop afresh (the control) breaks that."""
    import shutil

    from lightdiff.data.image_folder import ImageFolderDataset

    sizes = {f"t{i}.png": (40, 56) for i in range(4)}
    lines = [{"file_name": f"t{i}.png", "source_file_name": f"s{i}.png", "text": "make it red"} for i in range(4)]
    _pair_folder(tmp_path, lines, sizes)
    for i in range(4):
        shutil.copy(tmp_path / f"t{i}.png", tmp_path / f"s{i}.png")
    data = ImageFolderDataset(str(tmp_path), 32, center_crop=False, random_flip=True)
    torch.manual_seed(0)
    items = [data[i % 4] for i in range(40)]
    assert all(torch.equal(item["pixel_values"], item["source_pixel_values"]) for item in items)
    assert len({tuple(item["size_and_crop"].tolist()) for item in items}) > 4  # the crops did vary
    monkeypatch.setattr(torch.random, "set_rng_state", lambda state: None)  # control: no shared draw
    assert not all(torch.equal(data[i % 4]["pixel_values"], data[i % 4]["source_pixel_values"]) for i in range(40))


def test_several_references_stack_and_bad_pairs_are_named(tmp_path) -> None:
    from lightdiff.data.image_folder import ImageFolderDataset

    sizes = {"t.png": (32, 32), "a.png": (32, 32), "b.png": (32, 32), "small.png": (16, 16)}
    lines = [{"file_name": "t.png", "source_file_name": ["a.png", "b.png"], "text": "put a on b"}]
    _pair_folder(tmp_path / "multi", lines, sizes)
    item = ImageFolderDataset(str(tmp_path / "multi"), 32)[0]
    assert item["source_pixel_values"].shape == (2, 3, 32, 32)

    def refused(name: str, lines: list[dict], match: str, error: type = ValueError) -> None:
        _pair_folder(tmp_path / name, lines, sizes)
        with pytest.raises(error, match=match):
            ImageFolderDataset(str(tmp_path / name), 32)

    refused("missing", [{"file_name": "t.png", "source_file_name": "gone.png", "text": "x"}],
            r"pairs images with missing source\(s\): \['gone.png'\]", FileNotFoundError)  # fmt: skip
    refused("size", [{"file_name": "t.png", "source_file_name": "small.png", "text": "x"}],
            "t.png is 32x32 .* its source .*small.png 16x16: a pair is cropped alike")  # fmt: skip
    refused("no-text", [{"file_name": "t.png", "source_file_name": "a.png"}],
            "file_name='t.png' pairs a source without an instruction")  # fmt: skip
    half = [{"file_name": "t.png", "source_file_name": "a.png", "text": "x"}, {"file_name": "b.png", "text": "y"}]
    refused("half", half, "file_name='b.png' has no source_file_name, while 1 other line")
    refused("outside", [{"file_name": "t.png", "source_file_name": "../t.png", "text": "x"}],
            "source_file_name='../t.png' points outside data.root")  # fmt: skip
    (tmp_path / "broken").mkdir()
    _pair_folder(tmp_path / "broken", [{"file_name": "t.png", "source_file_name": "a.png", "text": "x"}], sizes)
    (tmp_path / "broken" / "a.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="t.png: its source cannot read image .*a.png"):
        ImageFolderDataset(str(tmp_path / "broken"), 32)


def test_an_hf_data_set_of_pairs_crops_source_and_target_alike(tmp_path) -> None:
    """data=hf with data.source_column: a parquet data set with an image and a source column (the source a copy of
    its image) gives equal target and source tensors under random crops and flips; a source of another size, or
    pairs without an instruction column, are named when the data set is opened."""
    import datasets
    from PIL import Image

    from lightdiff.data.image_folder import HFImageDataset

    def write(folder, sizes: list[tuple[int, int]], source_sizes: list[tuple[int, int]]) -> str:
        rng = np.random.default_rng(0)
        images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
        sources = [
            image if image.size[::-1] == size else image.resize(size[::-1]) for image, size in zip(images, source_sizes)
        ]
        rows = {"image": images, "source": sources, "text": ["make it red"] * len(images)}
        features = datasets.Features(
            {"image": datasets.Image(), "source": datasets.Image(), "text": datasets.Value("string")}
        )
        folder.mkdir()
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(folder / "train.parquet"))
        return str(folder)

    good = write(tmp_path / "good", [(40, 56)] * 3, [(40, 56)] * 3)
    data = HFImageDataset(good, 32, caption_column="text", center_crop=False, random_flip=True, source_column="source")
    torch.manual_seed(0)
    items = [data[i % 3] for i in range(24)]
    assert all(torch.equal(item["pixel_values"], item["source_pixel_values"]) for item in items)
    assert items[0]["text"] == "make it red"
    other = write(tmp_path / "other", [(40, 56)] * 2, [(40, 56), (20, 28)])
    with pytest.raises(ValueError, match="row 1 of .*: the target is 40x56 .* its source 20x28"):
        HFImageDataset(other, 32, caption_column="text", source_column="source")
    with pytest.raises(ValueError, match="editing pairs need their instruction column"):
        HFImageDataset(good, 32, source_column="source")


def test_pair_shards_carry_the_source_cropped_with_its_target(tmp_path) -> None:
    """`python -m lightdiff.data.shard` on a pair folder writes each source as KEY.source.png; decoded under random
    crops and flips it equals its target when it is a copy of it; a source of another size stops the writing,
    named, and the shards written so far are removed."""
    import shutil

    from lightdiff.data.shard import main as write_shards
    from lightdiff.data.shard_stream import decode_sample, read_shard
    from lightdiff.data.transforms import ImageTransform

    lines = [{"file_name": f"t{i}.png", "source_file_name": f"s{i}.png", "text": "make it red"} for i in range(3)]
    _pair_folder(tmp_path / "pairs", lines, {f"t{i}.png": (40, 56) for i in range(3)})
    for i in range(3):
        shutil.copy(tmp_path / "pairs" / f"t{i}.png", tmp_path / "pairs" / f"s{i}.png")
    write_shards([str(tmp_path / "pairs"), str(tmp_path / "shards")])
    raws = read_shard(str(tmp_path / "shards" / "train-000000.tar"))
    assert len(raws) == 3 and all("source.png" in raw for raw in raws)
    transform = ImageTransform(32, center_crop=False, random_flip=True)
    torch.manual_seed(0)
    items = [decode_sample(raw, transform, "txt") for raw in raws * 6]
    assert all(torch.equal(item["pixel_values"], item["source_pixel_values"]) for item in items)
    assert items[0]["text"] == "make it red"
    _pair_folder(tmp_path / "bad", lines[:1], {"t0.png": (40, 56), "s0.png": (20, 28)})
    with pytest.raises(ValueError, match="t0.png is 40x56 .* its source .*s0.png 20x28"):
        write_shards([str(tmp_path / "bad"), str(tmp_path / "bad-shards")])
    assert not list((tmp_path / "bad-shards").glob("*.tar"))  # nothing left of the stopped writing
