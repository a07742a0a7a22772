"""Parts of a diffusers pipeline folder or hub id (`model.pretrained`, `model.vae`), with errors naming the key."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTokenizer

from lightdiff.config import ConfigError
from lightdiff.nets.conditioning import CLIPText, text_conditioning, text_encoder_class


def load_component(cls: Any, source: str, subfolder: str) -> Any:
    try:
        return cls.from_pretrained(source, subfolder=subfolder)
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"model.pretrained={source!r} has no usable {subfolder}/ ({cls.__name__}): {error}"
        ) from error


def load_vae(pretrained: str | None, vae: str | None) -> AutoencoderKL:
    """`vae` (a folder or hub id of an AutoencoderKL) if given, else the VAE of the pipeline `pretrained`."""
    if vae:  # an explicit VAE wins over the pipeline's
        try:
            return AutoencoderKL.from_pretrained(vae)
        except (OSError, ValueError) as error:
            raise ConfigError(f"model.vae={vae!r} is not a diffusers AutoencoderKL folder or id: {error}") from error
    if pretrained is None:
        raise ConfigError("model.vae or model.pretrained must name a VAE")
    return load_component(AutoencoderKL, pretrained, "vae")


def load_unet(pretrained: str) -> UNet2DConditionModel:
    return load_component(UNet2DConditionModel, pretrained, "unet")


def pretrained_text_conditioning(pretrained: str, net: torch.nn.Module, trainable: bool) -> CLIPText:
    """The pipeline's tokenizer and text encoder, as the text family `net` takes."""
    tokenizer = load_component(CLIPTokenizer, pretrained, "tokenizer")
    text_encoder = load_component(text_encoder_class(net), pretrained, "text_encoder")
    return text_conditioning(net, tokenizer, text_encoder, trainable)
