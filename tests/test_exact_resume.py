"""Exact resume: a run killed with SIGKILL at an arbitrary step and resumed ends bit-identical to one never
interrupted (weights, EMA, optimiser state, loss curve), including across epoch boundaries. Negative controls show
the comparison catches a missing RNG restore and a missing data-loader restore."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lightdiff.callbacks import random_state
from lightdiff.callbacks.preemption import PREEMPTED_EXIT_STATUS
from lightdiff.config import ConfigError
from lightdiff.data.sampler import ResumableSampler
from lightdiff.train import run
from lightdiff.trained import load_checkpoint_file

from .conftest import KILLABLE, REPO, TEST_THREADS, TINY, compose_config, losses_by_step

# 4 batches per epoch, so 12 steps cross two epoch boundaries; a sample grid every 2 steps, so a kill can land in
# the middle of sampling; a checkpoint every step.
OVERRIDES = [
    *TINY,
    "trainer.max_steps=12",
    "data.size=16",
    "callbacks.samples.every_n_steps=2",
    "callbacks.checkpoint.every_n_train_steps=1",
]


def _assert_same_state(expected: dict, actual: dict) -> None:
    assert actual["global_step"] == expected["global_step"]
    for key, value in expected["state_dict"].items():
        other = actual["state_dict"][key]  # a text family's tokenizer travels as extra state: plain data
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, (
            f"weights differ at {key}"
        )
    for a, b in zip(expected["callbacks"]["ema"]["shadow_params"], actual["callbacks"]["ema"]["shadow_params"]):
        assert torch.equal(a, b), "EMA weights differ"
    expected_optimizer = expected["optimizer_states"][0]["state"]
    actual_optimizer = actual["optimizer_states"][0]["state"]
    for index, moments in expected_optimizer.items():
        for name, value in moments.items():
            assert torch.equal(value, actual_optimizer[index][name]), f"optimiser {name} of parameter {index} differs"


def _signal_part_way(
    tmp_path: Path, run_name: str, min_step: int, signum: signal.Signals = signal.SIGKILL, env: dict | None = None
) -> int:
    """Start the run in a child process, send `signum` once checkpoint `min_step` exists, wait for the child to end;
    return the step of the last checkpoint."""
    overrides = [f"output_root={tmp_path}", f"run_name={run_name}", *OVERRIDES]
    code = KILLABLE.format(repo=str(REPO), overrides=overrides)
    checkpoints = tmp_path / run_name / "checkpoints"
    environment = {**os.environ, "WANDB_MODE": "offline", **(env or {})}
    child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=environment)
    try:
        deadline = time.monotonic() + 300
        while not (checkpoints / f"step{min_step:07d}.ckpt").exists():
            assert child.poll() is None, f"the child run exited with {child.returncode} before step {min_step}"
            assert time.monotonic() < deadline, "the child run did not reach its checkpoint in time"
            time.sleep(0.05)
        os.kill(child.pid, signum)
        child.wait(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    # a preempted run exits with its own status: "resume me", neither success nor an error
    expected_code = -signal.SIGKILL if signum == signal.SIGKILL else PREEMPTED_EXIT_STATUS
    assert child.returncode == expected_code
    last = load_checkpoint_file(checkpoints / "last.ckpt")
    assert last["global_step"] < 12, "the child run finished before it was killed: the test proves nothing"
    return last["global_step"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict[int, float]]:
    root = tmp_path_factory.mktemp("uninterrupted")
    cfg = compose_config("train", [f"output_root={root}", "run_name=whole", *OVERRIDES])
    torch.set_num_threads(TEST_THREADS)  # module fixtures run before the autouse one that sets it per test
    run(cfg)
    run_dir = root / "whole"
    return load_checkpoint_file(run_dir / "checkpoints" / "last.ckpt"), losses_by_step(run_dir)


@pytest.mark.slow  # subprocesses: run by .ci/run with -m slow
def test_sigkill_then_resume_is_bit_identical(tiny_train_config, tmp_path: Path, uninterrupted) -> None:
    expected, expected_losses = uninterrupted
    killed_at = _signal_part_way(tmp_path, "cut", min_step=5)  # mid-epoch 2 at the earliest
    run(tiny_train_config("run_name=cut", *OVERRIDES[len(TINY) :]))
    actual = load_checkpoint_file(tmp_path / "cut" / "checkpoints" / "last.ckpt")
    _assert_same_state(expected, actual)
    losses = losses_by_step(tmp_path / "cut")
    resumed_steps = [step for step in losses if step >= killed_at]
    assert resumed_steps, "the resumed session logged no loss"
    for step, loss in losses.items():
        assert loss == expected_losses[step], f"loss at step {step}: {loss} vs {expected_losses[step]}"


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_saves_stops_requeues_and_resumes(
    signum: signal.Signals, tiny_train_config, tmp_path: Path, uninterrupted
) -> None:
    """SIGTERM / SLURM's SIGUSR1: the run saves last.ckpt at the end of the batch and exits 75; under SLURM it
    requeues its job (a fake `scontrol` records the call); the same command then finishes the run exactly."""
    expected, _ = uninterrupted
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol_calls.txt"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}
    stopped_at = _signal_part_way(tmp_path, "cut", min_step=3, signum=signum, env=env)
    log_text = (tmp_path / "cut" / "train.log").read_text()
    assert f"{signum.name} received: saving" in log_text
    saved = load_checkpoint_file(tmp_path / "cut" / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == stopped_at and stopped_at >= 3
    if signum == signal.SIGUSR1:
        assert calls.read_text().split() == ["requeue", "4242"]
    else:
        assert not calls.exists()  # a plain SIGTERM (not SLURM's warning) does not requeue
    run(tiny_train_config("run_name=cut", *OVERRIDES[len(TINY) :]))
    _assert_same_state(expected, load_checkpoint_file(tmp_path / "cut" / "checkpoints" / "last.ckpt"))


@pytest.fixture(scope="module")
def stopped_mid_epoch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run stopped at step 6 (mid-epoch 2), once: each resume below resumes a copy (the stop itself restores
    nothing, so the negative controls' patches would not change it)."""
    root = tmp_path_factory.mktemp("stopped")
    torch.set_num_threads(TEST_THREADS)  # module fixtures run before the autouse one that sets it per test
    run(compose_config("train", [f"output_root={root}", "run_name=cut", *OVERRIDES, "trainer.max_steps=6"]))
    return root / "cut"


def _resume_a_copy(tiny_train_config, stopped: Path) -> dict:
    cfg = tiny_train_config("run_name=cut", *OVERRIDES[len(TINY) :])
    shutil.copytree(stopped, cfg.run_dir)
    run(cfg)
    return load_checkpoint_file(Path(cfg.run_dir) / "checkpoints" / "last.ckpt")


def test_resume_mid_epoch_is_bit_identical(tiny_train_config, uninterrupted, stopped_mid_epoch) -> None:
    """Stopped at step 6 (mid-epoch) and resumed: the same weights, EMA and optimiser state as never stopping."""
    expected, _ = uninterrupted
    assert load_checkpoint_file(stopped_mid_epoch / "checkpoints" / "last.ckpt")["global_step"] == 6
    _assert_same_state(expected, _resume_a_copy(tiny_train_config, stopped_mid_epoch))


def test_negative_control_without_rng_restore(tiny_train_config, uninterrupted, stopped_mid_epoch, monkeypatch) -> None:
    expected, _ = uninterrupted
    monkeypatch.setattr(random_state, "restore_random_state", lambda state: None)
    with pytest.raises(AssertionError, match="weights differ"):
        _assert_same_state(expected, _resume_a_copy(tiny_train_config, stopped_mid_epoch))


def test_negative_control_without_data_position(
    tiny_train_config, uninterrupted, stopped_mid_epoch, monkeypatch
) -> None:
    expected, _ = uninterrupted
    monkeypatch.setattr(ResumableSampler, "resume_from", lambda self, batches_seen: None)
    with pytest.raises(AssertionError, match="weights differ"):
        _assert_same_state(expected, _resume_a_copy(tiny_train_config, stopped_mid_epoch))


def test_sampler_splits_global_batches_over_ranks_and_resumes() -> None:
    one = ResumableSampler(40, batch_size=8, seed=3)
    ranks = [ResumableSampler(40, batch_size=4, seed=3, rank=r, world_size=2) for r in range(2)]
    whole = one.epoch_indices().view(-1, 8)
    shares = [r.epoch_indices().view(-1, 4) for r in ranks]
    # Step b of both ranks together is step b of one process with the same global batch.
    assert torch.equal(torch.cat(shares, dim=1), whole)
    assert sorted(whole.flatten().tolist()) == list(range(40))  # a permutation: no image twice in an epoch
    stream = list(itertools.islice(iter(one), 120))  # endless: epoch after epoch, each reshuffled
    epochs = [stream[:40], stream[40:80], stream[80:]]
    assert epochs[0] != epochs[1] and all(sorted(epoch) == list(range(40)) for epoch in epochs)
    resumed = ResumableSampler(40, batch_size=8, seed=3)
    resumed.resume_from(7)  # 5 batches per epoch: epoch 1, two batches in
    assert list(itertools.islice(iter(resumed), 64)) == stream[56:120]
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ResumableSampler(7, batch_size=4, seed=0, world_size=2)


def test_a_run_without_max_steps_is_refused(tiny_train_config, tmp_path: Path) -> None:
    """The training sampler is endless, so trainer.max_steps is what ends a run."""
    with pytest.raises(ConfigError, match="trainer.max_steps is not set"):
        run(tiny_train_config("run_name=endless", "trainer.max_steps=-1"))
    assert not (tmp_path / "endless").exists()  # refused before anything was written
