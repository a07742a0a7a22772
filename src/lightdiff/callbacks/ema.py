"""Exponential moving average of the denoiser's weights, kept by diffusers' EMAModel.

The averaged weights, the step counter behind the decay warm-up and the decay settings travel in the checkpoint
(under callbacks -> "ema"), next to the raw weights in the state dict. Sampling swaps the average in with
`averaged_weights()`; a checkpoint can never be written while they are swapped in, so raw weights stay raw.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytorch_lightning as pl
import torch
from diffusers.training_utils import EMAModel
from pytorch_lightning.strategies import FSDPStrategy

log = logging.getLogger(__name__)


class EMA(pl.Callback):
    """EMA of `pl_module.net`'s trainable parameters, decay min(decay, 1 - (1 + step / inv_gamma) ** -power)."""

    def __init__(
        self,
        decay: float = 0.9999,  # the decay once warmed up
        use_warmup: bool = True,  # ramp the decay up from 0 (diffusers' inv_gamma / power warm-up)
        inv_gamma: float = 1.0,  # warm-up speed: decay = 1 - (1 + step / inv_gamma) ** -power
        power: float = 2 / 3,  # 2/3 suits ~1M-step runs, 3/4 short ones (Karras et al. 2022 style warm-up)
        update_after_step: int = 0,  # optimiser steps before averaging starts
        offload: bool = False,  # keep the average in CPU memory between updates (diffusers' --offload_ema)
    ) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"callbacks.ema.decay={decay} must lie in [0, 1)")
        self.decay = decay
        self.use_warmup = use_warmup
        self.inv_gamma = inv_gamma
        self.power = power
        self.update_after_step = update_after_step
        self.offload = offload
        self.ema: EMAModel | None = None
        self._pending_state: dict[str, Any] | None = None
        self._swapped_in = False

    @property
    def state_key(self) -> str:
        # A fixed key (not the class name with its arguments) so that sample.py and export find it.
        return "ema"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if pl_module.net is None:  # lightdiff.contract.TrainingMethod: the autoencoder trains no denoiser
            log.info("%s has no denoiser `net` to average: EMA is off", type(pl_module).__name__)
            return
        if isinstance(trainer.strategy, FSDPStrategy):
            # Under FSDP each rank holds shards of flattened parameters: an average of those is not a network.
            raise ValueError("callbacks.ema does not support trainer=fsdp yet: set callbacks.ema=null")
        if self.ema is None:
            self.ema = EMAModel(
                averaged_parameters(pl_module.net),
                decay=self.decay,
                update_after_step=self.update_after_step,
                use_ema_warmup=self.use_warmup,
                inv_gamma=self.inv_gamma,
                power=self.power,
                foreach=True,  # one fused update over all tensors, not a Python loop over ~100s of parameters
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.ema is None:
            return
        if self._pending_state is not None:  # restored from a checkpoint before the module reached its device
            self.ema.load_state_dict(self._pending_state)
            self._pending_state = None
        self.ema.to(device=self._home(pl_module))

    def _home(self, pl_module: pl.LightningModule) -> torch.device:
        """Where the average lives between updates: the module's device, or (offloaded) CPU memory; it then costs two
        copies of the trained parameters per step instead of their size in GPU memory."""
        return torch.device("cpu") if self.offload else pl_module.device

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.ema is None:
            return
        # Under gradient accumulation only real optimiser steps move the average.
        if self.ema.optimization_step < trainer.global_step:
            if self.offload:  # the update runs where the weights are; the average goes back to CPU memory after it
                self.ema.to(device=pl_module.device)
            self.ema.step(averaged_parameters(pl_module.net))
            if self.offload:
                self.ema.to(device="cpu")

    @contextmanager
    def averaged_weights(self, net: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Temporarily load the EMA weights into `net`; the raw weights come back on exit, even after an error."""
        assert self.ema is not None
        self.ema.store(averaged_parameters(net))
        self.ema.copy_to(averaged_parameters(net))
        self._swapped_in = True
        try:
            yield net
        finally:
            self.ema.restore(averaged_parameters(net))
            self._swapped_in = False

    def state_dict(self) -> dict[str, Any]:
        if self._swapped_in:
            raise RuntimeError("refusing to checkpoint while EMA weights are swapped into the model")
        if self.ema is None:
            return {}
        state = self.ema.state_dict()
        state["shadow_params"] = [p.detach().clone() for p in state["shadow_params"]]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.ema is None:
            self._pending_state = state_dict
        else:
            self.ema.load_state_dict(state_dict)


def averaged_parameters(net: torch.nn.Module) -> list[torch.nn.Parameter]:
    """What the average covers: the parameters that train (with LoRA the adapters alone, so the EMA state is as small
    as the checkpoint's weights), in the network's order, which `lightdiff.trained` relies on to load it back."""
    return [parameter for parameter in net.parameters() if parameter.requires_grad]


def find_ema(trainer: pl.Trainer) -> EMA | None:
    """The run's EMA callback, if it has one."""
    return next((c for c in trainer.callbacks if isinstance(c, EMA)), None)
