"""Stable Diffusion 3 (`SD3Transformer2DModel`, MMDiT; Esser et al. 2024): joint attention of an image and a text
stream, plus the pooled text vector in the modulation; exported as `StableDiffusion3Pipeline` with SD3's encoders.
lightdiff's from-scratch layout trains one CLIPTextModelWithProjection for both CLIPs, written as `text_encoder` and
`text_encoder_2`, with or without a T5 `text_encoder_3` (`model.t5`); diffusers reproduces lightdiff's samples with
`max_sequence_length` = lightdiff.json's (0 without a T5: no zero T5 tokens appended).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline
from torch import nn
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from lightdiff.config import ConfigError
from lightdiff.files import module_fingerprint
from lightdiff.nets.families.base import (
    Condition,
    ConditioningSettings,
    DataDescription,
    Family,
    Inputs,
    PipelineComponents,
    check_captions,
    encoder_parameters,
    pack_pooled,
    prompts_without_condition,
    unpack_pooled,
)
from lightdiff.nets.families.sd import CLIPText, clip_text_from_state, scratch_clip_text
from lightdiff.nets.pretrained import check_parts_used, load_component, pipeline_parts, same_weights
from lightdiff.nets.text import (
    build_t5_tokenizer,
    t5_encoder_from_scratch,
    t5_tokenizer_for,
    t5_tokenizer_state,
    text_encoder_fingerprint,
    tokenize_prompts,
    tokenizer_for,
    tokenizer_from_state,
    tokenizer_state,
)

SD3_MAX_SEQUENCE_LENGTH = 256  # StableDiffusion3Pipeline's default max_sequence_length
SCRATCH_MAX_SEQUENCE_LENGTH = 16  # T5 tokens per prompt of a T5 built from the captions (short shape captions)
TEXT_PARTS = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "tokenizer_3", "text_encoder_3")


class SD3CLIPText(CLIPText):
    """SD3's text inputs (`StableDiffusion3Pipeline.encode_prompt`) with one CLIPTextModelWithProjection standing in
    for both CLIP encoders and no T5 (`max_sequence_length=0`): the penultimate hidden states of the two encoders
    concatenated along the width and zero-padded to `joint_attention_dim`, and the pooled vector their two projected
    end-of-text embeddings (`text_embeds`) side by side. lightdiff exports the encoder twice (`lightdiff.export`)."""

    def __init__(
        self,
        tokenizer: CLIPTokenizer,
        text_encoder: CLIPTextModelWithProjection,
        trainable: bool,
        joint_attention_dim: int,  # the transformer's text-stream input width (states are zero-padded to it)
    ) -> None:
        super().__init__(tokenizer, text_encoder, trainable)
        self.joint_attention_dim = joint_attention_dim
        self.summary_dim = 2 * text_encoder.config.projection_dim  # the pooled projections
        self.max_sequence_length = 0  # no T5 rows: StableDiffusion3Pipeline(max_sequence_length=0) reproduces it

    # SD3's second CLIP and T5 parts: this layout has neither (the one CLIP is written as both CLIPs)
    tokenizer_2 = text_encoder_2 = tokenizer_3 = text_encoder_3 = None

    @property
    def cacheable(self) -> bool:
        return False  # the cache holds one tensor per caption; SD3 takes two

    def check(self, net: nn.Module, data: DataDescription) -> None:
        check_captions(net, data)
        hidden = self.text_encoder.config.hidden_size
        if not isinstance(self.text_encoder, CLIPTextModelWithProjection):
            raise ConfigError("an SD3 transformer (net=mmdit_tiny) needs a CLIPTextModelWithProjection text encoder")
        if self.joint_attention_dim < 2 * hidden:
            raise ConfigError(
                f"net.joint_attention_dim={self.joint_attention_dim} is below 2 x the text encoder's "
                f"hidden_size={hidden} (SD3 concatenates two CLIP encoders' states; model.text_hidden_size)"
            )
        width = 2 * self.text_encoder.config.projection_dim  # the states are padded up to joint_attention_dim
        if net.config.pooled_projection_dim != width:
            raise ConfigError(
                f"net.pooled_projection_dim={net.config.pooled_projection_dim} differs from the text encoder's "
                f"2 x projection_dim={width} (model.text_hidden_size)"
            )

    def forward(self, inputs: Inputs) -> Condition:
        output = self.text_encoder(self.token_ids([str(text) for text in inputs["text"]]), output_hidden_states=True)
        hidden = output.hidden_states[-2]
        states = F.pad(torch.cat([hidden, hidden], dim=-1), (0, self.joint_attention_dim - 2 * hidden.shape[-1]))
        pooled = torch.cat([output[0], output[0]], dim=-1)
        return Condition({"encoder_hidden_states": states, "pooled_projections": pooled}, pooled.float())

    def pipeline_arguments(self) -> dict[str, Any]:
        return {"max_sequence_length": self.max_sequence_length}

    def state(self) -> dict[str, Any]:
        return {**super().state(), "family": "sd3_clip_text", "joint_attention_dim": self.joint_attention_dim}


class SD3Text(nn.Module):
    """SD3's text inputs as `StableDiffusion3Pipeline.encode_prompt` makes them from its three encoders (Esser et al.
    2024, Section 5.2): the penultimate hidden states of CLIP-L and CLIP-G side by side, zero-padded to the T5 width,
    followed by T5's states (`max_sequence_length` tokens; zeros where the pipeline has no T5) as the joint-attention
    text stream, and the two CLIPs' projected end tokens (`text_embeds`) side by side as the pooled vector.

    `text_encoder_2=None` is lightdiff's from-scratch layout: one CLIP encoder stands in for both (as `SD3CLIPText`),
    written twice by the exporter. The unconditional twin encodes the negative prompt ("" by default, as the
    pipeline's)."""

    has_unconditional = True
    reads = ("text",)

    def __init__(
        self,
        tokenizer: CLIPTokenizer,
        text_encoder: CLIPTextModelWithProjection,  # CLIP-L
        tokenizer_2: CLIPTokenizer | None,  # None with text_encoder_2
        text_encoder_2: CLIPTextModelWithProjection | None,  # CLIP-G; None: text_encoder stands in for both
        tokenizer_3: T5Tokenizer | None,
        text_encoder_3: T5EncoderModel | None,  # T5-XXL; None: zeros, as the pipeline without T5
        trainable: bool,  # whether the method trains the encoders
        joint_attention_dim: int,  # the transformer's text-stream input width
        max_sequence_length: int,  # T5 tokens per prompt (the pipeline's max_sequence_length; 0: no T5 rows)
    ) -> None:
        super().__init__()
        self.tokenizer, self.tokenizer_2, self.tokenizer_3 = tokenizer, tokenizer_2, tokenizer_3
        self.text_encoder = text_encoder.requires_grad_(trainable)
        self.text_encoder_2 = text_encoder_2.requires_grad_(trainable) if text_encoder_2 is not None else None
        self.text_encoder_3 = text_encoder_3.requires_grad_(trainable) if text_encoder_3 is not None else None
        self.trainable = trainable
        self.joint_attention_dim = joint_attention_dim
        self.max_sequence_length = max_sequence_length
        self.summary_dim = sum(encoder.config.projection_dim for _, encoder in self._clips())

    def _clips(self) -> list[tuple[CLIPTokenizer, CLIPTextModelWithProjection]]:
        first = (self.tokenizer, self.text_encoder)
        return [first, (self.tokenizer_2, self.text_encoder_2) if self.text_encoder_2 is not None else first]

    def check(self, net: nn.Module, data: DataDescription) -> None:
        check_captions(net, data)
        widths = [encoder.config.hidden_size for _, encoder in self._clips()]
        if sum(widths) > self.joint_attention_dim:
            raise ConfigError(
                f"net.joint_attention_dim={self.joint_attention_dim} is below the two CLIP encoders' hidden sizes "
                f"side by side ({' + '.join(map(str, widths))}; model.text_hidden_size)"
            )
        if net.config.pooled_projection_dim != self.summary_dim:
            raise ConfigError(
                f"net.pooled_projection_dim={net.config.pooled_projection_dim} differs from the two CLIP projections "
                f"side by side={self.summary_dim}"
            )
        if self.text_encoder_3 is not None and self.text_encoder_3.config.d_model != self.joint_attention_dim:
            raise ConfigError(
                f"net.joint_attention_dim={self.joint_attention_dim} differs from the T5 encoder's "
                f"d_model={self.text_encoder_3.config.d_model}"
            )
        if self.max_sequence_length < 0:
            raise ConfigError(f"model.max_sequence_length={self.max_sequence_length} must be >= 0")

    def train(self, mode: bool = True) -> SD3Text:
        return super().train(mode and self.trainable)

    def encoded(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(states (B, CLIP tokens + max_sequence_length, joint_attention_dim), pooled (B, projections)) of
        `prompts`: `encode_prompt` with clip_skip=None."""
        states, pooled = [], []
        for tokenizer, encoder in self._clips():
            output = encoder(tokenize_prompts(tokenizer, prompts).to(encoder.device), output_hidden_states=True)
            states.append(output.hidden_states[-2])
            pooled.append(output[0])
        clip = torch.cat(states, dim=-1)
        if self.text_encoder_3 is not None:
            ids = tokenize_prompts(self.tokenizer_3, prompts, self.max_sequence_length).to(self.text_encoder_3.device)
            t5 = self.text_encoder_3(ids)[0]
        else:
            t5 = clip.new_zeros(len(prompts), self.max_sequence_length, self.joint_attention_dim)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)

    @property
    def cacheable(self) -> bool:
        """Frozen encoders' outputs can be cached, the pooled vector packed as one more row (`encode`)."""
        return not self.trainable and self.summary_dim <= self.joint_attention_dim

    def cache_fingerprint(self) -> str:
        parts = [text_encoder_fingerprint(tokenizer, encoder) for tokenizer, encoder in self._clips()]
        if self.text_encoder_3 is not None:
            parts.append(module_fingerprint(t5_tokenizer_state(self.tokenizer_3), self.text_encoder_3))
        return f"sd3|{self.max_sequence_length}|{'|'.join(parts)}"

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """What the text cache stores: the states with the pooled vector, zero-padded, as one more row."""
        states, pooled = self.encoded(prompts)
        return pack_pooled(states, pooled)

    def forward(self, inputs: Inputs) -> Condition:
        captions = [str(text) for text in inputs["text"]]
        if "text_states" in inputs:  # data.cache_latents: packed by `encode`; a dropped caption is encoded as ""
            packed = inputs["text_states"].to(self.text_encoder.device, self.text_encoder.dtype)
            dropped = torch.tensor([caption == "" for caption in captions], device=packed.device)
            if dropped.any():  # the encoders run only for them
                packed = torch.where(dropped[:, None, None], self.encode([""]).to(packed), packed)
            states, pooled = unpack_pooled(packed, self.summary_dim)
        else:
            states, pooled = self.encoded(captions)
        return Condition({"encoder_hidden_states": states, "pooled_projections": pooled}, pooled.float())

    def without_condition(self, inputs: Inputs, which: Sequence[bool], negative_prompt: str = "") -> Inputs:
        return prompts_without_condition(inputs, which, negative_prompt)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return encoder_parameters(self.trainable, self.text_encoder, self.text_encoder_2, self.text_encoder_3)

    def text_encoders(self) -> dict[str, nn.Module]:
        """The encoders it holds; lightdiff's one CLIP (no `text_encoder_2`) stands in for both of SD3's CLIPs."""
        encoders = {"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}
        encoders["text_encoder_3"] = self.text_encoder_3
        return {name: encoder for name, encoder in encoders.items() if encoder is not None}

    def get_extra_state(self) -> dict[str, Any]:  # the tokenizers travel with the weights (see CLIPText's)
        state: dict[str, Any] = {"tokenizer": tokenizer_state(self.tokenizer)}
        if self.tokenizer_2 is not None:
            state["tokenizer_2"] = tokenizer_state(self.tokenizer_2)
        if self.tokenizer_3 is not None:
            state["tokenizer_3"] = t5_tokenizer_state(self.tokenizer_3)
        return state

    def set_extra_state(self, state: dict[str, Any]) -> None:
        tokenizers = [tokenizer_for(self.text_encoder, state["tokenizer"])]  # all checked before any is replaced
        if self.text_encoder_2 is not None:
            tokenizers.append(tokenizer_for(self.text_encoder_2, state["tokenizer_2"]))
        if self.text_encoder_3 is not None:
            self.tokenizer_3 = t5_tokenizer_for(self.text_encoder_3, state["tokenizer_3"])
        self.tokenizer = tokenizers[0]
        if self.text_encoder_2 is not None:
            self.tokenizer_2 = tokenizers[1]

    def pipeline_arguments(self) -> dict[str, Any]:
        return {"max_sequence_length": self.max_sequence_length}

    def state(self) -> dict[str, Any]:
        second, third = self.text_encoder_2, self.text_encoder_3
        return {
            "family": "sd3_text",
            "text_encoder_config": self.text_encoder.config.to_dict(),
            "text_encoder_2_config": second.config.to_dict() if second is not None else None,
            "text_encoder_3_config": third.config.to_dict() if third is not None else None,
            **self.get_extra_state(),
            "joint_attention_dim": self.joint_attention_dim,
            "max_sequence_length": self.max_sequence_length,
        }


def sd3_clip_text_from_state(state: dict[str, Any]) -> SD3CLIPText:
    clip = clip_text_from_state(state)
    return SD3CLIPText(clip.tokenizer, clip.text_encoder, False, state["joint_attention_dim"])


def sd3_text_from_state(state: dict[str, Any]) -> SD3Text:
    second, third = state["text_encoder_2_config"], state["text_encoder_3_config"]
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**second)).eval() if second else None
    text_encoder_3 = T5EncoderModel(T5Config(**third)).eval() if third else None
    return SD3Text(
        tokenizer_from_state(state["tokenizer"]),
        CLIPTextModelWithProjection(CLIPTextConfig(**state["text_encoder_config"])).eval(),
        tokenizer_from_state(state["tokenizer_2"]) if second else None,
        text_encoder_2,
        t5_tokenizer_for(text_encoder_3, state["tokenizer_3"]) if third else None,
        text_encoder_3,
        trainable=False,
        joint_attention_dim=state["joint_attention_dim"],
        max_sequence_length=state["max_sequence_length"],
    )


def with_shift_key(vae: AutoencoderKL) -> AutoencoderKL:
    """`vae` with a `shift_factor` in its config (None becomes 0): StableDiffusion3Pipeline and FluxPipeline decode
    latents / scaling_factor + shift_factor and need the key."""
    if vae.config.shift_factor is None:
        vae.register_to_config(shift_factor=0.0)
    return vae


class SD3(Family):
    name = "sd3"
    denoiser_class = SD3Transformer2DModel
    takes_text = True
    conditionings = {"sd3_clip_text": sd3_clip_text_from_state, "sd3_text": sd3_text_from_state}

    def check_settings(self, net: nn.Module, settings: ConditioningSettings) -> None:
        pass  # model.t5 is SD3's third encoder

    def text_width(self, net: nn.Module) -> int:
        return net.config.pooled_projection_dim // 2  # two pooled vectors side by side (SD3CLIPText)

    def new_conditioning(
        self, net: nn.Module, settings: ConditioningSettings, data: DataDescription
    ) -> SD3CLIPText | SD3Text:
        """One CLIP standing in for both of SD3's, plus a T5 as wide as the text stream with `model.t5`."""
        check_captions(net, data)
        width = net.config.joint_attention_dim
        tokenizer, clip = scratch_clip_text(settings, data, self.text_width(net), CLIPTextModelWithProjection)
        if not settings.t5:
            return SD3CLIPText(tokenizer, clip, True, width)
        length = settings.max_sequence_length or SCRATCH_MAX_SEQUENCE_LENGTH
        t5_tokenizer = build_t5_tokenizer(data.captions(), model_max_length=length)
        t5 = t5_encoder_from_scratch(t5_tokenizer, width, settings.text_layers, settings.text_heads, 2 * width)
        return SD3Text(tokenizer, clip, None, None, t5_tokenizer, t5, True, width, length)

    def pretrained_conditioning(
        self, pretrained: str, net: nn.Module, settings: ConditioningSettings, key: str
    ) -> SD3CLIPText | SD3Text:
        """An SD3 pipeline's encoders as StableDiffusion3Pipeline uses them (`SD3Text`); lightdiff's own exports (one
        CLIP encoder written twice, no T5) as they were trained (`SD3CLIPText`: no T5 rows)."""
        parts = pipeline_parts(pretrained, key)
        check_parts_used(pretrained, parts, set(TEXT_PARTS), net, key)
        trainable, joint = settings.train_text_encoder, net.config.joint_attention_dim
        tokenizer = load_component(CLIPTokenizer, pretrained, "tokenizer", key)
        text_encoder = load_component(CLIPTextModelWithProjection, pretrained, "text_encoder", key)
        if "text_encoder_2" not in parts:
            return SD3CLIPText(tokenizer, text_encoder, trainable, joint)
        text_encoder_2 = load_component(CLIPTextModelWithProjection, pretrained, "text_encoder_2", key)
        has_t5 = "text_encoder_3" in parts
        if not has_t5 and same_weights(text_encoder, text_encoder_2):
            return SD3CLIPText(tokenizer, text_encoder, trainable, joint)
        length = settings.max_sequence_length
        return SD3Text(
            tokenizer,
            text_encoder,
            load_component(CLIPTokenizer, pretrained, "tokenizer_2", key),
            text_encoder_2,
            load_component(T5Tokenizer, pretrained, "tokenizer_3", key) if has_t5 else None,
            load_component(T5EncoderModel, pretrained, "text_encoder_3", key) if has_t5 else None,
            trainable,
            joint,
            SD3_MAX_SEQUENCE_LENGTH if length is None else length,
        )

    def read_folder(
        self, folder: Path, net: nn.Module, metadata: dict[str, Any], load_vae: Callable[[], nn.Module]
    ) -> tuple[nn.Module | None, nn.Module]:
        # lightdiff's export records the T5 length it trained with; StableDiffusion3Pipeline's default otherwise
        settings = ConditioningSettings(max_sequence_length=metadata.get("max_sequence_length"))
        return load_vae(), self.pretrained_conditioning(str(folder), net, settings, "the pipeline folder")

    def write(self, parts: PipelineComponents, folder: Path) -> None:
        text = parts.conditioning
        # lightdiff's one CLIP (SD3CLIPText, or SD3Text without text_encoder_2) stands in for both of SD3's CLIPs, so
        # it is written as both
        pipeline = StableDiffusion3Pipeline(
            transformer=parts.net,
            scheduler=parts.scheduler,
            vae=with_shift_key(parts.vae),
            text_encoder=text.text_encoder,
            tokenizer=text.tokenizer,
            text_encoder_2=text.text_encoder_2 or text.text_encoder,
            tokenizer_2=text.tokenizer_2 or text.tokenizer,
            text_encoder_3=text.text_encoder_3,
            tokenizer_3=text.tokenizer_3,
        )
        pipeline.save_pretrained(folder, safe_serialization=True)


FAMILY = SD3()
