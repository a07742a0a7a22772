"""Export a trained denoiser (`lightdiff.trained.TrainedDenoiser`) to a diffusers pipeline folder (safetensors):
the pipeline its family writes (`Family.write`; each family module's docstring says its layout and the pipeline
arguments that reproduce lightdiff's samples), its LoRA adapters as diffusers' LoRA file or merged in, and
lightdiff.json with what diffusers' layout has no place for.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from diffusers import SchedulerMixin

from lightdiff.nets.families import family_of
from lightdiff.nets.families.base import PipelineComponents, RecordsPipelineArguments, TextEncoders
from lightdiff.nets.lora import has_adapters, without_adapters, write_lora_file
from lightdiff.trained import METADATA_FILE, TrainedDenoiser

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
