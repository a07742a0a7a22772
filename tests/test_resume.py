"""Resume restores step, weights, EMA, optimiser and LR schedule; ckpt_path picks a checkpoint."""

from pathlib import Path

import pytest
import torch

from lightdiff.config import ConfigError
from lightdiff.train import run
from lightdiff.trained import load_checkpoint_file


def _state(path: Path) -> dict:
    return load_checkpoint_file(path)


def test_same_run_name_resumes_from_last(tiny_train_config) -> None:
    first = tiny_train_config("run_name=r", "trainer.max_steps=3", "model.lr_schedule=cosine", "model.warmup_steps=1")
    run(first)
    last = Path(first.run_dir) / "checkpoints" / "last.ckpt"
    before = _state(last)
    assert before["global_step"] == 3

    # Run again with a later max_steps: continues at step 3, not from scratch.
    trainer = run(
        tiny_train_config("run_name=r", "trainer.max_steps=5", "model.lr_schedule=cosine", "model.warmup_steps=1")
    )
    assert trainer.global_step == 5
    after = _state(last)
    assert after["global_step"] == 5
    assert after["callbacks"]["ema"]["optimization_step"] == 5
    assert after["optimizer_states"][0]["state"][0]["step"].item() == 5  # AdamW's moments carried over
    assert after["lr_schedulers"][0]["last_epoch"] == 5
    assert "resuming r from" in (Path(first.run_dir) / "train.log").read_text()


def _same_weights(a: dict, b: dict) -> bool:
    return a["state_dict"].keys() == b["state_dict"].keys() and all(
        torch.equal(value, b["state_dict"][key]) for key, value in a["state_dict"].items()
    )


def test_resume_restores_weights_exactly(tiny_train_config) -> None:
    """A resumed run that trains 0 more steps ends with exactly the weights and EMA it loaded, even run with another
    seed: a run that silently started afresh would draw other weights (the control below shows it would)."""
    cfg = tiny_train_config("run_name=same", "trainer.max_steps=2")
    run(cfg)
    last = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    before = _state(last)
    trainer = run(tiny_train_config("run_name=same", "trainer.max_steps=2", "seed=1"))
    assert trainer.global_step == 2
    after = _state(last)
    assert _same_weights(before, after)
    for a, b in zip(before["callbacks"]["ema"]["shadow_params"], after["callbacks"]["ema"]["shadow_params"]):
        assert torch.equal(a, b)
    # Negative control: the same command in a fresh folder (no checkpoint to resume) ends elsewhere.
    fresh = tiny_train_config("run_name=fresh_control", "trainer.max_steps=2", "seed=1")
    run(fresh)
    assert not _same_weights(before, _state(Path(fresh.run_dir) / "checkpoints" / "last.ckpt"))


def test_resume_false_never_overwrites_and_ckpt_path_is_checked(tiny_train_config) -> None:
    cfg = tiny_train_config("run_name=fresh", "trainer.max_steps=2")
    run(cfg)
    last = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    with pytest.raises(ConfigError, match="resume=false but .*fresh already holds checkpoints"):
        run(tiny_train_config("run_name=fresh", "trainer.max_steps=4", "resume=false"))
    assert last.read_bytes() == before
    with pytest.raises(ConfigError, match="missing.ckpt"):
        run(tiny_train_config("run_name=other", "ckpt_path=/nonexistent/missing.ckpt"))


def test_ckpt_path_resumes_another_checkpoint(tiny_train_config) -> None:
    """ckpt_path=FILE starts a new run from FILE's weights and step, not from scratch: with 0 steps left it keeps
    exactly FILE's weights although its own seed would draw others (the control)."""
    cfg = tiny_train_config("run_name=source", "trainer.max_steps=2")
    run(cfg)
    source = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    target = tiny_train_config("run_name=target", "trainer.max_steps=2", "seed=1", f"ckpt_path={source}")
    assert run(target).global_step == 2
    assert _same_weights(_state(source), _state(Path(target.run_dir) / "checkpoints" / "last.ckpt"))
    onward = run(tiny_train_config("run_name=onward", "trainer.max_steps=3", "seed=1", f"ckpt_path={source}"))
    assert onward.global_step == 3  # one step on from the source's two
    control = tiny_train_config("run_name=target_control", "trainer.max_steps=2", "seed=1")
    run(control)
    assert not _same_weights(_state(source), _state(Path(control.run_dir) / "checkpoints" / "last.ckpt"))
