"""Refuse weights that do not fit the network they are loaded into, naming the keys and shapes.

torch's own `load_state_dict` error comes from deep inside a resume or an export, after other state has been
restored, and does not say what to do. A checkpoint from another `net` or `model` config is a user mistake, so
it is caught before any tensor is copied: every missing, unexpected and differently shaped parameter is named.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy

_SHOWN = 8  # keys listed per kind of mismatch; the rest are counted, so a whole-network mismatch stays readable


def _shape(value: Any) -> tuple[int, ...] | str:
    shape = getattr(value, "shape", None)
    return tuple(shape) if shape is not None else type(value).__name__  # a crafted file may hold a non-tensor


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else "")


def state_dict_mismatches(
    expected: Mapping[str, Any],  # the model's own state dict (what the weights must fit)
    found: Mapping[str, Any],  # the checkpoint's weights for the same model
    may_be_missing: tuple[str, ...] = (),  # key prefixes the checkpoint leaves out on purpose (turbo's teacher)
) -> list[str]:
    """One line per kind of mismatch (shape, missing, unexpected); empty when the weights fit."""
    shapes = [
        f"{key}: checkpoint {_shape(found[key])} vs model {_shape(value)}"
        for key, value in expected.items()
        if key in found and _shape(found[key]) != _shape(value)
    ]
    missing = [key for key in expected if key not in found and not key.startswith(may_be_missing)]
    unexpected = [key for key in found if key not in expected]
    problems = []
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): {_listed(shapes)}")
    if missing:
        problems.append(f"{len(missing)} key(s) missing from the checkpoint: {_listed(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) in the checkpoint: {_listed(unexpected)}")
    return problems


def check_state_dict(
    expected: Mapping[str, Any],  # the model's own state dict
    found: Mapping[str, Any],  # the checkpoint's weights
    source: str,  # what the weights came from, for the message (a file, "checkpoint file.ckpt (vae.)")
    may_be_missing: tuple[str, ...] = (),  # key prefixes the checkpoint leaves out on purpose
) -> None:
    problems = state_dict_mismatches(expected, found, may_be_missing)
    if problems:
        raise ValueError(
            f"{source} does not fit the model (was it made with another net / model config?): " + "; ".join(problems)
        )


def load_weights(module: torch.nn.Module, weights: Mapping[str, Any], source: str) -> None:
    """`module.load_state_dict(weights)`, after a check whose error names every key that does not fit."""
    check_state_dict(module.state_dict(), weights, source)
    module.load_state_dict(weights)


def check_checkpoint_fits(
    module: pl.LightningModule,  # the module being resumed, built from this run's config
    checkpoint: dict[str, Any],  # what Lightning read from the file
    may_be_missing: tuple[str, ...] = (),  # key prefixes the module leaves out of its checkpoints
) -> None:
    """For a LightningModule's `on_load_checkpoint`: the checkpoint's state dict must fit the module. Lightning
    calls the hook before it loads the weights, so this error comes first."""
    weights = checkpoint.get("state_dict")
    if weights is None:  # a sharded checkpoint: the strategy loads (and checks) the shards itself
        return
    source = "the checkpoint"
    try:
        trainer = module.trainer
    except RuntimeError:  # not attached to a Trainer (e.g. LightningModule.load_from_checkpoint)
        trainer = None
    if trainer is not None:
        # FSDP / DeepSpeed shard or wrap the networks: the module's own state dict is not what the checkpoint holds.
        strategy = trainer.strategy
        if isinstance(strategy, DeepSpeedStrategy) or not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
            return
        source = f"checkpoint {trainer.ckpt_path}" if trainer.ckpt_path else source
    check_state_dict(module.state_dict(), weights, source, may_be_missing)
