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
from diffusers import AutoencoderKL, CogVideoXTransformer3DModel, FluxTransformer2DModel, SD3Transformer2DModel
from transformers import (
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
    T5EncoderModel,
    T5Tokenizer,
)

from lightdiff.config import ConfigError
from lightdiff.files import folder_written_atomically
from lightdiff.nets.conditioning import (
    FLUX_MAX_SEQUENCE_LENGTH,
    CLIPText,
    FirstFrame,
    FirstFrameSettings,
    FluxText,
    SD3CLIPText,
    SD3Text,
    SDXLText,
    T5Text,
    is_sdxl,
    text_conditioning,
    text_encoder_class,
)
from lightdiff.nets.denoiser import DENOISER_CLASSES, Denoiser
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


def _denoiser_part(pretrained: str, key: str) -> tuple[str, type]:
    """The pipeline's denoiser part (`unet` or `transformer`) and its class, one lightdiff knows."""
    parts = pipeline_parts(pretrained, key)
    part = "unet" if "unet" in parts else "transformer"
    class_name = (parts.get(part) or [None, None])[1]
    if class_name not in DENOISER_CLASSES:
        raise ConfigError(f"{key}={pretrained!r}: its {part} is {class_name!r}, not one of {sorted(DENOISER_CLASSES)}")
    return part, DENOISER_CLASSES[class_name]


def load_denoiser(pretrained: str) -> Denoiser:
    """The pipeline's denoiser (`unet/` or `transformer/`), of a class lightdiff knows."""
    part, cls = _denoiser_part(pretrained, "model.pretrained")
    return load_component(cls, pretrained, part)


def denoiser_skeleton(pretrained: str, key: str = "model.pretrained") -> Denoiser:
    """The pipeline's denoiser built from its config alone, on the meta device (no weights read): what decides its
    text family, for tools that need the family and not the network (the shard writer's `--text-encoder`)."""
    part, cls = _denoiser_part(pretrained, key)
    try:
        config = cls.load_config(pretrained, subfolder=part)
    except (OSError, ValueError) as error:
        raise ConfigError(f"{key}={pretrained!r} has no usable {part}/config.json: {error}") from error
    with torch.device("meta"):
        return cls.from_config(config)


# Parts of a pipeline that training never uses, whatever the family: the sampler is lightdiff's own (`sampler=`), and
# the safety checker and its feature extractor only filter a pipeline's outputs.
# FLUX's image encoder and its processor are for IP-adapters only (listed as null in FLUX.1's pipelines).
UNUSED_PARTS = ("scheduler", "safety_checker", "feature_extractor", "image_encoder")


def pretrained_text_conditioning(
    pretrained: str,
    net: torch.nn.Module,
    trainable: bool,
    key: str = "model.pretrained",  # the setting that named the pipeline (error messages)
    max_sequence_length: int | None = None,  # T5 tokens per prompt; None: the pipeline's default (FLUX 512, SD3 256)
    embedded_guidance_scale: float = 3.5,  # the `guidance` input of a guidance-embedding FLUX transformer
) -> CLIPText | SDXLText | FluxText | SD3Text | T5Text:
    """The pipeline's tokenizer(s) and text encoder(s), as the text family `net` takes; a pipeline with a part that
    family would leave unused (an SDXL pipeline's text_encoder_2 for a one-encoder net, SD3's T5) is refused, naming
    the part, rather than half-loaded."""
    config = pipeline_config(pretrained, key)  # read once: its parts, and SDXL's force_zeros_for_empty_prompt
    parts = listed_parts(config)
    if isinstance(net, CogVideoXTransformer3DModel):
        return _t5_text(pretrained, net, parts, trainable, key, max_sequence_length)
    flux = isinstance(net, FluxTransformer2DModel)
    if is_sdxl(net) or flux:
        for part in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
            if part not in parts:
                takes = "a CLIP and a T5 encoder" if flux else "two text encoders"
                raise ConfigError(f"{key}={pretrained!r} has no {part}/: a {type(net).__name__} takes {takes}")
        used = {"tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2"}
    else:
        used = {"tokenizer", "text_encoder"}
        if isinstance(net, SD3Transformer2DModel):  # CLIP-L, CLIP-G and T5 (or lightdiff's one CLIP under two names)
            used |= {"tokenizer_2", "text_encoder_2", "tokenizer_3", "text_encoder_3"}
    denoiser_and_vae = {"unet", "transformer", "vae"}
    unused = sorted(set(parts) - used - denoiser_and_vae - set(UNUSED_PARTS))
    if unused:
        raise ConfigError(
            f"{key}={pretrained!r} has {', '.join(unused)}, which this {type(net).__name__} cannot use: a pipeline "
            "of another family (an SDXL pipeline needs an SDXL UNet: model.load_pretrained_unet=true or net=sdxl_tiny)"
        )
    tokenizer = load_component(CLIPTokenizer, pretrained, "tokenizer", key)
    if isinstance(net, SD3Transformer2DModel):
        return _sd3_text(pretrained, net, parts, tokenizer, trainable, key, max_sequence_length)
    if flux:
        return FluxText(
            tokenizer,
            load_component(CLIPTextModel, pretrained, "text_encoder", key),
            load_component(T5Tokenizer, pretrained, "tokenizer_2", key),
            load_component(T5EncoderModel, pretrained, "text_encoder_2", key),
            trainable,
            max_sequence_length or FLUX_MAX_SEQUENCE_LENGTH,
            embedded_guidance_scale if net.config.guidance_embeds else None,
        )
    if is_sdxl(net):
        return SDXLText(
            tokenizer,
            load_component(CLIPTextModel, pretrained, "text_encoder", key),
            load_component(CLIPTokenizer, pretrained, "tokenizer_2", key),
            load_component(CLIPTextModelWithProjection, pretrained, "text_encoder_2", key),
            trainable,
            bool(config.get("force_zeros_for_empty_prompt", True)),
        )
    text_encoder = load_component(text_encoder_class(net), pretrained, "text_encoder", key)
    return text_conditioning(net, tokenizer, text_encoder, trainable)


def _t5_text(
    pretrained: str,
    net: CogVideoXTransformer3DModel,
    parts: dict[str, Any],
    trainable: bool,
    key: str,
    max_sequence_length: int | None,
) -> T5Text:
    """A CogVideoX pipeline's T5 tokenizer and encoder (`T5Text`); a pipeline with more text parts is refused."""
    unused = sorted(set(parts) - {"tokenizer", "text_encoder", "transformer", "vae", *UNUSED_PARTS})
    if unused:
        raise ConfigError(f"{key}={pretrained!r} has {', '.join(unused)}, which a {type(net).__name__} cannot use")
    return T5Text(
        load_component(T5Tokenizer, pretrained, "tokenizer", key),
        load_component(T5EncoderModel, pretrained, "text_encoder", key),
        trainable,
        max_sequence_length or net.config.max_text_seq_length,
    )


def pretrained_first_frame(pretrained: str, settings: FirstFrameSettings, trainable: bool) -> FirstFrame:
    """A Stable Video Diffusion pipeline's CLIP image encoder and its processor's normalisation (`FirstFrame`)."""
    from transformers import CLIPImageProcessor

    processor = load_component(CLIPImageProcessor, pretrained, "feature_extractor")
    encoder = load_component(CLIPVisionModelWithProjection, pretrained, "image_encoder")
    return FirstFrame(encoder, trainable, settings, processor.image_mean, processor.image_std)


SD3_MAX_SEQUENCE_LENGTH = 256  # StableDiffusion3Pipeline's default max_sequence_length


def _sd3_text(
    pretrained: str,
    net: SD3Transformer2DModel,
    parts: dict[str, Any],
    tokenizer: CLIPTokenizer,  # the pipeline's first tokenizer, already loaded
    trainable: bool,
    key: str,
    max_sequence_length: int | None,
) -> SD3CLIPText | SD3Text:
    """An SD3 pipeline's encoders as StableDiffusion3Pipeline uses them (`SD3Text`); lightdiff's own exports (one
    CLIP encoder written twice, no T5) as they were trained (`SD3CLIPText`: no T5 rows)."""
    text_encoder = load_component(CLIPTextModelWithProjection, pretrained, "text_encoder", key)
    if "text_encoder_2" not in parts:
        return SD3CLIPText(tokenizer, text_encoder, trainable, net.config.joint_attention_dim)
    text_encoder_2 = load_component(CLIPTextModelWithProjection, pretrained, "text_encoder_2", key)
    has_t5 = "text_encoder_3" in parts
    if not has_t5 and same_weights(text_encoder, text_encoder_2):
        return SD3CLIPText(tokenizer, text_encoder, trainable, net.config.joint_attention_dim)
    return SD3Text(
        tokenizer,
        text_encoder,
        load_component(CLIPTokenizer, pretrained, "tokenizer_2", key),
        text_encoder_2,
        load_component(T5Tokenizer, pretrained, "tokenizer_3", key) if has_t5 else None,
        load_component(T5EncoderModel, pretrained, "text_encoder_3", key) if has_t5 else None,
        trainable,
        net.config.joint_attention_dim,
        SD3_MAX_SEQUENCE_LENGTH if max_sequence_length is None else max_sequence_length,
    )


def same_weights(first: torch.nn.Module, second: torch.nn.Module) -> bool:
    """Whether two modules hold the same tensors under the same names (lightdiff's SD3 exports write one encoder
    as both CLIPs)."""
    first_state, second_state = first.state_dict(), second.state_dict()
    return first_state.keys() == second_state.keys() and all(
        torch.equal(first_state[name], second_state[name]) for name in first_state
    )
