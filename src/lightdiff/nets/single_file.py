"""Stable Diffusion 1.x / 2.x and SDXL in the original single-file layout (one `.safetensors` holding
`model.diffusion_model.*`, `first_stage_model.*` and `cond_stage_model.*` or `conditioner.embedders.*`): what most
shared fine-tunes are and what ComfyUI and AUTOMATIC1111 load. diffusers reads that layout (`from_single_file`,
`loaders/single_file_utils.py`) but writes none, so the writer here is the reverse of diffusers' readers: the
top-level names come from diffusers' own table (DIFFUSERS_TO_LDM_MAPPING, read backwards), and each block rename below
inverts one rename of theirs (named beside it). The tests run diffusers' readers on what is written and require every
weight back exactly, so a rename that drifts from theirs fails."""

from __future__ import annotations

import re
from typing import Any

import torch
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING, LDM_UNET_KEY

UNET_PREFIX = LDM_UNET_KEY  # "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x's CLIP ViT-L (diffusers' LDM_CLIP_PREFIX_TO_REMOVE[0])

# diffusers name -> original name within a UNet ResNet block (inverse of update_unet_resnet_ldm_to_diffusers)
UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
# ... within the VAE's middle attention (inverse of update_vae_attentions_ldm_to_diffusers; weights were 1x1 convs)
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _renamed(rest: str, names: dict[str, str]) -> str:
    """`rest` ("norm1.weight") with its module name replaced by the original's ("in_layers.0.weight")."""
    module, parameter = rest.rsplit(".", 1)
    return f"{names.get(module, module)}.{parameter}"


def original_unet(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A diffusers UNet2DConditionModel's state dict in the original layout (keys without `model.diffusion_model.`),
    the inverse of diffusers' convert_ldm_unet_checkpoint for its config."""
    names = original_unet_names(list(state), config)
    return {names[key]: tensor for key, tensor in state.items()}


def original_unet_names(keys: list[str], config: dict[str, Any]) -> dict[str, str]:
    """Each diffusers UNet weight name of `keys` -> its original name (what `original_unet` renames by)."""
    per_block = config["layers_per_block"] + 1  # input blocks per down block: its ResNets and its downsampler
    top = {diffusers: original for diffusers, original in DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"].items()}
    if config.get("class_embed_type") in ("timestep", "projection"):
        top.update(DIFFUSERS_TO_LDM_MAPPING["unet"]["class_embed_type"])
    if config.get("addition_embed_type") == "text_time":
        top.update(DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"])
    if config.get("num_class_embeds") is not None:
        top["class_embedding.weight"] = "label_emb.weight"
    upsampler_slot = {  # an up block's upsampler follows its last ResNet, and its attention where it has one
        int(block): 2 if any(k.startswith(f"up_blocks.{block}.attentions.") for k in keys) else 1
        for block in {key.split(".")[1] for key in keys if key.startswith("up_blocks.")}
    }
    return {key: _unet_key(key, top, per_block, upsampler_slot) for key in keys}


def _unet_key(key: str, top: dict[str, str], per_block: int, upsampler_slot: dict[int, int]) -> str:
    if key in top:
        return top[key]
    if match := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(match[1]), match[2], int(match[3]), match[4]
        index = 1 + block * per_block + layer
        return (
            f"input_blocks.{index}.0.{_renamed(rest, UNET_RESNET)}"
            if kind == "resnets"
            else (f"input_blocks.{index}.1.{rest}")
        )
    if match := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
        return f"input_blocks.{(int(match[1]) + 1) * per_block}.0.op.{match[2]}"
    if match := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(match[1])}.{_renamed(match[2], UNET_RESNET)}"
    if match := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{match[1]}"
    if match := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(match[1]), match[2], int(match[3]), match[4]
        index = block * per_block + layer
        return (
            f"output_blocks.{index}.0.{_renamed(rest, UNET_RESNET)}"
            if kind == "resnets"
            else (f"output_blocks.{index}.1.{rest}")
        )
    if match := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
        block = int(match[1])
        return f"output_blocks.{block * per_block + per_block - 1}.{upsampler_slot[block]}.conv.{match[2]}"
    raise KeyError(f"UNet weight {key!r} has no place in the original layout (not a Stable Diffusion 1.x UNet?)")


def original_vae(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL's state dict in the original layout (keys without `first_stage_model.`), the inverse
    of diffusers' convert_ldm_vae_checkpoint."""
    top = {diffusers: original for diffusers, original in DIFFUSERS_TO_LDM_MAPPING["vae"].items()}
    up_blocks = len(config["up_block_types"])
    original: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        name = top.get(key) or _vae_key(key, up_blocks)
        if name.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")) and ".attn_1." in name:
            tensor = tensor[:, :, None, None]  # the original's 1x1 convolutions (diffusers' conv_attn_to_linear)
        original[name] = tensor
    return original


def _vae_key(key: str, up_blocks: int) -> str:
    shortcut = {"conv_shortcut": "nin_shortcut"}  # update_vae_resnet_ldm_to_diffusers
    if match := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{match[1]}.block.{match[2]}.{_renamed(match[3], shortcut)}"
    if match := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
        return f"encoder.down.{match[1]}.downsample.conv.{match[2]}"
    if match := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):  # the original counts up from 0
        return f"decoder.up.{up_blocks - 1 - int(match[1])}.block.{match[2]}.{_renamed(match[3], shortcut)}"
    if match := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
        return f"decoder.up.{up_blocks - 1 - int(match[1])}.upsample.conv.{match[2]}"
    if match := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{match[1]}.mid.block_{int(match[2]) + 1}.{_renamed(match[3], shortcut)}"
    if match := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        return f"{match[1]}.mid.attn_1.{_renamed(match[2], VAE_ATTENTION)}"
    raise KeyError(f"VAE weight {key!r} has no place in the original layout (not an AutoencoderKL?)")


def original_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIPTextModel's state dict as SD 1.x files hold it (keys without `cond_stage_model.transformer.`): under
    `text_model.`, which transformers 5 dropped from CLIPTextModel and every SD 1.x file has."""
    return {key if key.startswith("text_model.") else f"text_model.{key}": tensor for key, tensor in state.items()}


def original_open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIPTextModel(WithProjection)'s state dict as OpenCLIP holds it (SD 2.x's encoder, SDXL's second), the inverse
    of diffusers' convert_open_clip_checkpoint: its tables read backwards, query / key / value joined into one
    `in_proj` as OpenCLIP's attention has them, the projection transposed."""
    state = {
        key if key.startswith(("text_model.", "text_projection.")) else f"text_model.{key}": tensor
        for key, tensor in state.items()
        if not key.endswith("position_ids")
    }
    top = {diffusers: original for diffusers, original in DIFFUSERS_TO_LDM_MAPPING["openclip"]["layers"].items()}
    renames = [
        (d, o) for d, o in DIFFUSERS_TO_LDM_MAPPING["openclip"]["transformer"].items() if "transformer." not in d
    ]
    original: dict[str, torch.Tensor] = {}
    projections: dict[str, dict[str, torch.Tensor]] = {}  # "resblocks.0.attn.in_proj_weight" -> q / k / v parts
    for key, tensor in state.items():
        if key in top:
            original[top[key]] = tensor.T if key == "text_projection.weight" else tensor
            continue
        name = key
        for diffusers, openclip in renames:
            name = name.replace(diffusers, openclip)
        if match := re.fullmatch(r"(.+\.attn)\.([qkv])_proj\.(weight|bias)", name):
            projections.setdefault(f"transformer.{match[1]}.in_proj_{match[3]}", {})[match[2]] = tensor
        else:
            original[f"transformer.{name}"] = tensor
    for name, parts in projections.items():
        original[name] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return original


def stable_diffusion_single_file(
    unet: torch.nn.Module, vae: torch.nn.Module, text_encoders: list[torch.nn.Module]
) -> dict[str, torch.Tensor]:
    """A Stable Diffusion pipeline's networks (SD 1.x: CLIP ViT-L; SD 2.x: an OpenCLIP encoder, told by its GELU;
    SDXL: both encoders) as one original-layout state dict."""
    parts = [
        (UNET_PREFIX, original_unet(unet.state_dict(), dict(unet.config))),
        (VAE_PREFIX, original_vae(vae.state_dict(), dict(vae.config))),
    ]
    if getattr(unet.config, "addition_embed_type", None) == "text_time":  # SDXL
        first, second = text_encoders
        parts += [
            ("conditioner.embedders.0.transformer.", original_clip(first.state_dict())),
            ("conditioner.embedders.1.model.", original_open_clip(second.state_dict())),
        ]
    elif text_encoders[0].config.hidden_act == "gelu":  # SD 2.x: OpenCLIP ViT-H (CLIP ViT-L uses quick_gelu)
        parts.append(("cond_stage_model.model.", original_open_clip(text_encoders[0].state_dict())))
    else:
        parts.append((CLIP_PREFIX, original_clip(text_encoders[0].state_dict())))
    return {prefix + key: tensor.detach().contiguous() for prefix, part in parts for key, tensor in part.items()}
