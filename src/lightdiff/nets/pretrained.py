"""Parts of a diffusers pipeline folder or hub id (`model.pretrained`, `model.vae`), with errors naming the key."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import AutoencoderKL

from lightdiff.config import ConfigError
from lightdiff.files import folder_written_atomically
from lightdiff.nets.vae import VAE_CLASSES, Autoencoder

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")  # a whole Stable Diffusion model in the original layout
SINGLE_FILE_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


def single_file_cache() -> Path:
    """Where single files are kept as diffusers folders: $LIGHTDIFF_CACHE/single_file (default ~/.cache/lightdiff)."""
    return Path(os.environ.get("LIGHTDIFF_CACHE", "~/.cache/lightdiff")).expanduser() / "single_file"


def as_pipeline_folder(source: str, config: str | None, key: str = "model.pretrained") -> str:
    """`source` as lightdiff loads pipelines: a folder or hub id as it is; a single-file SD 1.x / 2.x / SDXL checkpoint
    (.safetensors, or .ckpt holding tensors only) read by diffusers' `from_single_file` with the pipeline configs of
    `config` (a local folder or hub id: no download of configs), written once as a diffusers folder in
    single_file_cache() and that folder returned. Errors name the file."""
    path = Path(source).expanduser()
    if path.suffix not in SINGLE_FILE_SUFFIXES:
        if config is not None:
            raise ConfigError(f"{key}_config={config!r} is for a single-file {key}; {key}={source!r} is not one")
        return source
    if not path.is_file():
        raise ConfigError(f"{key}={source!r} is not a file")
    if config is None:
        raise ConfigError(
            f"{key}={source!r} is a single file: give the pipeline it is a checkpoint of with "
            f"{key}_config=DIR_OR_HUB_ID (its model_index.json and component configs), so it loads offline"
        )
    class_name = pipeline_config_class(config, f"{key}_config")
    if class_name not in SINGLE_FILE_PIPELINES:
        raise ConfigError(f"{key}_config={config!r} is a {class_name}; single files load as {SINGLE_FILE_PIPELINES}")
    if path.suffix == ".ckpt":
        try:  # refused before diffusers reads it: a checkpoint never needs to run code to load
            torch.load(path, map_location="meta", weights_only=True, mmap=zipfile.is_zipfile(path))
        except Exception as error:
            raise ConfigError(
                f"{key}={source!r} cannot be read as tensors only (weights_only unpickling refused it: {error}); "
                "convert it to .safetensors with a tool you trust"
            ) from error
    stat = path.stat()
    identity = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{config}"
    folder = single_file_cache() / f"{path.stem}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}"
    if not (folder / "model_index.json").is_file():
        try:
            pipeline = getattr(diffusers, class_name).from_single_file(str(path), config=config, local_files_only=True)
        except Exception as error:  # an unknown layout, a config of another model: nothing is half-loaded
            raise ConfigError(f"{key}={source!r} does not load as the {class_name} of {config!r}: {error}") from error
        with folder_written_atomically(folder) as staging:
            pipeline.save_pretrained(staging)
    return str(folder)


def pipeline_config_class(pretrained: str, key: str) -> str:
    """The pipeline class a folder's or hub id's model_index.json names (`_class_name`)."""
    return str(model_index(pretrained, key).get("_class_name"))


def load_component(cls: Any, source: str, subfolder: str, key: str = "model.pretrained") -> Any:
    try:
        return cls.from_pretrained(source, subfolder=subfolder)
    except (OSError, ValueError) as error:
        raise ConfigError(f"{key}={source!r} has no usable {subfolder}/ ({cls.__name__}): {error}") from error


def load_vae(pretrained: str | None, vae: str | None) -> Autoencoder:
    """`vae` (a folder or hub id of an AutoencoderKL or a video VAE) if given, else the VAE of the pipeline
    `pretrained`; its class is the one its config names, looked up in `VAE_CLASSES`."""
    if vae:  # an explicit VAE wins over the pipeline's
        try:
            class_name = AutoencoderKL.load_config(vae).get("_class_name", "AutoencoderKL")
            if class_name not in VAE_CLASSES:
                raise ValueError(f"its class {class_name!r} is not one of {sorted(VAE_CLASSES)}")
            return VAE_CLASSES[class_name].from_pretrained(vae)
        except (OSError, ValueError) as error:
            raise ConfigError(f"model.vae={vae!r} is not a diffusers VAE folder or id: {error}") from error
    if pretrained is None:
        raise ConfigError("model.vae or model.pretrained must name a VAE")
    class_name = (pipeline_parts(pretrained).get("vae") or [None, "AutoencoderKL"])[1]
    if class_name not in VAE_CLASSES:
        raise ConfigError(
            f"model.pretrained={pretrained!r}: its vae is {class_name!r}, not one of {sorted(VAE_CLASSES)}"
        )
    return load_component(VAE_CLASSES[class_name], pretrained, "vae")


def pipeline_parts(pretrained: str, key: str = "model.pretrained") -> dict[str, Any]:
    """The components a pipeline folder or hub id lists in its model_index.json (name -> [library, class])."""
    return listed_parts(pipeline_config(pretrained, key))


def listed_parts(config: dict[str, Any]) -> dict[str, Any]:
    """The components of a model_index.json's contents (its own settings, and parts listed as null, left out)."""
    return {name: value for name, value in config.items() if isinstance(value, list) and value and value[0]}


def pipeline_config(pretrained: str, key: str = "model.pretrained") -> dict[str, Any]:
    """A pipeline folder's or hub id's model_index.json: its parts and its own settings."""
    return {name: value for name, value in model_index(pretrained, key).items() if not name.startswith("_")}


def model_index(pretrained: str, key: str = "model.pretrained") -> dict[str, Any]:
    """A pipeline folder's or hub id's model_index.json, whole."""
    path = Path(pretrained).expanduser()
    try:
        if path.is_dir():
            index = path / "model_index.json"
        else:
            from huggingface_hub import hf_hub_download

            index = Path(hf_hub_download(pretrained, "model_index.json"))
        return json.loads(index.read_text())
    except Exception as error:  # no such folder or file, offline, not JSON
        raise ConfigError(f"{key}={pretrained!r} is not a diffusers pipeline (no model_index.json): {error}") from error


# Parts of a pipeline that training never uses, whatever the family: the sampler is lightdiff's own (`sampler=`), and
# the safety checker and its feature extractor only filter a pipeline's outputs.
# FLUX's image encoder and its processor are for IP-adapters only (listed as null in FLUX.1's pipelines).
UNUSED_PARTS = ("scheduler", "safety_checker", "feature_extractor", "image_encoder")


def check_parts_used(
    pretrained: str,
    parts: dict[str, Any],  # the pipeline's components (`pipeline_parts`)
    used: set[str],  # the parts the family reads besides the denoiser and the VAE
    net: torch.nn.Module,
    key: str,  # the setting that named the pipeline (error messages)
    required: tuple[str, ...] = (),  # parts the family cannot do without
    takes: str = "",  # what the family takes, in words (the missing part's error)
) -> None:
    """A pipeline with a part the family would leave unused (an SDXL pipeline's text_encoder_2 for a one-encoder net,
    SD3's T5), or without one it needs, is refused, naming the part, rather than half-loaded."""
    for part in required:
        if part not in parts:
            raise ConfigError(f"{key}={pretrained!r} has no {part}/: a {type(net).__name__} takes {takes}")
    unused = sorted(set(parts) - used - {"unet", "transformer", "vae"} - set(UNUSED_PARTS))
    if unused:
        raise ConfigError(
            f"{key}={pretrained!r} has {', '.join(unused)}, which this {type(net).__name__} cannot use: a pipeline "
            "of another family (an SDXL pipeline needs an SDXL UNet: model.load_pretrained_unet=true or net=sdxl_tiny)"
        )


def same_weights(first: torch.nn.Module, second: torch.nn.Module) -> bool:
    """Whether two modules hold the same tensors under the same names (lightdiff's SD3 exports write one encoder
    as both CLIPs)."""
    first_state, second_state = first.state_dict(), second.state_dict()
    return first_state.keys() == second_state.keys() and all(
        torch.equal(first_state[name], second_state[name]) for name in first_state
    )
