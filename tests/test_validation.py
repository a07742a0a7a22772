"""Validation prompts (`callbacks.samples.prompts` / `prompts_file`): drawn at every grid and at the end for the given
prompts, not the data's captions; refused for models that read no text and when malformed, before anything is written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lightdiff.config import ConfigError
from lightdiff.data.shapes import label_to_caption
from lightdiff.train import run

from .conftest import TINY, TINY_TEXT_MODEL, compose_config, tiny_vae

TILE = 16 * 4  # a 16 px image in a grid upscaled 4x


def _tile(grid: Path, index: int, columns: int) -> np.ndarray:
    row, column = divmod(index, columns)
    pixels = np.asarray(Image.open(grid).convert("RGB"))
    return pixels[row * TILE : (row + 1) * TILE, column * TILE : (column + 1) * TILE]


def test_validation_prompts_are_drawn_at_every_grid(tmp_path: Path) -> None:
    tiny_vae().save_pretrained(tmp_path / "vae")
    own = label_to_caption(0)  # what the final grid draws seed 0 for (class 0's caption)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"# the prompts we care about\n{own}\n\na purple hexagon far away\n")
    cfg = compose_config(
        "train",
        [
            f"output_root={tmp_path}",
            *TINY,
            "run_name=prompts",
            "model=latent",
            f"model.vae={tmp_path / 'vae'}",
            *TINY_TEXT_MODEL,
            "callbacks.samples.every_n_steps=1",
            f"callbacks.samples.prompts_file={prompts}",
        ],
    )
    run(cfg)
    samples = Path(cfg.run_dir) / "samples"
    assert sorted(p.name for p in samples.glob("validation_*.png")) == [
        "validation_step0000001.png",
        "validation_step0000002.png",
    ]
    grid = samples / "validation_step0000002.png"
    assert Image.open(grid).size == (2 * TILE, TILE)  # two prompts, side by side
    final = samples / "final_step0000002.png"  # 4 images, 2 columns: seed i drawn for class i's caption
    # Seed 0 for the data's own caption: the same picture as the final grid's; seed 1 for the hexagon: not class 1's.
    assert np.array_equal(_tile(grid, 0, 2), _tile(final, 0, 2))
    assert not np.array_equal(_tile(grid, 1, 2), _tile(final, 1, 2))


def test_bad_validation_prompts_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    common = [f"output_root={tmp_path}", *TINY, "run_name=refused"]
    with pytest.raises(ConfigError, match="prompts_file='/nowhere.txt' is not a file"):
        run(compose_config("train", [*common, "callbacks.samples.prompts_file=/nowhere.txt"]))
    with pytest.raises(ConfigError, match="prompts and callbacks.samples.prompts_file are both set"):
        run(compose_config("train", [*common, "callbacks.samples.prompts=[a]", "callbacks.samples.prompts_file=x"]))
    with pytest.raises(ConfigError, match="reads no prompts"):  # the default model is class-conditional
        run(compose_config("train", [*common, "callbacks.samples.prompts=[a red circle]"]))
    assert not (tmp_path / "refused" / "checkpoints").exists()
