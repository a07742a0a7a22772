"""The edit judge of the shapes edit task (`data=shapes_edit`): an edit is right when the attribute its instruction
asks for changed as asked (accuracy) and the other attributes of the source were kept (preservation).

Each output is judged against its source with the shapes judge (`judge_image`: valid, shape, colour) and the shape's
geometry (`shape_geometry`: centre and side, in pixels):
- colour / shape: the output has the asked colour / shape;
- position: the centre moved at least half a step (`MOVE_STEP` of the picture) the asked way, and at most
  `POSITION_TOLERANCE` of the picture across it;
- size: the side grew (shrank) by at least half the edit's factor, in log terms (`SIZE_STEP` ** 0.5).
Kept, for every attribute not asked: the same shape and colour, the centre within `POSITION_TOLERANCE` of the
picture, the side within a factor `SIZE_TOLERANCE`. An output that is no valid shapes image is neither.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lightdiff.data.shapes_edit import DIRECTIONS, MOVE_STEP, SIZE_STEP, parse_instruction
from lightdiff.metrics.shapes import judge_image, shape_geometry

POSITION_TOLERANCE = 0.08  # of the picture's side: a kept position (a move is 0.25)
SIZE_TOLERANCE = 1.15  # a kept size: the side within this factor (a size edit is 1.4)


@dataclass(frozen=True)
class EditJudgement:
    valid: bool  # the output is one shapes-data-set shape
    asked: bool  # the asked attribute changed as asked
    kept: bool  # the other attributes were kept

    @property
    def right(self) -> bool:
        return self.valid and self.asked and self.kept


def judge_edit(source: np.ndarray, output: np.ndarray, instruction: str) -> EditJudgement:
    """Judge one edit: uint8 (H, W, 3) source and output images and the instruction that made one from the other."""
    edit = parse_instruction(instruction)
    before, after = judge_image(source), judge_image(output)
    where_before, where_after = shape_geometry(source), shape_geometry(output)
    if not after.valid or where_after is None or where_before is None:
        return EditJudgement(False, False, False)
    resolution = min(output.shape[:2])
    dx, dy = (where_after[0] - where_before[0]) / resolution, (where_after[1] - where_before[1]) / resolution
    growth = where_after[2] / where_before[2]
    same = {
        "color": after.color == before.color,
        "shape": after.shape == before.shape,
        "position": max(abs(dx), abs(dy)) <= POSITION_TOLERANCE,
        "size": 1 / SIZE_TOLERANCE <= growth <= SIZE_TOLERANCE,
    }
    if edit.attribute == "color":
        asked = after.color == edit.value
    elif edit.attribute == "shape":
        asked = after.shape == edit.value
    elif edit.attribute == "position":
        way_x, way_y = DIRECTIONS[edit.value]
        along, across = (dx, dy) if way_x else (dy, dx)
        asked = (way_x or way_y) * along >= MOVE_STEP / 2 and abs(across) <= POSITION_TOLERANCE
    else:
        factor = SIZE_STEP**0.5 if edit.value == "bigger" else SIZE_STEP**-0.5
        asked = growth >= factor if edit.value == "bigger" else growth <= factor
    kept = all(value for attribute, value in same.items() if attribute != edit.attribute)
    return EditJudgement(True, bool(asked), bool(kept))


def edit_metrics(sources: np.ndarray, outputs: np.ndarray, instructions: Sequence[str]) -> dict[str, float]:
    """Fractions of edits valid, asked-right (accuracy), kept (preservation) and right (both), overall and per
    attribute (`right_color`, ...), over uint8 (N, H, W, 3) sources and outputs."""
    if len(sources) != len(outputs) or len(outputs) != len(instructions):
        raise ValueError(f"{len(sources)} sources, {len(outputs)} outputs and {len(instructions)} instructions")
    judged = [judge_edit(s, o, i) for s, o, i in zip(sources, outputs, instructions)]
    metrics = {
        "edit_valid": float(np.mean([j.valid for j in judged])),
        "edit_accuracy": float(np.mean([j.valid and j.asked for j in judged])),
        "edit_preservation": float(np.mean([j.valid and j.kept for j in judged])),
        "edit_right": float(np.mean([j.right for j in judged])),
    }
    attributes = [parse_instruction(instruction).attribute for instruction in instructions]
    for attribute in sorted(set(attributes)):
        rows = [j for j, a in zip(judged, attributes) if a == attribute]
        metrics[f"edit_right_{attribute}"] = float(np.mean([j.right for j in rows]))
    return metrics
