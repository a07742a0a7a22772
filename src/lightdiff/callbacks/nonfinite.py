"""Drop an optimiser step whose loss or gradients hold a NaN or an infinity; go on, or stop the run."""

from __future__ import annotations

import logging
from typing import Any, Literal

import pytorch_lightning as pl
import torch

from lightdiff.checkpointing import NonFiniteError

log = logging.getLogger(__name__)


class NonFiniteGuard(pl.Callback):
    """A NaN or infinite loss or gradient never reaches the weights: that optimiser step's update is dropped.

    Works under automatic and manual optimisation alike (GAN methods): Lightning calls `on_before_backward` with every
    loss given to backward (`manual_backward` included) and `on_before_optimizer_step` inside every
    `optimizer.step()`, before gradient clipping and before the update. Dropping sets the gradients to None, so AdamW
    leaves the weights and its moments as they were; the step counter and the LR schedule still advance.
    Under fp16 loss scaling, overflowing gradients are the GradScaler's to skip; only the loss is judged then.
    That no checkpoint holds NaN or infinite tensors is enforced where files are written (`AtomicCheckpointIO`),
    so it holds with this callback off too.
    """

    def __init__(
        self,
        action: Literal["skip", "stop"] = "skip",  # skip: drop the update and go on; stop: end the run with an error
        max_consecutive: int | None = 10,  # stop once this many training steps in a row were dropped (null: never)
    ) -> None:
        if action not in ("skip", "stop"):
            raise ValueError(f"callbacks.nonfinite.action={action!r} is not one of ('skip', 'stop')")
        if max_consecutive is not None and max_consecutive < 1:
            raise ValueError(f"callbacks.nonfinite.max_consecutive={max_consecutive} must be at least 1, or null")
        self.action = action
        self.max_consecutive = max_consecutive
        self.skipped_steps = 0  # training steps with a dropped update, over the whole run (kept in checkpoints)
        self.consecutive = 0  # of those, how many in a row up to the last step
        self._loss_finite: torch.Tensor | None = None  # whether every loss since the last optimiser step was finite
        self._dropped: list[str] = []  # what was non-finite in this batch's dropped updates
        self._stepped = False  # whether this batch made an update that was not dropped

    @property
    def state_key(self) -> str:
        return "nonfinite"

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        # Kept on the device: one host synchronisation per optimiser step (below), not one per backward.
        finite = torch.isfinite(loss.detach()).all()
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        parameters = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        device = pl_module.device
        checks = [torch.ones((), dtype=torch.bool, device=device) if self._loss_finite is None else self._loss_finite]
        self._loss_finite = None
        if trainer.scaler is None and parameters:
            # The largest |gradient| (fused over all tensors, and no overflow as a 2-norm could have) is NaN or
            # infinite exactly when some gradient is.
            largest = torch.nn.utils.get_total_norm([p.grad for p in parameters], norm_type=float("inf"))
            checks.append(torch.isfinite(largest))
        loss_finite, *grads_finite = torch.stack([check.to(device) for check in checks]).tolist()  # one host sync
        # Under sharded gradients or a loss that is bad on one rank only, every rank must take the same decision,
        # or the replicas' weights diverge.
        if trainer.strategy.reduce_boolean_decision(loss_finite and all(grads_finite), all=True):
            self._stepped = True
            return
        for parameter in parameters:
            parameter.grad = None
        index = next((i for i, o in enumerate(trainer.optimizers) if o is optimizer), 0)
        what = (
            "loss" if not loss_finite else "gradients" if not all(grads_finite) else "loss or gradients on another rank"
        )
        dropped = f"NaN or infinite {what} of optimiser {index} at global step {trainer.global_step}"
        self._dropped.append(dropped)
        if self.action == "stop":
            raise NonFiniteError(
                f"{dropped}: stopping (callbacks.nonfinite.action=stop); the update was dropped and no checkpoint "
                "is written after it"
            )

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._dropped:
            self.skipped_steps += 1
            self.consecutive += 1
            if trainer.is_global_zero:
                log.warning(
                    "%s: update skipped (%d skipped steps in this run)", "; ".join(self._dropped), self.skipped_steps
                )
        elif self._stepped:
            self.consecutive = 0
        self._dropped, self._stepped = [], False
        pl_module.log("train/nonfinite_steps", float(self.skipped_steps))
        if self.max_consecutive is not None and self.consecutive >= self.max_consecutive:
            raise NonFiniteError(
                f"the last {self.consecutive} training steps all had NaN or infinite losses or gradients "
                f"(callbacks.nonfinite.max_consecutive={self.max_consecutive}): the run is not training; stopping"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = state_dict.get("skipped_steps", 0)
        self.consecutive = state_dict.get("consecutive", 0)
