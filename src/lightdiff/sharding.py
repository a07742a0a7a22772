"""`trainer=fsdp`: Lightning's FSDP strategy with each residual and transformer block as an FSDP unit of its own.

Without a wrap policy FSDP makes the whole LightningModule one unit: its parameters are gathered whole for every
forward and backward, so only gradients and optimiser state are sharded and peak weight memory is that of the full
network. Wrapping each block gathers one block at a time, as accelerate does for diffusers models with their
`_no_split_modules` (UNet2DConditionModel: BasicTransformerBlock, ResnetBlock2D; SD3: JointTransformerBlock;
PixArt: BasicTransformerBlock). The frozen VAE's resnet blocks become units too; with `use_orig_params=True`
(Lightning's default) frozen and trained parameters may share a unit."""

from __future__ import annotations

from typing import Literal

from hydra.utils import get_class
from pytorch_lightning.strategies import FSDPStrategy
from torch import nn
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from lightdiff.config import ConfigError


def block_wrap_policy(block_classes: list[str]) -> ModuleWrapPolicy:
    """FSDP's policy that makes every module of one of `block_classes` (dotted import paths) its own unit."""
    classes = set()
    for name in block_classes:
        try:
            block = get_class(name)
        except Exception as error:  # ImportError, AttributeError, or Hydra's ValueError for a non-class
            raise ConfigError(f"trainer.strategy.block_classes: {name!r} is not a class: {error}") from error
        if not issubclass(block, nn.Module):
            raise ConfigError(f"trainer.strategy.block_classes: {name!r} is not a torch module")
        classes.add(block)
    return ModuleWrapPolicy(classes)


class BlockShardedFSDP(FSDPStrategy):
    """FSDPStrategy whose units are the modules of `block_classes` (and the root for everything else)."""

    def __init__(
        self,
        block_classes: list[str],  # dotted import paths of the module classes that are each one FSDP unit
        sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD"] = "FULL_SHARD",
        state_dict_type: Literal["full", "sharded"] = "full",  # full: checkpoints hold whole tensors
        cpu_offload: bool = False,  # keep parameters and gradients in CPU memory between uses
    ) -> None:
        super().__init__(
            auto_wrap_policy=block_wrap_policy(list(block_classes)),
            sharding_strategy=sharding_strategy,
            state_dict_type=state_dict_type,
            cpu_offload=cpu_offload,
        )
