"""Optimiser set-up shared by every method: the `optimizer` config node (an optimiser factory), the per-step LR
schedule, and gradient clipping that logs the norm it clips.

An `optimizer` node is a callable `(parameters, lr) -> torch.optim.Optimizer`: a `_partial_` of an optimiser class
(AdamW, fused AdamW, Adam, Adafactor: conf/optimizer/) or `AdamW8bit`, which checks at build time, before any run
folder exists, that bitsandbytes and a CUDA GPU are there. The learning rate stays the method's key (model.lr), as
it belongs to the method's schedule: `model.lr_schedule` and `model.warmup_steps`, the same for every method (Lightning
steps the schedule of a method under automatic optimisation; `set_scheduled_lr` computes it under manual).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import FSDPStrategy
from torch.optim.lr_scheduler import LambdaLR

from lightdiff.config import ConfigError
from lightdiff.speed import prepare_for_training

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
                "optimizer=adamw_8bit needs bitsandbytes (pip install 'lightdiff[bnb]'), which is not installed"
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
    """What `configure_optimizers` returns: the optimiser and its per-step schedule, `lr_factor` of the step (the
    schedule diffusers' `get_scheduler` makes): linear warm-up from 0 over `warmup_steps`, then constant, or cosine
    to 0 at `max_steps`."""
    check_lr_schedule(lr_schedule, warmup_steps)
    if lr_schedule == "cosine" and max_steps <= 0:
        raise ConfigError("model.lr_schedule=cosine needs trainer.max_steps to know where the cosine ends")
    scheduler = LambdaLR(optimizer, lambda step: lr_factor(lr_schedule, warmup_steps, step, max_steps))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def lr_factor(lr_schedule: Literal["constant", "cosine"], warmup_steps: int, step: int, max_steps: int) -> float:
    """The multiplier of the peak learning rate at optimiser step `step`, the one schedule of every method: linear
    warm-up from 0 over `warmup_steps`, then 1, or the half cosine of diffusers' `get_cosine_schedule_with_warmup` to 0
    at `max_steps` (diffusers' own schedules give the same, tested). A pure function of the step: Lightning steps it
    under automatic optimisation (`with_lr_schedule`), `set_scheduled_lr` applies it under manual."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if lr_schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def set_scheduled_lr(
    module: pl.LightningModule,
    peaks: list[tuple[torch.optim.Optimizer, float]],  # each optimiser with its peak learning rate
    lr_schedule: Literal["constant", "cosine"],
    warmup_steps: int,
) -> None:
    """Under manual optimisation (turbo, dmd2, where Lightning steps no scheduler): every optimiser's learning rate for
    the coming step, from the trainer's step as `trainer.max_steps` counts it. Computed, not stepped: a resumed run
    continues the schedule exactly without a scheduler's state."""
    factor = lr_factor(lr_schedule, warmup_steps, module.trainer.global_step, module.trainer.max_steps)
    for optimizer, peak in peaks:
        for group in optimizer.param_groups:
            group["lr"] = peak * factor


def check_lr_schedule(lr_schedule: str, warmup_steps: int) -> None:
    if lr_schedule not in ("constant", "cosine"):
        raise ConfigError(f"model.lr_schedule={lr_schedule!r} is not one of ('constant', 'cosine')")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ConfigError(f"model.warmup_steps={warmup_steps!r} must be a whole number of steps >= 0")


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


class OptimisesItsNetwork:
    """What every method that trains one network (`self.net`) shares, as a mixin before `pl.LightningModule`: the
    speed path applied to that network once the trainer exists (`configure_model`), its optimiser (`model.optimizer`
    at `model.lr`) with warm-up and LR schedule, and norm clipping that logs the norm. A method with a second
    optimiser (turbo's discriminator, DMD2's fake score) takes `configure_model` and writes its own optimisers.

    It reads the method's attributes: net, optimizer_factory, lr, lr_schedule, warmup_steps, max_grad_norm,
    compile_net, channels_last, gradient_checkpointing."""

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """What the optimiser trains (a method with a trainable text encoder adds its parameters)."""
        return [p for p in self.net.parameters() if p.requires_grad]

    def configure_model(self) -> None:
        # Lightning calls this once the trainer exists and before the module reaches its device.
        prepare_for_training(self.net, self.compile_net, self.channels_last, self.gradient_checkpointing)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        # The method owns its clipping (model.max_grad_norm): trainer.gradient_clip_val cannot serve GAN methods,
        # which Lightning runs under manual optimisation. The norm is logged before clipping, at its true size.
        clip_and_log_gradients(self, self.trainable_parameters(), self.max_grad_norm)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory(self.trainable_parameters(), lr=self.lr)
        return with_lr_schedule(optimizer, self.lr_schedule, self.warmup_steps, self.trainer.max_steps)
