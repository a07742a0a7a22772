"""Validation prompts (`callbacks.samples.prompts` / `prompts_file`): drawn at every grid and at the end for the given
prompts, not the data's captions; refused for models that read no text and when malformed, before anything is written.
"""

from __future__ import annotations

import contextlib
import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightdiff.config import ConfigError, build
from lightdiff.data.shapes import label_to_caption
from lightdiff.train import run
from lightdiff.trained import load_checkpoint_file

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


@pytest.mark.parametrize("objective", ["ddpm", "flow_matching", "edm", "cogvideox"])
def test_objectives_give_training_examples_at_fixed_levels(objective: str) -> None:
    made = build(compose_config("train", [f"objective={objective}"]).objective)
    x0, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    torch.manual_seed(0)
    drawn = made.training_example(x0, noise)
    fixed = made.example_at(x0, noise, drawn.timesteps)  # the same example at the drawn levels
    for name in ("x_t", "target", "weight"):
        assert torch.allclose(getattr(fixed, name), getattr(drawn, name), atol=1e-5), name
    # quantiles of training's own distribution: sorted, and the median where the distribution puts it
    levels = made.quantile_timesteps(torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64), x0)
    assert levels.shape == (3,) and bool((levels[1:] > levels[:-1]).all())
    torch.manual_seed(1)
    many = torch.cat([made.training_example(x0, noise).timesteps for _ in range(500)]).double()
    assert many.median().item() == pytest.approx(levels[1].item(), rel=0.05, abs=0.05 * made.num_train_timesteps)


SHAPES_RUN = ["trainer.max_steps=3", "callbacks.checkpoint.every_n_train_steps=3"]


def test_val_loss_is_measured_without_touching_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def train(name: str, *overrides: str) -> Path:
        cfg = compose_config("train", [f"output_root={tmp_path}", *TINY, f"run_name={name}", *SHAPES_RUN, *overrides])
        run(cfg)
        return Path(cfg.run_dir)

    plain = train("plain")
    validated = train("validated", "data.val_size=8", "trainer.val_check_interval=1")
    losses = _column(validated, "val/loss")
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert not _column(plain, "val/loss")
    # the held-out loss draws its own noise: training is bit-identical with or without it
    assert _weights(plain) == _weights(validated)
    # negative control: drawn from the run's random stream, validation changes what training draws next
    monkeypatch.setattr(torch.random, "fork_rng", lambda devices: contextlib.nullcontext())
    assert _weights(plain) != _weights(train("entangled", "data.val_size=8", "trainer.val_check_interval=1"))


def _column(run_dir: Path, key: str) -> list[float]:
    rows = csv.DictReader((next(run_dir.glob("csv/version_*")) / "metrics.csv").open())
    return [float(row[key]) for row in rows if row.get(key)]


def _weights(run_dir: Path) -> list[bytes]:
    state = load_checkpoint_file(run_dir / "checkpoints" / "last.ckpt")["state_dict"]
    return [value.numpy().tobytes() for value in state.values() if isinstance(value, torch.Tensor)]
