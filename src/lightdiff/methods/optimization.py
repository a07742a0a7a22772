"""Optimiser set-up shared by the diffusion methods: AdamW with linear warm-up, then constant or cosine."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from diffusers.optimization import get_scheduler
from pytorch_lightning.strategies import FSDPStrategy

from lightdiff.config import ConfigError


def adamw_with_warmup(
    parameters: Iterable[torch.nn.Parameter],
    lr: float,
    adam_betas: tuple[float, float],
    weight_decay: float,
    lr_schedule: Literal["constant", "cosine"],
    warmup_steps: int,
    max_steps: int,
    adam_eps: float = 1e-8,
    fused: bool = False,
) -> dict[str, Any]:
    """What `configure_optimizers` returns: AdamW and its per-step schedule (diffusers' `get_scheduler`).

    `fused`: one kernel updates every parameter (`model.fused_adamw`, on by default where CUDA is present); the
    same update up to rounding, without a kernel launch per parameter tensor."""
    if lr_schedule not in ("constant", "cosine"):
        raise ConfigError(f"model.lr_schedule={lr_schedule!r} is not one of ('constant', 'cosine')")
    if lr_schedule == "cosine" and max_steps <= 0:
        raise ConfigError("model.lr_schedule=cosine needs trainer.max_steps to know where the cosine ends")
    optimizer = torch.optim.AdamW(
        parameters, lr=lr, betas=adam_betas, weight_decay=weight_decay, eps=adam_eps, fused=fused or None
    )
    name = "cosine" if lr_schedule == "cosine" else "constant_with_warmup"
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=max_steps)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def clip_and_measure_gradients(
    module: pl.LightningModule, parameters: Iterable[torch.nn.Parameter], max_norm: float | None
) -> torch.Tensor | None:
    """Clip the gradients of `parameters` to a global L2 norm of `max_norm` (None: do not clip) and return their norm
    before clipping (None before any gradient exists), which the methods log as `train/grad_norm`.

    One fused pass measures the norm that both the log and the clip use; Lightning's `clip_gradients` would measure
    it again. Under FSDP each rank holds a shard of every gradient, so the root FSDP module's `clip_grad_norm_`,
    which reduces the norm over ranks, does both (Lightning refuses norm clipping under FSDP)."""
    strategy = module.trainer.strategy
    if isinstance(strategy, FSDPStrategy):
        return strategy.model.clip_grad_norm_(max_norm if max_norm is not None else float("inf"))
    parameters = [p for p in parameters if p.grad is not None]
    if not parameters:
        return None
    norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
    if max_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm
