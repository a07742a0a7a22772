"""Qwen-Image (`QwenImageTransformer2DModel`; Qwen Team 2025, "Qwen-Image Technical Report", arXiv 2508.02324): an
MMDiT whose text is the last hidden states of a Qwen2.5-VL language model reading the prompt inside a chat template,
behind Qwen-Image's VAE (`AutoencoderKLQwenImage`, Wan's architecture on single frames, latents normalised per channel
by its `latents_mean` / `latents_std`). Like FLUX it takes latents packed into 2x2 patches as tokens and its timestep
/ 1000, with each image's packed grid as `img_shapes`; `QwenImage.output` packs and unpacks, so every method sees
(B, C, H, W) latents. Trained by flow matching, as Qwen-Image is.

Text (`QwenText`, `QwenImagePipeline._get_qwen_prompt_embeds`): the prompt formatted into the pipeline's template,
Qwen2.5-VL's last hidden states under the attention mask, the template's system prefix (its first 34 tokens) dropped,
the rest zero-padded with a mask. A tokenizer built from the captions (`nets.text.build_qwen2_tokenizer`) holds every
word of the template as one token, as Qwen's own does, so the prefix is 34 tokens and plain diffusers reads the export
unchanged. Guidance is the pipeline's true CFG: uncond + s (cond - uncond), rescaled per token to the conditional
prediction's norm (`QwenImage.guided`).

Exported as `QwenImagePipeline`; plain diffusers reproduces lightdiff's samples with `max_sequence_length` =
lightdiff.json's and, with guidance, lightdiff's `guidance_scale` as `true_cfg_scale` with `negative_prompt=""` (the
pipeline guides only when a negative prompt is given; lightdiff's unconditional input is the empty prompt).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import QwenImagePipeline, QwenImageTransformer2DModel, SchedulerMixin
from torch import nn
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

from lightdiff.config import ConfigError
from lightdiff.files import module_fingerprint
from lightdiff.nets.families.base import (
    Condition,
    ConditioningSettings,
    DataDescription,
    Family,
    Inputs,
    PipelineComponents,
    PromptStates,
    check_captions,
    kwargs_in_dtype,
)
from lightdiff.nets.families.flux import FAMILY as FLUX
from lightdiff.nets.families.flux import PACKED_PATCH, pack_latents, unpack_latents
from lightdiff.nets.pretrained import check_parts_used, load_component, pipeline_parts
from lightdiff.nets.text import (
    build_qwen2_tokenizer,
    qwen2_tokenizer_for,
    qwen2_tokenizer_state,
    qwen_vl_from_scratch,
)

# QwenImagePipeline's prompt template and the number of its tokens before the prompt that it drops
QWEN_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
QWEN_DROP_TOKENS = 34  # QwenImagePipeline.prompt_template_encode_start_idx
QWEN_MAX_SEQUENCE_LENGTH = 512  # QwenImagePipeline.__call__'s default (its limit: 1024)
QWEN_DEFAULT_SAMPLE_SIZE = 128  # QwenImagePipeline.default_sample_size: latents a side when no size is given
QWEN_TIMESTEP_SCALE = 1000  # the pipeline passes timestep / 1000; the transformer multiplies by 1000 again
TEXT_PARTS = ("tokenizer", "text_encoder")


class QwenText(PromptStates):
    """Qwen-Image's conditioning: per prompt, Qwen2.5-VL's last hidden states past the template's system prefix
    (`encoder_hidden_states`, zero-padded to `max_sequence_length` rows) and their mask
    (`encoder_hidden_states_mask`); padding rows take no part in the joint attention, so the length padded to does not
    change the transformer's output. The unconditional twin encodes the negative prompt, "" by default. The summary a
    discriminator projects is the mean of the prompt's states."""

    def __init__(
        self,
        tokenizer: Qwen2Tokenizer,
        text_encoder: Qwen2_5_VLForConditionalGeneration,
        trainable: bool,  # whether the method trains the encoder (a from-scratch one does)
        max_sequence_length: int,  # text tokens per prompt after the system prefix (the pipeline's, 512)
    ) -> None:
        super().__init__()
        prefix = len(tokenizer(QWEN_TEMPLATE.split("{}")[0]).input_ids)
        if prefix != QWEN_DROP_TOKENS:
            raise ConfigError(
                f"the tokenizer splits QwenImagePipeline's template prefix into {prefix} tokens; the pipeline drops "
                f"{QWEN_DROP_TOKENS} (Qwen's tokenizer, or one built by lightdiff.nets.text.build_qwen2_tokenizer)"
            )
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.requires_grad_(trainable)
        self.trainable = trainable
        self.max_sequence_length = max_sequence_length
        self.summary_dim = text_encoder.config.text_config.hidden_size

    def check(self, net: nn.Module, data: DataDescription) -> None:
        check_captions(net, data)
        width = self.summary_dim
        if net.config.joint_attention_dim != width:
            raise ConfigError(
                f"net.joint_attention_dim={net.config.joint_attention_dim} differs from the Qwen2.5-VL encoder's "
                f"hidden_size={width}"
            )

    def cache_fingerprint(self) -> str:
        state = {**qwen2_tokenizer_state(self.tokenizer), "max_sequence_length": self.max_sequence_length}
        return f"qwen2_5_vl|{module_fingerprint(state, self.text_encoder)}"

    def prompt_lengths(self, prompts: Sequence[str]) -> torch.Tensor:
        """Each prompt's states (its template past the prefix), at most `max_sequence_length`."""
        lengths = [len(self.tokenizer(QWEN_TEMPLATE.format(p)).input_ids) - QWEN_DROP_TOKENS for p in prompts]
        return torch.tensor(lengths).clamp(max=self.max_sequence_length)

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """(B, max_sequence_length, hidden): QwenImagePipeline's `_get_qwen_prompt_embeds`, truncated to
        `max_sequence_length` (`encode_prompt`), zero past each prompt's states."""
        texts = [QWEN_TEMPLATE.format(prompt) for prompt in prompts]
        limit = self.max_sequence_length + QWEN_DROP_TOKENS
        tokens = self.tokenizer(texts, max_length=limit, padding=True, truncation=True, return_tensors="pt")
        tokens = tokens.to(self.text_encoder.device)
        hidden = self.text_encoder(
            input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, output_hidden_states=True
        ).hidden_states[-1]
        states = hidden.new_zeros(len(prompts), self.max_sequence_length, hidden.shape[-1])
        for row, (sample, mask) in enumerate(zip(hidden, tokens.attention_mask.bool())):
            kept = sample[mask][QWEN_DROP_TOKENS:][: self.max_sequence_length]
            states[row, : len(kept)] = kept
        return states

    def forward(self, inputs: Inputs) -> Condition:
        states = self.prompt_states(inputs)
        lengths = self.prompt_lengths([str(text) for text in inputs["text"]]).to(states.device)
        mask = torch.arange(states.shape[1], device=states.device)[None] < lengths[:, None]
        summary = (states.float() * mask[..., None]).sum(dim=1) / lengths[:, None].clamp(min=1)
        return Condition({"encoder_hidden_states": states, "encoder_hidden_states_mask": mask}, summary)

    def get_extra_state(self) -> dict[str, Any]:  # the tokenizer travels with the weights (see CLIPText's)
        return {"tokenizer": qwen2_tokenizer_state(self.tokenizer)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.tokenizer = qwen2_tokenizer_for(self.text_encoder, state["tokenizer"])

    def state(self) -> dict[str, Any]:
        return {
            "family": "qwen_text",
            "text_encoder_config": self.text_encoder.config.to_dict(),
            "tokenizer": qwen2_tokenizer_state(self.tokenizer),
            "max_sequence_length": self.max_sequence_length,
        }


def qwen_text_from_state(state: dict[str, Any]) -> QwenText:
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**state["text_encoder_config"])).eval()
    tokenizer = qwen2_tokenizer_for(text_encoder, state["tokenizer"])
    return QwenText(tokenizer, text_encoder, trainable=False, max_sequence_length=state["max_sequence_length"])


def image_shapes(latents: torch.Tensor) -> list[list[tuple[int, int, int]]]:
    """QwenImagePipeline's `img_shapes`: per sample, the (frame, rows, columns) grid of its packed tokens."""
    height, width = latents.shape[-2:]
    return [[(1, height // PACKED_PATCH, width // PACKED_PATCH)]] * len(latents)


class QwenImage(Family):
    name = "qwenimage"
    denoiser_class = QwenImageTransformer2DModel
    takes_text = True
    objectives = ("flow_matching",)  # QwenImagePipeline samples with a flow sampler
    conditionings = {"qwen_text": qwen_text_from_state}

    def latent_channels(self, net: nn.Module) -> int:
        return net.config.in_channels // (PACKED_PATCH * PACKED_PATCH)  # a token holds 2x2 latent pixels

    def token_side(self, net: nn.Module) -> int:
        return PACKED_PATCH  # the packing is the patch (net.patch_size = 2 sizes its output to the packed tokens)

    def side_multiple(self, net: nn.Module) -> int:
        return self.token_side(net)

    def default_sample_size(self, net: nn.Module) -> int:
        return QWEN_DEFAULT_SAMPLE_SIZE  # rotary positions fit any size: QwenImagePipeline's default

    def check(self, net: nn.Module, vae: nn.Module | None, num_frames: int | None) -> None:
        if net.config.patch_size != PACKED_PATCH:
            raise ConfigError(
                f"net.patch_size={net.config.patch_size}: QwenImagePipeline packs 2x2 latent patches (patch_size 2)"
            )
        if net.config.guidance_embeds:
            raise ConfigError("net.guidance_embeds=true: diffusers' QwenImageTransformer2DModel cannot run it")
        if vae is not None and type(vae).__name__ != "AutoencoderKLQwenImage":
            raise ConfigError(
                f"model.vae: a QwenImageTransformer2DModel learns Qwen-Image's VAE (AutoencoderKLQwenImage), not a "
                f"{type(vae).__name__}: QwenImagePipeline could not decode its latents"
            )

    def output(self, net: nn.Module, x_t: torch.Tensor, timesteps: torch.Tensor, condition: Condition) -> torch.Tensor:
        """QwenImagePipeline's transformer call: packed latents, timestep / 1000, the packed grid; unpacked."""
        height, width = x_t.shape[-2:]
        kwargs = kwargs_in_dtype(condition, x_t.dtype)
        output = net(
            pack_latents(x_t),
            timestep=timesteps.to(x_t.dtype) / QWEN_TIMESTEP_SCALE,
            img_shapes=image_shapes(x_t),
            **kwargs,
        ).sample
        return unpack_latents(output, height, width)

    def guided(self, net: nn.Module, uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
        """QwenImagePipeline's true CFG: the guided prediction rescaled, token by token, to the conditional one's norm
        (over the packed token's channels)."""
        combined = pack_latents(uncond + scale * (cond - uncond))
        norm = pack_latents(cond).norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True)
        return unpack_latents(combined * norm, *cond.shape[-2:])

    def pipeline_timesteps(self, scheduler: SchedulerMixin, num_inference_steps: int) -> dict[str, Any]:
        return FLUX.pipeline_timesteps(scheduler, num_inference_steps)  # QwenImagePipeline's sigmas are FLUX's

    def initialise(self, net: nn.Module) -> nn.Module:
        """Every block starts as the identity: its image and text modulations (shift, scale, gate of the attention
        and of the MLP, `img_mod` / `txt_mod`) zeroed, DiT's adaLN-Zero (Section 3.2) in Qwen-Image's layout."""
        with torch.no_grad():
            for block in net.transformer_blocks:
                for modulation in (block.img_mod[1], block.txt_mod[1]):
                    modulation.weight.zero_()
                    modulation.bias.zero_()
        return net

    def text_width(self, net: nn.Module) -> int:
        return net.config.joint_attention_dim

    def new_conditioning(self, net: nn.Module, settings: ConditioningSettings, data: DataDescription) -> QwenText:
        """A Qwen2 tokenizer learnt from the captions and the template, and a small Qwen2.5-VL as wide as the
        transformer's text stream, trained with it."""
        check_captions(net, data)
        tokenizer = build_qwen2_tokenizer(data.captions(), [QWEN_TEMPLATE])
        width = settings.text_hidden_size or self.text_width(net)
        encoder = qwen_vl_from_scratch(tokenizer, width, settings.text_layers, settings.text_heads)
        return QwenText(tokenizer, encoder, True, settings.max_sequence_length or QWEN_MAX_SEQUENCE_LENGTH)

    def pretrained_conditioning(
        self, pretrained: str, net: nn.Module, settings: ConditioningSettings, key: str
    ) -> QwenText:
        parts = pipeline_parts(pretrained, key)
        check_parts_used(pretrained, parts, set(TEXT_PARTS), net, key, TEXT_PARTS, "a Qwen2.5-VL text encoder")
        return QwenText(
            load_component(Qwen2Tokenizer, pretrained, "tokenizer", key),
            load_component(Qwen2_5_VLForConditionalGeneration, pretrained, "text_encoder", key),
            settings.train_text_encoder,
            settings.max_sequence_length or QWEN_MAX_SEQUENCE_LENGTH,
        )

    def read_folder(
        self, folder: Path, net: nn.Module, metadata: dict[str, Any], load_vae: Callable[[], nn.Module]
    ) -> tuple[nn.Module | None, nn.Module]:
        settings = ConditioningSettings(max_sequence_length=metadata.get("max_sequence_length"))
        return load_vae(), self.pretrained_conditioning(str(folder), net, settings, "the pipeline folder")

    def write(self, parts: PipelineComponents, folder: Path) -> None:
        text = parts.conditioning
        pipeline = QwenImagePipeline(
            scheduler=parts.scheduler,
            vae=parts.vae,
            text_encoder=text.text_encoder,
            tokenizer=text.tokenizer,
            transformer=parts.net,
        )
        pipeline.save_pretrained(folder, safe_serialization=True)


FAMILY = QwenImage()
