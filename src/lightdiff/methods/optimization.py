"""Optimiser set-up shared by every method: the `optimizer` config node (an optimiser factory), the per-step LR
schedule, and gradient clipping that logs the norm it clips.

An `optimizer` node is a callable `(parameters, lr) -> torch.optim.Optimizer`: a `_partial_` of an optimiser class
(AdamW, fused AdamW, Adam, Adafactor: conf/optimizer/) or `AdamW8bit`, which checks at build time, before any run
folder exists, that bitsandbytes and a CUDA GPU are there. The learning rate stays the method's key (model.lr), as
it belongs to the method's schedule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from diffusers.optimization import get_scheduler
from pytorch_lightning.strategies import FSDPStrategy

from lightdiff.config import ConfigError

OptimizerFactory = Callable[..., torch.optim.Optimizer]  # (parameters, lr=...) -> an optimiser


class AdamW8bit:
    """bitsandbytes' 8-bit AdamW (Dettmers et al. 2022): optimiser state in 8 bits, about a quarter of AdamW's memory
    (`optimizer=adamw_8bit`). Needs the optional `bitsandbytes` package and a CUDA GPU, checked when built."""

    def __init__(
        self,
        betas: tuple[float, float] = (0.9, 0.999),  # (beta1, beta2)
        weight_decay: float = 0.0,  # decoupled weight decay
        eps: float = 1e-8,  # denominator epsilon
    ) -> None:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as error:
            raise ConfigError(
                "optimizer=adamw_8bit needs bitsandbytes (pip install bitsandbytes), which is not installed"
            ) from error
        if not torch.cuda.is_available():
            raise ConfigError("optimizer=adamw_8bit needs a CUDA GPU (bitsandbytes' 8-bit kernels); none is visible")
        self.betas, self.weight_decay, self.eps = tuple(betas), weight_decay, eps

    def __call__(self, parameters: Iterable[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(
            parameters, lr=lr, betas=self.betas, weight_decay=self.weight_decay, eps=self.eps
        )


def with_lr_schedule(
    optimizer: torch.optim.Optimizer,
    lr_schedule: Literal["constant", "cosine"],
    warmup_steps: int,
    max_steps: int,
) -> dict[str, Any]:
    """What `configure_optimizers` returns: the optimiser and its per-step schedule (diffusers' `get_scheduler`):
    linear warm-up from 0 over `warmup_steps`, then constant, or cosine to 0 at `max_steps`."""
    if lr_schedule not in ("constant", "cosine"):
        raise ConfigError(f"model.lr_schedule={lr_schedule!r} is not one of ('constant', 'cosine')")
    if lr_schedule == "cosine" and max_steps <= 0:
        raise ConfigError("model.lr_schedule=cosine needs trainer.max_steps to know where the cosine ends")
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


def clip_and_log_gradients(
    module: pl.LightningModule, parameters: Iterable[torch.nn.Parameter], max_norm: float | None
) -> None:
    """`clip_and_measure_gradients`, logging the norm as `train/grad_norm`: a method's `configure_gradient_clipping`
    under automatic optimisation (model=pixel, latent, lcm)."""
    norm = clip_and_measure_gradients(module, parameters, max_norm)
    if norm is not None:
        module.log("train/grad_norm", norm)
