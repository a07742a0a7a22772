"""Parts of a diffusers pipeline folder or hub id (`model.pretrained`, `model.vae`), with errors naming the key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from transformers import CLIPTokenizer

from lightdiff.config import ConfigError
from lightdiff.nets.conditioning import CLIPText, text_conditioning, text_encoder_class
from lightdiff.nets.denoiser import DENOISER_CLASSES, Denoiser


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


def pipeline_parts(pretrained: str) -> dict[str, Any]:
    """The components a pipeline folder or hub id lists in its model_index.json (name -> [library, class])."""
    path = Path(pretrained).expanduser()
    try:
        if path.is_dir():
            index = path / "model_index.json"
        else:
            from huggingface_hub import hf_hub_download

            index = Path(hf_hub_download(pretrained, "model_index.json"))
        parts = json.loads(index.read_text())
    except Exception as error:  # no such folder or file, offline, not JSON
        raise ConfigError(
            f"model.pretrained={pretrained!r} is not a diffusers pipeline (no model_index.json): {error}"
        ) from error
    return {name: value for name, value in parts.items() if not name.startswith("_") and value and value[0]}


def load_denoiser(pretrained: str) -> Denoiser:
    """The pipeline's denoiser (`unet/` or `transformer/`), of a class lightdiff knows."""
    parts = pipeline_parts(pretrained)
    part = "unet" if "unet" in parts else "transformer"
    class_name = (parts.get(part) or [None, None])[1]
    if class_name not in DENOISER_CLASSES:
        raise ConfigError(
            f"model.pretrained={pretrained!r}: its {part} is {class_name!r}, not one of {sorted(DENOISER_CLASSES)}"
        )
    return load_component(DENOISER_CLASSES[class_name], pretrained, part)


def pretrained_text_conditioning(pretrained: str, net: torch.nn.Module, trainable: bool) -> CLIPText:
    """The pipeline's tokenizer and text encoder, as the text family `net` takes."""
    tokenizer = load_component(CLIPTokenizer, pretrained, "tokenizer")
    text_encoder = load_component(text_encoder_class(net), pretrained, "text_encoder")
    return text_conditioning(net, tokenizer, text_encoder, trainable)
