"""Optimiser set-up shared by the diffusion methods: AdamW with linear warm-up, then constant or cosine."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from diffusers.optimization import get_scheduler

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
) -> dict[str, Any]:
    """What `configure_optimizers` returns: AdamW and its per-step schedule (diffusers' `get_scheduler`)."""
    if lr_schedule not in ("constant", "cosine"):
        raise ConfigError(f"model.lr_schedule={lr_schedule!r} is not one of ('constant', 'cosine')")
    if lr_schedule == "cosine" and max_steps <= 0:
        raise ConfigError("model.lr_schedule=cosine needs trainer.max_steps to know where the cosine ends")
    optimizer = torch.optim.AdamW(parameters, lr=lr, betas=adam_betas, weight_decay=weight_decay, eps=adam_eps)
    name = "cosine" if lr_schedule == "cosine" else "constant_with_warmup"
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=max_steps)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def global_grad_norm(parameters: Iterable[torch.nn.Parameter]) -> torch.Tensor | None:
    """L2 norm of all gradients together (None before any gradient exists); log it before clipping."""
    norms = [p.grad.detach().norm() for p in parameters if p.grad is not None]
    return torch.stack(norms).norm() if norms else None
