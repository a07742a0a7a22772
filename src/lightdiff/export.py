"""Export a trained denoiser (`lightdiff.trained.TrainedDenoiser`), as sample.py's `export_format` asks:
- `diffusers`: a pipeline folder (safetensors): the pipeline its family writes (`Family.write`; each family module's
  docstring says its layout and the pipeline arguments that reproduce lightdiff's samples), its LoRA adapters as
  diffusers' LoRA file or merged in, and lightdiff.json with what diffusers' layout has no place for;
- `single_file`: a Stable Diffusion 1.x / 2.x / SDXL model as one original-layout file (ComfyUI, A1111);
- `kohya`: a LoRA model's adapters as one kohya-layout file.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path

import torch
from diffusers import SchedulerMixin
from safetensors.torch import save_file

from lightdiff.config import ConfigError
from lightdiff.nets.families import family_of
from lightdiff.nets.families.base import PipelineComponents, RecordsPipelineArguments, TextEncoders
from lightdiff.nets.lora import (
    comfyui_state_dicts,
    has_adapters,
    kohya_state_dict,
    pipeline_components,
    without_adapters,
    write_lora_file,
)
from lightdiff.nets.single_file import stable_diffusion_single_file
from lightdiff.trained import METADATA_FILE, TrainedDenoiser

log = logging.getLogger(__name__)

# lightdiff.json's pipeline arguments when the conditioning records none (`RecordsPipelineArguments`)
NO_PIPELINE_ARGUMENTS = {"guidance_scale": None, "max_sequence_length": None, "first_frame": None}


def export_pipeline(
    denoiser: TrainedDenoiser,
    scheduler: SchedulerMixin,
    folder: str | Path,
    fuse_lora: bool = False,  # a network with LoRA adapters: merge them into the weights instead of a LoRA file
) -> Path:
    """Write a diffusers pipeline folder with `scheduler` as its sampler, in the layout of the network's family (its
    module's docstring describes it), plus lightdiff.json (class names, EMA, objective).

    A network with LoRA adapters is written as its base plus `pytorch_lora_weights.safetensors` in diffusers' LoRA
    format (`pipe.load_lora_weights(DIR)` for the Stable Diffusion and SD3 pipelines), or with `fuse_lora` as one
    network with the adapters merged in at their current scale."""
    folder = Path(folder).expanduser()
    family = family_of(denoiser.net)
    adapted = denoiser.net if has_adapters(denoiser.net) else None
    if fuse_lora and adapted is None:
        raise ValueError("fuse_lora: the network has no LoRA adapters to fuse")
    conditioning = denoiser.conditioning
    encoders = conditioning.text_encoders() if isinstance(conditioning, TextEncoders) else {}
    encoder = encoders.get("text_encoder")
    adapted_encoder = encoder if encoder is not None and has_adapters(encoder) else None
    net = without_adapters(adapted, fused=fuse_lora) if adapted is not None else denoiser.net
    if adapted_encoder is not None:  # the pipeline's text encoder: its base (or fused) weights, the family a copy
        conditioning = copy.deepcopy(conditioning)
        conditioning.text_encoder = without_adapters(adapted_encoder, fused=fuse_lora)
    family.write(PipelineComponents(net, denoiser.vae, conditioning, scheduler), folder)
    if adapted is not None and not fuse_lora:
        write_lora_file(adapted, folder, adapted_encoder)
    arguments = conditioning.pipeline_arguments() if isinstance(conditioning, RecordsPipelineArguments) else {}
    metadata = {
        "class_names": denoiser.class_names,
        "uses_ema": denoiser.uses_ema,
        "source": denoiser.source,
        "objective": denoiser.objective.state(),
        # the LoRA adapters: in LORA_WEIGHTS_FILE beside the base ("file"), merged into the weights, or none
        "lora": None if adapted is None else ("fused" if fuse_lora else "file"),
        "image_size": list(denoiser.image_size) if denoiser.image_size else None,  # the size it trained at
        "num_frames": denoiser.num_frames,  # frames per clip a video model trained on
        # the pipeline's arguments that reproduce it: T5 tokens per prompt (`max_sequence_length`), a consistency
        # model's guidance-scale input, an image-to-video model's micro-conditioning
        **NO_PIPELINE_ARGUMENTS,
        **arguments,
    }
    (folder / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    return folder


def _write_safetensors(state: dict[str, torch.Tensor], target: Path, metadata: dict[str, str]) -> None:
    """`state` as the safetensors file `target`, complete or not there (a partial file is removed)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    try:
        save_file(state, str(partial), metadata=metadata)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def export_single_file(denoiser: TrainedDenoiser, target: Path) -> None:
    """A Stable Diffusion 1.x / 2.x / SDXL model as one file in the original layout (nets/single_file.py): the UNet
    (LoRA adapters merged in at lora_scale), the VAE and the text encoders."""
    conditioning = denoiser.conditioning
    encoders = list(conditioning.text_encoders().values()) if isinstance(conditioning, TextEncoders) else []
    if not family_of(denoiser.net).single_file or denoiser.vae is None or not encoders:
        raise ConfigError(
            f"export_format=single_file writes Stable Diffusion 1.x / 2.x / SDXL models (a text UNet, a VAE, CLIP "
            f"encoders); ckpt={denoiser.source!r} holds a {type(denoiser.net).__name__}"
            + ("" if denoiser.vae is not None else " without a VAE")
        )
    net = without_adapters(denoiser.net, fused=True) if has_adapters(denoiser.net) else denoiser.net
    encoders = [without_adapters(e, fused=True) if has_adapters(e) else e for e in encoders]
    state = stable_diffusion_single_file(net, denoiser.vae, encoders)
    _write_safetensors(state, target, {"format": "pt", "lightdiff_source": str(denoiser.source)})
    log.info("wrote %s as one original-layout file %s (%d tensors)", denoiser.source, target, len(state))


def export_kohya_lora(denoiser: TrainedDenoiser, target: Path) -> None:
    """The model's LoRA adapters as one kohya-layout file (nets/lora.py kohya_state_dict), written whole or not at
    all; the adapters as trained (a loader takes the scale, as with the diffusers file)."""
    conditioning = denoiser.conditioning
    encoders = conditioning.text_encoders() if isinstance(conditioning, TextEncoders) else {}
    state = kohya_state_dict(denoiser.net, encoders.get("text_encoder"))
    ranks = sorted({tensor.shape[0] for key, tensor in state.items() if key.endswith(".lora_down.weight")})
    alphas = sorted({float(tensor) for key, tensor in state.items() if key.endswith(".alpha")})
    # sd-scripts' own metadata keys, which ComfyUI / AUTOMATIC1111 show; the weights say the rest
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(ranks[-1])}
    metadata["ss_network_alpha"] = str(alphas[-1])
    _write_safetensors(state, target, metadata)
    log.info("wrote the LoRA adapters of %s to %s in kohya's layout (%d tensors)", denoiser.source, target, len(state))


# a pair of experts' ComfyUI files: the export's name with the expert's, as Wan 2.2 LoRAs are published
EXPERT_FILE_SUFFIXES = {"transformer": "high_noise", "transformer_2": "low_noise"}


def export_comfyui_lora(denoiser: TrainedDenoiser, target: Path, overwrite: bool) -> list[Path]:
    """The model's LoRA adapters in the layout ComfyUI loads for its family (Wan: the original layer names under
    `diffusion_model.`, nets/lora.py comfyui_state_dicts): one file, or for Wan 2.2's pair of experts one per adapted
    expert, `<name>_high_noise.safetensors` / `<name>_low_noise.safetensors`. Every file is checked before any is
    written."""
    states = comfyui_state_dicts(denoiser.net, family_of(denoiser.net).comfyui_layer_name)
    if len(pipeline_components(denoiser.net)) == 1:
        targets = {component: target for component in states}
    else:
        suffixes = EXPERT_FILE_SUFFIXES
        targets = {c: target.with_name(f"{target.stem}_{suffixes[c]}{target.suffix}") for c in states}
    existing = [str(path) for path in targets.values() if path.exists()]
    if existing and not overwrite:
        raise ConfigError(f"export: {', '.join(existing)} exists; choose a new name or pass overwrite=true")
    for component, state in states.items():
        metadata = {"format": "pt", "lightdiff_source": str(denoiser.source), "lightdiff_component": component}
        _write_safetensors(state, targets[component], metadata)
        log.info("wrote the %s LoRA adapters of %s to %s for ComfyUI", component, denoiser.source, targets[component])
    return list(targets.values())
