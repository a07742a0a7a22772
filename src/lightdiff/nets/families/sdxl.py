"""SDXL (`UNet2DConditionModel` with `addition_embed_type="text_time"`; Podell et al. 2023): two CLIP encoders and
each image's size and crop ids (`SDXLText`), exported as `StableDiffusionXLPipeline` with both text encoders, zeros
as the empty negative prompt (`force_zeros_for_empty_prompt`) and no watermarker; a latent consistency student (LCM-
SDXL) the same way: StableDiffusionXLPipeline embeds the guidance scale itself for a UNet with `time_cond_proj_dim`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from lightdiff.config import ConfigError
from lightdiff.nets.families.base import (
    SIZE_AND_CROP,
    Condition,
    ConditioningSettings,
    DataDescription,
    Inputs,
    PipelineComponents,
    check_captions,
    encoder_parameters,
    pack_pooled,
    prompts_without_condition,
    unpack_pooled,
)
from lightdiff.nets.families.sd import (
    GuidanceEmbedded,
    StableDiffusion,
    check_no_shift,
    scratch_clip_text,
    with_lcm_input,
)
from lightdiff.nets.pretrained import check_parts_used, listed_parts, load_component, pipeline_config
from lightdiff.nets.text import (
    text_encoder_fingerprint,
    text_encoder_from_scratch,
    tokenize_prompts,
    tokenizer_for,
    tokenizer_from_state,
    tokenizer_state,
)

# Which samples' text is zeroed rather than encoded (B bools): SDXL's empty negative prompt (`without_condition`).
ZEROED_TEXT = "zeroed_text"
TEXT_PARTS = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")


class SDXLText(nn.Module):
    """SDXL's conditioning (`StableDiffusionXLPipeline.encode_prompt` and `_get_add_time_ids`; Podell et al. 2023,
    Sections 2.1-2.3): the penultimate hidden states of a CLIPTextModel and a CLIPTextModelWithProjection side by side
    as cross-attention keys, the second encoder's pooled projection as `text_embeds`, and `time_ids` = each image's
    size and crop record (`SIZE_AND_CROP`).

    The empty negative prompt is zeros, states and pooled vector alike, as the pipeline makes it by default
    (`force_zeros_for_empty_prompt`, negative_prompt=None; SDXL's own pipelines set it): caption dropout in training
    zeroes the same way, so the unconditional branch trained is the one guidance samples with. A pipeline with the
    flag off encodes "" instead, and so does this family then. The size and crop ids are never dropped (the
    pipeline's negative ids are the positive ones)."""

    has_unconditional = True
    reads = ("text", SIZE_AND_CROP)

    def __init__(
        self,
        tokenizer: CLIPTokenizer,
        text_encoder: CLIPTextModel,  # SDXL's CLIP ViT-L
        tokenizer_2: CLIPTokenizer,  # its own padding token in SDXL ("!"); one from the captions may be `tokenizer`
        text_encoder_2: CLIPTextModelWithProjection,  # SDXL's OpenCLIP ViT-bigG: states and the pooled projection
        trainable: bool,  # whether the method trains the encoders (from-scratch ones do)
        force_zeros_for_empty_prompt: bool = True,  # the pipeline's flag: the empty negative prompt is zeros
    ) -> None:
        super().__init__()
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.text_encoder = text_encoder.requires_grad_(trainable)
        self.text_encoder_2 = text_encoder_2.requires_grad_(trainable)
        self.trainable = trainable
        self.summary_dim = text_encoder_2.config.projection_dim

    @property
    def state_width(self) -> int:
        return self.text_encoder.config.hidden_size + self.text_encoder_2.config.hidden_size

    def check(self, net: nn.Module, data: DataDescription) -> None:
        check_captions(net, data)
        if not isinstance(self.text_encoder_2, CLIPTextModelWithProjection):
            raise ConfigError("an SDXL UNet needs a CLIPTextModelWithProjection as text_encoder_2 (its pooled vector)")
        both = self.state_width
        pooled = self.text_encoder_2.config.projection_dim
        widths = [
            ("net.cross_attention_dim", net.config.cross_attention_dim, both, f"hidden sizes side by side={both}"),
            (
                "net.projection_class_embeddings_input_dim",
                net.config.projection_class_embeddings_input_dim,
                6 * net.config.addition_time_embed_dim + pooled,
                f"6 x net.addition_time_embed_dim + text_encoder_2's projection_dim={pooled}",
            ),
        ]
        for key, width, expected, name in widths:
            if width != expected:
                raise ConfigError(f"{key}={width} differs from the text encoders' {name} (model.text_hidden_size)")
        lengths = (self.tokenizer.model_max_length, self.tokenizer_2.model_max_length)
        if lengths[0] != lengths[1]:
            raise ConfigError(f"the two tokenizers' lengths {lengths} differ; SDXL concatenates their states per token")

    def train(self, mode: bool = True) -> SDXLText:
        return super().train(mode and self.trainable)

    def encoded(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(states (B, tokens, width 1 + width 2), pooled (B, projection)) of `prompts`, as the pipeline's
        `encode_prompt` with clip_skip=None: each encoder's penultimate hidden states, the second's `text_embeds`."""
        states = []
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            output = encoder(tokenize_prompts(tokenizer, prompts).to(encoder.device), output_hidden_states=True)
            states.append(output.hidden_states[-2])
        return torch.cat(states, dim=-1), output.text_embeds

    @property
    def cacheable(self) -> bool:
        """Frozen encoders' outputs can be cached, packed in one tensor per caption (`encode`)."""
        return not self.trainable and self.summary_dim <= self.state_width

    def cache_fingerprint(self) -> str:
        first = text_encoder_fingerprint(self.tokenizer, self.text_encoder)
        return f"sdxl|{first}|{text_encoder_fingerprint(self.tokenizer_2, self.text_encoder_2)}"

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """What the text cache stores: the states with the pooled vector, zero-padded, as one more row (B, tokens + 1,
        width); `forward` unpacks it."""
        states, pooled = self.encoded(prompts)
        return pack_pooled(states, pooled)

    def forward(self, inputs: Inputs) -> Condition:
        captions = [str(text) for text in inputs["text"]]
        if "text_states" in inputs:  # data.cache_latents: packed by `encode`
            packed = inputs["text_states"].to(self.text_encoder.device, self.text_encoder.dtype)
            states, pooled = unpack_pooled(packed, self.summary_dim)
        else:
            states, pooled = self.encoded(captions)
        zeroed = inputs.get(ZEROED_TEXT)
        if zeroed is not None:
            keep = ~torch.as_tensor(zeroed, dtype=torch.bool, device=states.device)
            states, pooled = states * keep[:, None, None], pooled * keep[:, None]
        if SIZE_AND_CROP not in inputs:
            raise ValueError(f"an SDXL model needs each image's {SIZE_AND_CROP} (B, 6): sizes and crops")
        time_ids = torch.as_tensor(inputs[SIZE_AND_CROP]).to(states.device, states.dtype)
        if time_ids.shape != (len(captions), 6):
            raise ValueError(
                f"{SIZE_AND_CROP} of shape {tuple(time_ids.shape)} for {len(captions)} prompts: need (B, 6)"
            )
        kwargs = {"encoder_hidden_states": states, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
        return Condition(kwargs, pooled.float())

    def without_condition(self, inputs: Inputs, which: Sequence[bool], negative_prompt: str = "") -> Inputs:
        texts = prompts_without_condition(inputs, which, negative_prompt)["text"]
        zeroed = inputs.get(ZEROED_TEXT) or [False] * len(texts)
        zero = self.force_zeros_for_empty_prompt and negative_prompt == ""
        zeroed = [bool(done) or (drop and zero) for done, drop in zip(zeroed, which)]
        return {**inputs, "text": texts, ZEROED_TEXT: zeroed}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return encoder_parameters(self.trainable, self.text_encoder, self.text_encoder_2)

    def text_encoders(self) -> dict[str, nn.Module]:
        return {"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}

    def get_extra_state(self) -> dict[str, Any]:  # both tokenizers travel with the weights (see CLIPText's)
        return {"tokenizer": tokenizer_state(self.tokenizer), "tokenizer_2": tokenizer_state(self.tokenizer_2)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        tokenizer = tokenizer_for(self.text_encoder, state["tokenizer"])  # both checked before either is replaced
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_for(self.text_encoder_2, state["tokenizer_2"])

    def state(self) -> dict[str, Any]:
        return {
            "family": "sdxl_text",
            "text_encoder_config": self.text_encoder.config.to_dict(),
            "text_encoder_2_config": self.text_encoder_2.config.to_dict(),
            "tokenizer": tokenizer_state(self.tokenizer),
            "tokenizer_2": tokenizer_state(self.tokenizer_2),
            "force_zeros_for_empty_prompt": self.force_zeros_for_empty_prompt,
        }


def sdxl_text_from_state(state: dict[str, Any]) -> SDXLText:
    return SDXLText(
        tokenizer_from_state(state["tokenizer"]),
        CLIPTextModel(CLIPTextConfig(**state["text_encoder_config"])).eval(),
        tokenizer_from_state(state["tokenizer_2"]),
        CLIPTextModelWithProjection(CLIPTextConfig(**state["text_encoder_2_config"])).eval(),
        trainable=False,
        force_zeros_for_empty_prompt=state["force_zeros_for_empty_prompt"],
    )


def pooled_width(net: UNet2DConditionModel) -> int:
    """The pooled text width an SDXL UNet's added embedding takes besides its six embedded size / crop ids."""
    return net.config.projection_class_embeddings_input_dim - 6 * net.config.addition_time_embed_dim


class SDXL(StableDiffusion):
    """Stable Diffusion's UNet with SDXL's added text-time embedding: its guidance input (LCM-SDXL) is SD's."""

    name = "sdxl"
    denoiser_class = UNet2DConditionModel
    takes_text = True
    single_file = True
    conditionings = {"sdxl_text": sdxl_text_from_state}

    def describes(self, net: nn.Module) -> bool:
        return isinstance(net, UNet2DConditionModel) and net.config.addition_embed_type == "text_time"

    def text_width(self, net: nn.Module) -> int:
        return net.config.cross_attention_dim // 2  # two encoders of equal width side by side (SDXL's: 768 + 1280)

    def new_conditioning(self, net: nn.Module, settings: ConditioningSettings, data: DataDescription) -> SDXLText:
        """Two encoders sharing the caption tokenizer; the second's projection is the pooled width."""
        check_captions(net, data)
        tokenizer, first = scratch_clip_text(settings, data, self.text_width(net))
        width = settings.text_hidden_size or self.text_width(net)
        second = text_encoder_from_scratch(
            tokenizer,
            width,
            settings.text_layers,
            settings.text_heads,
            2 * width,
            CLIPTextModelWithProjection,
            pooled_width(net),
        )
        return SDXLText(tokenizer, first, tokenizer, second, trainable=True)

    def pretrained_conditioning(
        self, pretrained: str, net: nn.Module, settings: ConditioningSettings, key: str
    ) -> SDXLText:
        config = pipeline_config(pretrained, key)  # its parts, and force_zeros_for_empty_prompt
        check_parts_used(pretrained, listed_parts(config), set(TEXT_PARTS), net, key, TEXT_PARTS, "two text encoders")
        return SDXLText(
            load_component(CLIPTokenizer, pretrained, "tokenizer", key),
            load_component(CLIPTextModel, pretrained, "text_encoder", key),
            load_component(CLIPTokenizer, pretrained, "tokenizer_2", key),
            load_component(CLIPTextModelWithProjection, pretrained, "text_encoder_2", key),
            settings.train_text_encoder,
            bool(config.get("force_zeros_for_empty_prompt", True)),
        )

    def read_folder(
        self, folder: Path, net: nn.Module, metadata: dict[str, Any], load_vae: Callable[[], nn.Module]
    ) -> tuple[nn.Module | None, nn.Module]:
        conditioning = self.pretrained_conditioning(str(folder), net, ConditioningSettings(), "the pipeline folder")
        return load_vae(), with_lcm_input(net, conditioning, metadata)

    def write(self, parts: PipelineComponents, folder: Path) -> None:
        check_no_shift(parts.vae)
        # A latent consistency student's conditioning wraps the text (GuidanceEmbedded), from the same encoders.
        text = parts.conditioning.text if isinstance(parts.conditioning, GuidanceEmbedded) else parts.conditioning
        pipeline = StableDiffusionXLPipeline(
            vae=parts.vae,
            text_encoder=text.text_encoder,
            text_encoder_2=text.text_encoder_2,
            tokenizer=text.tokenizer,
            tokenizer_2=text.tokenizer_2,
            unet=parts.net,
            scheduler=parts.scheduler,
            force_zeros_for_empty_prompt=text.force_zeros_for_empty_prompt,  # the unconditional input (SDXLText)
            add_watermarker=False,  # the watermark changes pixels: parity with sample.py, and an optional package
        )
        pipeline.save_pretrained(folder, safe_serialization=True)


FAMILY = SDXL()
