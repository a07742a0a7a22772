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
