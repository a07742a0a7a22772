"""PatchGAN discriminator (Isola et al. 2017, "pix2pix", Section 3.2.2), as used by the latent-diffusion autoencoder.

diffusers has no image discriminator, so this is one of lightdiff's few own networks; it subclasses ModelMixin and
ConfigMixin so that `save_pretrained` / `from_pretrained` work like any diffusers model.
"""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn


class PatchDiscriminator(ModelMixin, ConfigMixin):
    """Strided convolutions -> one real/fake logit per overlapping patch (a map, not a scalar)."""

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,  # image channels
        base_channels: int = 64,  # width of the first layer; doubles per layer, at most 8x
        num_layers: int = 3,  # stride-2 layers; each halves the resolution and widens the patch
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers={num_layers} must be at least 1")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, base_channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        channels = base_channels
        for index in range(1, num_layers + 1):
            out_channels = base_channels * min(2**index, 8)
            stride = 2 if index < num_layers else 1  # the last widening layer keeps the resolution
            layers += [
                nn.Conv2d(channels, out_channels, 4, stride, 1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.LeakyReLU(0.2),
            ]
            channels = out_channels
        layers.append(nn.Conv2d(channels, 1, 4, 1, 1))
        self.layers = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


def _init_weights(module: nn.Module) -> None:
    # pix2pix's initialisation: N(0, 0.02) convolutions, N(1, 0.02) batch-norm scales.
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
