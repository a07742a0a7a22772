"""Which modules FSDP shards as units of their own (`trainer=fsdp`, conf/trainer/fsdp.yaml: auto_wrap_policy).

Without a wrap policy FSDP makes the whole LightningModule one unit: its parameters are gathered whole for every
forward and backward, so only gradients and optimiser state are sharded and peak weight memory is that of the full
network. Wrapping each residual and transformer block gathers one block at a time, as accelerate does for diffusers
models with their `_no_split_modules` (UNet2DConditionModel: BasicTransformerBlock, ResnetBlock2D; SD3:
JointTransformerBlock; PixArt: BasicTransformerBlock). The frozen VAE's resnet blocks become units too; with
`use_orig_params=True` (Lightning's default) frozen and trained parameters may share a unit."""

from __future__ import annotations

from hydra.utils import get_class
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
            raise ConfigError(
                f"trainer.strategy.auto_wrap_policy.block_classes: {name!r} is not a class: {error}"
            ) from error
        if not issubclass(block, nn.Module):
            raise ConfigError(f"trainer.strategy.auto_wrap_policy.block_classes: {name!r} is not a torch module")
        classes.add(block)
    return ModuleWrapPolicy(classes)
