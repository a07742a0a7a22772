"""Shared fixtures: compose the real Hydra configs in-process, with tiny sizes, writing under tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import lightdiff.config  # noqa: F401  (registers the config resolvers, as train.py's import does)

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

# A run that takes seconds on a CPU: every size shrunk, every feature on.
TINY = [
    "logger=csv",
    "trainer.max_steps=2",
    "trainer.log_every_n_steps=1",
    "data.batch_size=4",
    "data.size=64",
    "data.resolution=16",
    "callbacks.samples.every_n_steps=0",
    "callbacks.samples.steps=2",
    "callbacks.samples.num_images=4",
    "callbacks.samples.final_num_images=4",
    "callbacks.checkpoint.every_n_train_steps=1",
]


def compose_config(config_name: str, overrides: list[str]) -> DictConfig:
    """What `python train.py overrides...` would see, with the `hydra:` resolver working."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fast_and_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.set_num_threads(2)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def tiny_train_config(tmp_path: Path):
    def make(*overrides: str) -> DictConfig:
        return compose_config("train", [f"output_root={tmp_path}", *TINY, *overrides])

    return make
