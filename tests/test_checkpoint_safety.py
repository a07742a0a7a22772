"""Checkpoints are never lost, and NaN / Inf never reaches the weights or a checkpoint file.

Each test breaks one guarantee on purpose (a crash in the middle of a save, a truncated or garbage file, an unreadable
new checkpoint, a NaN loss, a NaN weight) and checks that the previous good state survives.
"""

from __future__ import annotations

import csv
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from lightdiff.callbacks import NonFiniteGuard
from lightdiff.checkpointing import (
    AtomicCheckpointIO,
    CheckpointError,
    NonFiniteError,
    checkpoint_problem,
    first_nonfinite,
    newest_loadable_checkpoint,
)
from lightdiff.config import ConfigError
from lightdiff.files import save_atomically
from lightdiff.methods.autoencoder import AutoencoderTraining
from lightdiff.methods.diffusion import DiffusionTraining
from lightdiff.train import run
from lightdiff.trained import load_checkpoint_file
from tests.conftest import TINY, compose_config

NAN = float("nan")


def _checkpoint(step: int, value: float = 1.0) -> dict:
    """The parts of a Lightning checkpoint that the checks look at."""
    return {
        "state_dict": {"net.weight": torch.full((64, 64), value)},  # 16 kB: the middle of the file is tensor data
        "global_step": step,
        "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(4, 4), "step": torch.tensor(float(step))}}}],
        "callbacks": {"ema": {"shadow_params": [torch.full((4, 4), value)]}},
    }


def _metrics(run_dir: Path) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for path in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        with path.open() as handle:
            rows += list(csv.DictReader(handle))
    return rows


def _all_finite(checkpoint: dict) -> bool:
    return first_nonfinite({k: checkpoint[k] for k in ("state_dict", "optimizer_states", "callbacks")}) is None


def _steps_of(folder: Path) -> dict[str, int]:
    return {path.name: load_checkpoint_file(path)["global_step"] for path in sorted(folder.glob("*.ckpt"))}


# ----- crash during a save ------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_train_config(tiny_train_config):
    """The tiny runs with a checkpoint at every step: these tests damage, retain and refuse step checkpoints."""
    return lambda *overrides: tiny_train_config("callbacks.checkpoint.every_n_train_steps=1", *overrides)


def test_exception_in_the_middle_of_a_save_keeps_the_previous_file(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(_checkpoint(1), path)
    before = path.read_bytes()

    def half_written_save(data: object, handle) -> None:  # a full disk or a killed writer, half-way through
        handle.write(before[: len(before) // 2])
        raise OSError("No space left on device")

    monkeypatch.setattr("lightdiff.files.torch.save", half_written_save)
    with pytest.raises(OSError, match="No space left"):
        AtomicCheckpointIO().save_checkpoint(_checkpoint(2, value=2.0), path)
    assert path.read_bytes() == before
    assert checkpoint_problem(path) is None and load_checkpoint_file(path)["global_step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # the temporary file is gone


def test_process_killed_in_the_middle_of_a_save_keeps_the_previous_file(tmp_path: Path) -> None:
    """A SIGKILL runs no cleanup: the half-written temporary file stays, hidden, and resume ignores it."""
    path = tmp_path / "last.ckpt"
    save_atomically(_checkpoint(1), path)
    before = path.read_bytes()
    script = f"""
import os, torch
import lightdiff.files as files
def dying_save(data, handle):
    handle.write(b"PK" + bytes(1000))
    handle.flush()
    os._exit(9)  # no exception handler, no finally: as a kill -9 or a node failure
files.torch.save = dying_save
files.save_atomically({{"global_step": 2}}, {str(path)!r})
"""
    assert subprocess.run([sys.executable, "-c", script], check=False).returncode == 9
    assert path.read_bytes() == before
    leftovers = [p for p in tmp_path.iterdir() if p != path]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".last.ckpt.") and leftovers[0].suffix == ".tmp"
    assert newest_loadable_checkpoint(tmp_path) == path


# ----- damaged files on resume --------------------------------------------------------------------------------------


def test_newest_loadable_checkpoint_skips_damaged_files(tmp_path: Path, caplog) -> None:
    assert newest_loadable_checkpoint(tmp_path) is None  # no checkpoint: a fresh run
    for name, step in [("step0000001.ckpt", 1), ("step0000002.ckpt", 2), ("last.ckpt", 2)]:
        save_atomically(_checkpoint(step), tmp_path / name)
    assert newest_loadable_checkpoint(tmp_path) == tmp_path / "last.ckpt"  # a tie on the step: last.ckpt

    last = tmp_path / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # truncated
    with caplog.at_level(logging.WARNING):
        assert newest_loadable_checkpoint(tmp_path) == tmp_path / "step0000002.ckpt"
    assert f"skipping checkpoint {last}" in caplog.text

    # Zeros over the middle of the tensors, size unchanged (a lost block): the index still loads, the CRC-32 fails.
    step2 = tmp_path / "step0000002.ckpt"
    data = bytearray(step2.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    step2.write_bytes(bytes(data))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert newest_loadable_checkpoint(tmp_path) == tmp_path / "step0000001.ckpt"
    assert f"skipping checkpoint {step2}" in caplog.text and "fails its CRC-32 check" in caplog.text

    (tmp_path / "step0000003.ckpt").write_bytes(b"")  # a file created but never written
    (tmp_path / "step0000004.ckpt").write_bytes(b"\x00garbage" * 100)
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")  # loads, but is no resumable checkpoint
    assert newest_loadable_checkpoint(tmp_path) == tmp_path / "step0000001.ckpt"
    assert "has no global_step" in checkpoint_problem(tmp_path / "other.ckpt")

    (tmp_path / "step0000001.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError) as error:
        newest_loadable_checkpoint(tmp_path)
    for name in ("last.ckpt", "other.ckpt", *(f"step000000{i}.ckpt" for i in range(1, 5))):
        assert str(tmp_path / name) in str(error.value)


def test_resume_skips_a_truncated_last_checkpoint(tiny_train_config, caplog) -> None:
    cfg = tiny_train_config("run_name=damaged", "trainer.max_steps=2")
    run(cfg)
    run_dir = Path(cfg.run_dir)
    folder = run_dir / "checkpoints"
    assert _steps_of(folder) == {"last.ckpt": 2, "step0000002.ckpt": 2}
    last = folder / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a crash of a writer that was not atomic

    with caplog.at_level(logging.WARNING, logger="lightdiff"):
        trainer = run(tiny_train_config("run_name=damaged", "trainer.max_steps=3"))
    assert f"skipping checkpoint {last}" in caplog.text
    assert f"resuming damaged from {folder / 'step0000002.ckpt'}" in (run_dir / "train.log").read_text()
    assert trainer.global_step == 3
    losses = [r for r in _metrics(run_dir) if r.get("train/loss")]
    assert len(losses) == 3  # 2 steps, then 1: continued, not started over
    assert load_checkpoint_file(last)["global_step"] == 3  # rewritten whole
    # save_top_k=1 prunes the step checkpoint the run fell back to, as any other (Lightning alone would keep the file
    # it resumed from for ever).
    assert _steps_of(folder) == {"last.ckpt": 3, "step0000003.ckpt": 3}

    # Nothing loadable left: an error naming every file, and nothing is overwritten.
    for path in folder.glob("*.ckpt"):
        path.write_bytes(b"\x00" * 64)
    names = sorted(folder.iterdir())
    with pytest.raises(CheckpointError, match="no checkpoint in .* can be loaded") as error:
        run(tiny_train_config("run_name=damaged", "trainer.max_steps=4"))
    assert all(str(path) in str(error.value) for path in names)
    assert sorted(folder.iterdir()) == names and all(p.read_bytes() == b"\x00" * 64 for p in names)

    # A damaged file named by ckpt_path is an error naming it, never a silent fallback to another checkpoint.
    with pytest.raises(ConfigError, match=f"ckpt_path='{last}' cannot be loaded"):
        run(tiny_train_config("run_name=elsewhere", f"ckpt_path={last}"))


# ----- retention ----------------------------------------------------------------------------------------------------


def test_retention_never_deletes_the_last_loadable_checkpoint(tiny_train_config, monkeypatch, caplog) -> None:
    """From step 3 on every save produces an unreadable file: step 2's checkpoint must survive save_top_k=1."""
    save = AtomicCheckpointIO.save_checkpoint

    def corrupting_save(self, checkpoint: dict, path, storage_options=None) -> None:
        if checkpoint["global_step"] >= 3:
            Path(path).write_bytes(b"\x00" * 128)  # a storage layer that lost the data
        else:
            save(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", corrupting_save)
    cfg = tiny_train_config("run_name=retention", "trainer.max_steps=3", "callbacks.checkpoint.save_top_k=1")
    with caplog.at_level(logging.WARNING, logger="lightdiff"):
        run(cfg)
    folder = Path(cfg.run_dir) / "checkpoints"
    kept = folder / "step0000002.ckpt"
    assert kept.is_file() and checkpoint_problem(kept) is None
    assert not (folder / "step0000001.ckpt").exists()  # retention still works when the new file loads
    assert checkpoint_problem(folder / "step0000003.ckpt") is not None
    assert f"keeping {kept}" in caplog.text
    assert newest_loadable_checkpoint(folder) == kept


# ----- NaN / Inf ----------------------------------------------------------------------------------------------------


def test_a_checkpoint_with_nonfinite_tensors_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint(_checkpoint(1), path)
    before = path.read_bytes()
    weights = _checkpoint(2)
    weights["state_dict"]["net.weight"][1, 2] = NAN
    with pytest.raises(NonFiniteError, match=r"refusing to write checkpoint .*last.ckpt: .*\['net.weight'\]"):
        io.save_checkpoint(weights, path)
    ema = _checkpoint(2)
    ema["callbacks"]["ema"]["shadow_params"][0][0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"\['ema'\]\['shadow_params'\]\[0\]"):
        io.save_checkpoint(ema, path)
    moments = _checkpoint(2)
    moments["optimizer_states"][0]["state"][0]["exp_avg"][0, 0] = NAN
    with pytest.raises(NonFiniteError, match=r"\['optimizer_states'\]\[0\]\['state'\]\[0\]\['exp_avg'\]"):
        io.save_checkpoint(moments, path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]

    # ModelCheckpoint's scores start at -inf by design: metric values, not weights, so they pass.
    scores = _checkpoint(2)
    scores["callbacks"]["StepCheckpoint{...}"] = {"kth_value": torch.tensor(-float("inf")), "best_model_score": None}
    io.save_checkpoint(scores, path)
    assert load_checkpoint_file(path)["global_step"] == 2


def _poison_pixel_step(monkeypatch, bad_batch: int) -> list[list[torch.Tensor]]:
    """DiffusionTraining whose loss is NaN at batch `bad_batch`; returns the weights seen at the start of each step."""
    training_step = DiffusionTraining.training_step
    weights: list[list[torch.Tensor]] = []

    def poisoned(self, batch, batch_idx: int) -> torch.Tensor:
        weights.append([p.detach().clone() for p in self.net.parameters()])
        loss = training_step(self, batch, batch_idx)
        return loss * NAN if batch_idx == bad_batch else loss

    monkeypatch.setattr(DiffusionTraining, "training_step", poisoned)
    return weights


def test_nan_loss_step_is_skipped(tiny_train_config, monkeypatch, caplog) -> None:
    weights = _poison_pixel_step(monkeypatch, bad_batch=1)
    cfg = tiny_train_config(
        "run_name=skip", "trainer.max_steps=4", "callbacks.nonfinite.action=skip", "callbacks.checkpoint.save_top_k=2"
    )
    with caplog.at_level(logging.WARNING, logger="lightdiff"):
        trainer = run(cfg)
    assert trainer.global_step == 4 and len(weights) == 4
    for before, after in zip(weights[1], weights[2]):  # the bad step left every weight as it was
        assert torch.equal(before, after)
    assert any(not torch.equal(a, b) for a, b in zip(weights[2], weights[3]))  # the next step trained
    assert all(torch.isfinite(w).all() for w in weights[3])
    assert "NaN or infinite loss of optimiser 0 at global step 1: update skipped (1 skipped" in caplog.text
    counts = [float(r["train/nonfinite_steps"]) for r in _metrics(Path(cfg.run_dir)) if r.get("train/nonfinite_steps")]
    assert counts == [0.0, 1.0, 1.0, 1.0]
    folder = Path(cfg.run_dir) / "checkpoints"
    assert _steps_of(folder) == {"last.ckpt": 4, "step0000003.ckpt": 3, "step0000004.ckpt": 4}  # the 2 newest
    checkpoint = load_checkpoint_file(folder / "last.ckpt")
    assert _all_finite(checkpoint)
    assert checkpoint["callbacks"]["nonfinite"] == {"skipped_steps": 1, "consecutive": 0}


def test_nan_loss_stops_the_run_when_asked(tiny_train_config, monkeypatch) -> None:
    _poison_pixel_step(monkeypatch, bad_batch=1)
    cfg = tiny_train_config("run_name=stop", "trainer.max_steps=4", "callbacks.nonfinite.action=stop")
    with pytest.raises(NonFiniteError, match="NaN or infinite loss of optimiser 0 at global step 1: stopping"):
        run(cfg)
    folder = Path(cfg.run_dir) / "checkpoints"
    assert _steps_of(folder) == {"last.ckpt": 1, "step0000001.ckpt": 1}  # nothing written after the bad step
    assert all(_all_finite(load_checkpoint_file(path)) for path in folder.glob("*.ckpt"))


class _Line(pl.LightningModule):
    """The smallest automatically optimised module, whose every step is broken: a NaN loss, or a finite loss with
    NaN gradients (d sqrt(x) / dx at x = 0 is infinite, times 0)."""

    def __init__(self, broken: str) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.broken = broken

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.layer(batch).pow(2).mean()
        if self.broken == "loss":
            return loss * NAN
        return loss + torch.sqrt(self.layer.weight * 0).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters())


@pytest.mark.parametrize("broken", ["loss", "gradients"])
def test_a_run_that_only_skips_stops(broken: str, caplog) -> None:
    model = _Line(broken)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = pl.Trainer(
        max_steps=10,
        callbacks=[NonFiniteGuard(action="skip", max_consecutive=3)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with caplog.at_level(logging.WARNING), pytest.raises(NonFiniteError, match="the last 3 training steps all had"):
        trainer.fit(model, DataLoader(torch.randn(40, 2), batch_size=2))
    assert trainer.global_step == 3
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert f"NaN or infinite {broken} of optimiser 0 at global step 2: update skipped (3 skipped" in caplog.text
    with pytest.raises(ValueError, match="action='ignore'"):
        NonFiniteGuard(action="ignore")


def test_nan_weights_are_never_checkpointed(tiny_train_config, monkeypatch) -> None:
    """A weight made NaN outside any optimiser step (here: directly, at step 3) stops the run at the next save."""
    training_step = DiffusionTraining.training_step

    def corrupting(self, batch, batch_idx: int) -> torch.Tensor:
        if batch_idx == 2:
            with torch.no_grad():
                self.net.conv_in.weight[0, 0, 0, 0] = NAN
        return training_step(self, batch, batch_idx)

    monkeypatch.setattr(DiffusionTraining, "training_step", corrupting)
    cfg = tiny_train_config("run_name=nanweights", "trainer.max_steps=4")
    folder = Path(cfg.run_dir) / "checkpoints"
    with pytest.raises(
        NonFiniteError, match=r"refusing to write checkpoint .*\['state_dict'\]\['net.conv_in.weight'\]"
    ):
        run(cfg)
    assert _steps_of(folder) == {"last.ckpt": 2, "step0000002.ckpt": 2}  # the previous last.ckpt is kept
    assert _all_finite(load_checkpoint_file(folder / "last.ckpt"))


def test_nan_loss_is_skipped_under_manual_optimisation(tiny_train_config, monkeypatch) -> None:
    """The autoencoder steps its two optimisers itself (as turbo does): both updates of the bad batch are dropped."""
    training_step, manual_backward = AutoencoderTraining.training_step, AutoencoderTraining.manual_backward
    weights: list[list[torch.Tensor]] = []

    def recording(self, batch, batch_idx: int) -> None:
        weights.append([p.detach().clone() for p in self.parameters() if p.requires_grad])
        self.poisoned = batch_idx == 1
        training_step(self, batch, batch_idx)

    def poisoned_backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        manual_backward(self, loss * NAN if self.poisoned else loss, *args, **kwargs)

    monkeypatch.setattr(AutoencoderTraining, "training_step", recording)
    monkeypatch.setattr(AutoencoderTraining, "manual_backward", poisoned_backward)
    # disc_start=0: the critic trains from the first batch, so each batch makes two optimiser steps.
    cfg = tiny_train_config("run_name=gan", "model=autoencoder", "model.disc_start=0", "trainer.max_steps=6")
    trainer = run(cfg)
    assert trainer.global_step == 6 and len(weights) == 3
    for before, after in zip(weights[1], weights[2]):
        assert torch.equal(before, after)
    checkpoint = load_checkpoint_file(Path(cfg.run_dir) / "checkpoints" / "last.ckpt")
    assert _all_finite(checkpoint) and checkpoint["callbacks"]["nonfinite"]["skipped_steps"] == 1


def test_a_run_writes_its_final_state_once(tmp_path: Path, monkeypatch) -> None:
    """FinalCheckpoint writes last.ckpt at the end; Lightning's own end-of-training save of last.ckpt (which it makes
    when no periodic save happened) would write the same state again. Negative control: the periodic saves at every
    step are all still made, and the file holds the last step."""
    saves: list[tuple[str, int]] = []
    original = pl.Trainer.save_checkpoint

    def counting(trainer: pl.Trainer, path, *args, **kwargs) -> None:
        saves.append((Path(path).name, trainer.global_step))
        original(trainer, path, *args, **kwargs)

    monkeypatch.setattr(pl.Trainer, "save_checkpoint", counting)
    run(compose_config("train", [f"output_root={tmp_path}", *TINY, "run_name=once", "trainer.max_steps=3"]))
    assert saves == [("last.ckpt", 3)]
    assert load_checkpoint_file(tmp_path / "once" / "checkpoints" / "last.ckpt")["global_step"] == 3
    saves.clear()
    every_step = ["callbacks.checkpoint.every_n_train_steps=1", "trainer.max_steps=2"]
    run(compose_config("train", [f"output_root={tmp_path}", *TINY, "run_name=periodic", *every_step]))
    assert [step for name, step in saves if name.startswith("step")] == [1, 2]
    assert saves[-1] == ("last.ckpt", 2)
