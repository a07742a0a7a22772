"""`trainer=ddp_cpu trainer.devices=2`: the DDP code path with two gloo processes, through the real train.py (Lightning
re-launches it for rank 1). Two processes with half the per-process batch train like one process with the same
global batch, and the run folder is written once."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock, JointTransformerBlock
from diffusers.models.resnet import ResnetBlock2D

from lightdiff.config import ConfigError
from lightdiff.sharding import block_wrap_policy
from lightdiff.trained import load_checkpoint_file

from .conftest import REPO, TINY

STEPS = 30
COMMON = [
    *(o for o in TINY if not o.startswith(("trainer.max_steps", "data.batch_size", "callbacks.checkpoint"))),
    f"trainer.max_steps={STEPS}",
    "callbacks.checkpoint.every_n_train_steps=10",
    "model.lr=1e-3",
]


def _train(tmp_path: Path, run_name: str, *overrides: str) -> Path:
    command = [sys.executable, "train.py", f"output_root={tmp_path}", f"run_name={run_name}", *COMMON, *overrides]
    result = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "WANDB_MODE": "offline"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp_path / run_name


def _losses(run_dir: Path) -> list[float]:
    (metrics,) = run_dir.glob("csv/version_*/metrics.csv")
    with metrics.open() as handle:
        return [float(row["train/loss"]) for row in csv.DictReader(handle) if row.get("train/loss")]


@pytest.mark.slow  # two training subprocesses and a DDP launch: run by .ci/run with -m slow
def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path: Path) -> None:
    two = _train(tmp_path, "two", "trainer=ddp_cpu", "trainer.devices=2", "data.batch_size=4")
    one = _train(tmp_path, "one", "trainer=cpu", "data.batch_size=8")

    # One run folder, written by rank 0 alone: one config, one log without rank 1's lines, one set of checkpoints.
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["last.ckpt", f"step{STEPS:07d}.ckpt"]
    assert [p.name for p in two.glob("config*.yaml")] == ["config.yaml"]
    assert [p.name for p in (two / "configs").iterdir()] == ["000.yaml"]
    assert not (two / ".lock").exists()  # rank 0 took the folder and gave it back; rank 1 never touched the lock
    assert len(list(two.glob("csv/version_*"))) == 1
    assert (two / "train.log").read_text().count("reached step") == 1
    checkpoint = load_checkpoint_file(two / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == STEPS
    assert checkpoint["ShapesDataModule"] == {"batches_seen": STEPS}
    ranks = checkpoint["callbacks"]["random_state"]["ranks"]
    assert len(ranks) == 2  # both ranks' random states, for an exact resume
    assert not torch.equal(ranks[0]["torch"], ranks[1]["torch"])  # each rank draws its own noise

    # The same loss curve within tolerance: the logged loss is the global batch's mean (synced over ranks); the
    # noise differs (drawn per rank), so the curves agree on average, not step by step.
    two_losses, one_losses = _losses(two), _losses(one)
    assert len(two_losses) == len(one_losses) == STEPS
    early = slice(0, 5)
    late = slice(STEPS - 10, STEPS)

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    assert abs(mean(two_losses[early]) - mean(one_losses[early])) < 0.15 * mean(one_losses[early])
    assert abs(mean(two_losses[late]) - mean(one_losses[late])) < 0.15 * mean(one_losses[late])
    assert mean(two_losses[late]) < 0.8 * mean(two_losses[early])  # and both actually learn


@pytest.mark.slow
def test_a_bucketed_run_trains_under_ddp(tmp_path: Path) -> None:
    """Aspect-ratio buckets under two gloo processes: every global batch one bucket, split over the ranks by the
    bucket sampler (unit-tested in test_buckets.py, with the exact resume), through Lightning's DDP launch."""
    buckets = ["data.aspect_ratios=[0.5,1.0,2.0]", "data.buckets={step: 4}", "data.size=48"]
    two = _train(tmp_path, "two", "trainer=ddp_cpu", "trainer.devices=2", "data.batch_size=4", *buckets)
    checkpoint = load_checkpoint_file(two / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == STEPS and checkpoint["ShapesDataModule"] == {"batches_seen": STEPS}
    assert len(_losses(two)) == STEPS and all(loss == loss for loss in _losses(two))  # finite, one per step


def test_fsdp_config_builds_its_strategy_and_ema_refuses_it(tmp_path: Path) -> None:
    """trainer=fsdp needs CUDA GPUs (PyTorch's FSDP refuses CPU devices; the run is tests/test_gpu.py), so here: the
    strategy it builds, its wrap policy, and the EMA callback's refusal (an average of parameter shards is not a
    network)."""
    from types import SimpleNamespace

    from hydra.utils import instantiate
    from pytorch_lightning.strategies import FSDPStrategy
    from torch.distributed.fsdp import ShardingStrategy

    from lightdiff.callbacks import EMA

    from .conftest import compose_config

    cfg = compose_config("train", [f"output_root={tmp_path}", "trainer=fsdp"])
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.sharding_strategy == ShardingStrategy.FULL_SHARD and strategy._state_dict_type == "full"
    module = SimpleNamespace(net=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="callbacks.ema does not support trainer=fsdp"):
        EMA().setup(SimpleNamespace(strategy=strategy), module, "fit")

    # Every residual and transformer block of each network family is an FSDP unit of its own, nothing else is.
    policy = strategy.kwargs["auto_wrap_policy"]
    block_types = (ResnetBlock2D, BasicTransformerBlock, JointTransformerBlock)
    for net_choice, model in [("pixel", "pixel"), ("latent", "latent"), ("mmdit_tiny", "latent"), ("dit", "pixel")]:
        net = instantiate(
            compose_config("train", [f"output_root={tmp_path}", f"model={model}", f"net={net_choice}"]).net
        )
        wrapped = [m for m in net.modules() if policy(m, recurse=False, nonwrapped_numel=0)]
        assert wrapped and wrapped == [m for m in net.modules() if isinstance(m, block_types)], net_choice
        assert all(policy(m, recurse=True, nonwrapped_numel=0) for m in net.modules())  # it looks inside all


def test_fsdp_wrap_policy_names_a_bad_block_class() -> None:
    with pytest.raises(ConfigError, match=r"trainer.strategy.block_classes: 'diffusers.models.resnet.NoSuchBlock'"):
        block_wrap_policy(["diffusers.models.resnet.ResnetBlock2D", "diffusers.models.resnet.NoSuchBlock"])
    with pytest.raises(ConfigError, match=r"'collections.OrderedDict' is not a torch module"):
        block_wrap_policy(["collections.OrderedDict"])
