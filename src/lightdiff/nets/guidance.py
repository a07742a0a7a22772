"""A student network that takes the guidance scale as an input, made from its teacher: what guidance distillation
(`model=guidance_distill`) and latent consistency distillation (`model=lcm`) train.

diffusers' networks have two such inputs: FLUX's guidance embedding (`FluxTransformer2DModel(guidance_embeds=True)`,
FLUX.1-dev's, fed the scale itself as `guidance`) and a UNet's `time_cond_proj_dim` (LCM's sinusoidal embedding of
w = scale - 1 added to the timestep embedding, which StableDiffusionPipeline also feeds). Either is added to a copy of
the teacher with its new projection zeroed, so the student starts as exactly the teacher's conditional network.
"""

from __future__ import annotations

import copy

import torch
from diffusers import FluxTransformer2DModel, UNet2DConditionModel
from torch import nn

from lightdiff.config import ConfigError
from lightdiff.nets.conditioning import CLIPText, FluxText, GuidanceEmbedded, SDXLText

FLUX_GUIDANCE_KEYS = ["guidance_embedder.linear_1", "guidance_embedder.linear_2"]


def unet_with_guidance_input(teacher_net: UNet2DConditionModel, embedding_dim: int) -> UNet2DConditionModel:
    """The teacher's UNet with a guidance-scale input of `embedding_dim` (diffusers' `time_cond_proj_dim`), its new
    projection zero-initialised: the student starts as exactly the teacher's network."""
    if teacher_net.config.time_cond_proj_dim == embedding_dim:
        return copy.deepcopy(teacher_net)
    student = UNet2DConditionModel.from_config({**teacher_net.config, "time_cond_proj_dim": embedding_dim})
    missing, unexpected = student.load_state_dict(teacher_net.state_dict(), strict=False)
    if unexpected or missing != ["time_embedding.cond_proj.weight"]:
        raise ConfigError(f"the teacher's UNet does not take a guidance input: missing {missing}, extra {unexpected}")
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student


def flux_with_guidance_input(teacher_net: FluxTransformer2DModel) -> FluxTransformer2DModel:
    """The teacher's FLUX transformer with the guidance embedding (`guidance_embeds=True`), whose output layer is
    zeroed: it adds nothing to the timestep and text embedding until it learns, so the student starts as the
    teacher."""
    if teacher_net.config.guidance_embeds:
        return copy.deepcopy(teacher_net)
    student = FluxTransformer2DModel.from_config({**teacher_net.config, "guidance_embeds": True})
    loaded = student.load_state_dict(teacher_net.state_dict(), strict=False)
    new = sorted({key.rsplit(".", 1)[0].removeprefix("time_text_embed.") for key in loaded.missing_keys})
    if loaded.unexpected_keys or new != FLUX_GUIDANCE_KEYS:
        raise ConfigError(
            f"the teacher's FLUX transformer does not take a guidance embedding: missing {loaded.missing_keys}, "
            f"extra {loaded.unexpected_keys}"
        )
    embedder = student.time_text_embed.guidance_embedder
    torch.nn.init.zeros_(embedder.linear_2.weight)
    torch.nn.init.zeros_(embedder.linear_2.bias)
    return student


def with_guidance_input(
    teacher_net: nn.Module,
    teacher_family: nn.Module,  # the teacher's text family (frozen encoders, shared with the student)
    guidance_scale: float,  # the scale the student samples at by default (the pipeline's guidance_scale)
    embedding_dim: int,  # a UNet's time_cond_proj_dim (FLUX's embedding has its own width)
) -> tuple[nn.Module, nn.Module]:
    """(student network, its family): the teacher's network with a guidance-scale input, and the teacher's text
    family feeding it the scale (`with_guidance(condition, scales)` for per-sample scales in training)."""
    if isinstance(teacher_net, FluxTransformer2DModel) and isinstance(teacher_family, FluxText):
        family = FluxText(
            teacher_family.tokenizer,
            teacher_family.text_encoder,
            teacher_family.tokenizer_2,
            teacher_family.text_encoder_2,
            False,
            teacher_family.max_sequence_length,
            guidance_scale,
        )
        return flux_with_guidance_input(teacher_net), family
    if isinstance(teacher_net, UNet2DConditionModel) and isinstance(teacher_family, (CLIPText, SDXLText)):
        student = unet_with_guidance_input(teacher_net, embedding_dim)
        return student, GuidanceEmbedded(teacher_family, guidance_scale, embedding_dim)
    raise ConfigError(
        f"a {type(teacher_net).__name__} has no guidance-scale input in diffusers; guidance distillation needs a FLUX "
        "transformer (guidance_embeds) or a text-conditioned UNet (time_cond_proj_dim)"
    )
