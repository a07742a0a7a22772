"""FLUX.1 (`FluxTransformer2DModel`): double-stream (MMDiT) then single-stream blocks with rotary position embeddings
of each token's (0, row, column) id. It takes latents packed into 2x2 patches, as a token sequence, and its timestep
/ 1000 (`FluxPipeline`): `Flux.output` packs, makes the ids and unpacks, so every method sees (B, C, H, W) latents.
Text: a CLIP pooled vector and T5 states (`FluxText`). Exported as `FluxPipeline` with its CLIP `text_encoder` and
T5 `text_encoder_2`; plain diffusers reproduces lightdiff's samples with `max_sequence_length` = lightdiff.json's,
and, for a transformer without the guidance embedding, lightdiff's `guidance_scale` as `true_cfg_scale` with
`negative_prompt=""` (its `guidance_scale` is the embedded input of a guidance-distilled transformer, and
lightdiff's then too).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxKontextPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
    SchedulerMixin,
)
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

from lightdiff.config import ConfigError
from lightdiff.files import module_fingerprint
from lightdiff.nets.families.base import (
    Condition,
    ConditioningSettings,
    DataDescription,
    Family,
    Inputs,
    PipelineComponents,
    ReferenceImages,
    check_captions,
    encoder_parameters,
    kwargs_in_dtype,
    pack_pooled,
    prompts_without_condition,
    unpack_pooled,
)
from lightdiff.nets.families.sd import scratch_clip_text
from lightdiff.nets.families.sd3 import SCRATCH_MAX_SEQUENCE_LENGTH, with_shift_key
from lightdiff.nets.pretrained import check_parts_used, load_component, pipeline_config_class, pipeline_parts
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

FLUX_MAX_SEQUENCE_LENGTH = 512  # FluxPipeline refuses longer T5 sequences
FLUX_PIPELINE_GUIDANCE_SCALE = 3.5  # FluxPipeline's default `guidance_scale` (a guidance-embedding transformer's input)
FLUX_DEFAULT_SAMPLE_SIZE = 128  # FluxPipeline.default_sample_size: latents a side when no size is given
PACKED_PATCH = 2  # FLUX packs 2x2 latent pixels into one token (FluxPipeline._pack_latents)
FLUX_TIMESTEP_SCALE = 1000  # FluxPipeline passes timestep / 1000; the transformer multiplies by 1000 again
FLUX_GUIDANCE_KEYS = ["guidance_embedder.linear_1", "guidance_embedder.linear_2"]
TEXT_PARTS = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): each 2x2 patch one token, row-major (FluxPipeline._pack_latents)."""
    batch, channels, height, width = latents.shape
    patches = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack_latents` for latents of `height` x `width` (FluxPipeline._unpack_latents)."""
    batch, _, packed = tokens.shape
    patches = tokens.view(batch, height // 2, width // 2, packed // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(batch, packed // 4, height, width)


def latent_image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(H/2 * W/2, 3): each packed token's (0, row, column), the positions FLUX's rotary embedding encodes
    (FluxPipeline._prepare_latent_image_ids); text tokens all have (0, 0, 0)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(height // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxText(nn.Module):
    """FLUX's conditioning (`FluxPipeline.encode_prompt`): a CLIPTextModel's pooled output as `pooled_projections`
    (the modulation) and a T5 encoder's last hidden states, padded to `max_sequence_length` tokens, as the
    joint-attention text stream (`encoder_hidden_states`); with a transformer that embeds the guidance scale
    (`guidance_embeds`, FLUX.1-dev's guidance distillation), that scale as `guidance`. Text position ids (zeros) and
    image ones (the latent grid) are made per call by `Flux.output`, from the shapes.

    The unconditional twin encodes the negative prompt, "" by default: FluxPipeline's true classifier-free guidance
    (`true_cfg_scale` with `negative_prompt`) encodes it the same way."""

    has_unconditional = True
    reads = ("text",)

    def __init__(
        self,
        tokenizer: CLIPTokenizer,
        text_encoder: CLIPTextModel,  # FLUX's CLIP ViT-L: its pooled output only
        tokenizer_2: T5Tokenizer,
        text_encoder_2: T5EncoderModel,  # FLUX's T5-XXL encoder: the token states
        trainable: bool,  # whether the method trains the encoders (from-scratch ones do)
        max_sequence_length: int,  # T5 tokens per prompt (FluxPipeline's max_sequence_length: 512 for dev, 256 schnell)
        guidance_scale: float | None = None,  # the `guidance` input of a guidance-embedding transformer; None: none
    ) -> None:
        super().__init__()
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.text_encoder = text_encoder.requires_grad_(trainable)
        self.text_encoder_2 = text_encoder_2.requires_grad_(trainable)
        self.trainable = trainable
        self.max_sequence_length = max_sequence_length
        self.guidance_scale = guidance_scale
        self.summary_dim = text_encoder.config.hidden_size

    def check(self, net: nn.Module, data: DataDescription) -> None:
        check_captions(net, data)
        pooled, states = self.text_encoder.config.hidden_size, self.text_encoder_2.config.d_model
        if net.config.pooled_projection_dim != pooled:
            raise ConfigError(
                f"net.pooled_projection_dim={net.config.pooled_projection_dim} differs from the CLIP encoder's "
                f"hidden_size={pooled} (model.text_hidden_size)"
            )
        if net.config.joint_attention_dim != states:
            raise ConfigError(
                f"net.joint_attention_dim={net.config.joint_attention_dim} differs from the T5 encoder's "
                f"d_model={states}"
            )
        if net.config.guidance_embeds and self.guidance_scale is None:
            raise ConfigError("net.guidance_embeds=true: set model.embedded_guidance_scale (the scale it is fed)")
        if not 1 <= self.max_sequence_length <= FLUX_MAX_SEQUENCE_LENGTH:
            raise ConfigError(
                f"model.max_sequence_length={self.max_sequence_length} must be in 1..{FLUX_MAX_SEQUENCE_LENGTH} "
                "(FluxPipeline's limit)"
            )

    def train(self, mode: bool = True) -> FluxText:
        return super().train(mode and self.trainable)

    def encoded(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(T5 states (B, max_sequence_length, d_model), CLIP pooled (B, hidden)) of `prompts`, as FluxPipeline's
        `_get_t5_prompt_embeds` and `_get_clip_prompt_embeds` make them."""
        clip_ids = tokenize_prompts(self.tokenizer, prompts).to(self.text_encoder.device)
        pooled = self.text_encoder(clip_ids, output_hidden_states=False).pooler_output
        t5_ids = tokenize_prompts(self.tokenizer_2, prompts, self.max_sequence_length).to(self.text_encoder_2.device)
        return self.text_encoder_2(t5_ids, output_hidden_states=False)[0], pooled

    @property
    def cacheable(self) -> bool:
        """Frozen encoders' outputs can be cached, the pooled vector packed as one more row (`encode`)."""
        return not self.trainable and self.summary_dim <= self.text_encoder_2.config.d_model

    def cache_fingerprint(self) -> str:
        first = text_encoder_fingerprint(self.tokenizer, self.text_encoder)
        second = module_fingerprint(
            {**t5_tokenizer_state(self.tokenizer_2), "max_sequence_length": self.max_sequence_length},
            self.text_encoder_2,
        )
        return f"flux|{first}|{second}"

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """What the text cache stores: the T5 states with the pooled vector, zero-padded, as one more row
        (B, max_sequence_length + 1, d_model); `forward` unpacks it."""
        states, pooled = self.encoded(prompts)
        return pack_pooled(states, pooled)

    def forward(self, inputs: Inputs) -> Condition:
        captions = [str(text) for text in inputs["text"]]
        if "text_states" in inputs:  # data.cache_latents: packed by `encode`; a dropped caption is encoded as ""
            packed = inputs["text_states"].to(self.text_encoder_2.device, self.text_encoder_2.dtype)
            dropped = torch.tensor([caption == "" for caption in captions], device=packed.device)
            if dropped.any():  # the encoders run only for them
                packed = torch.where(dropped[:, None, None], self.encode([""]).to(packed), packed)
            states, pooled = unpack_pooled(packed, self.summary_dim)
        else:
            states, pooled = self.encoded(captions)
        text = Condition({"encoder_hidden_states": states, "pooled_projections": pooled}, pooled.float())
        return text if self.guidance_scale is None else self.with_guidance(text, inputs.get("guidance_scale"))

    def with_guidance(self, text: Condition, scales: torch.Tensor | None = None) -> Condition:
        """The text condition plus the `guidance` input: `scales` (B,), or `guidance_scale` for all, in float32 as
        FluxPipeline passes it (torch.full([1], guidance_scale).expand(B)); as `GuidanceEmbedded.with_guidance`."""
        states = text.kwargs["encoder_hidden_states"]
        if scales is None:
            if self.guidance_scale is None:
                raise ValueError("this FLUX transformer has no guidance embedding (net.guidance_embeds=false)")
            scales = torch.full((len(states),), self.guidance_scale)
        guidance = torch.as_tensor(scales, dtype=torch.float32).to(states.device)
        return Condition({**text.kwargs, "guidance": guidance}, text.summary)

    def without_condition(self, inputs: Inputs, which: Sequence[bool], negative_prompt: str = "") -> Inputs:
        return prompts_without_condition(inputs, which, negative_prompt)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return encoder_parameters(self.trainable, self.text_encoder, self.text_encoder_2)

    def text_encoders(self) -> dict[str, nn.Module]:
        return {"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}

    def get_extra_state(self) -> dict[str, Any]:  # both tokenizers travel with the weights (see CLIPText's)
        return {"tokenizer": tokenizer_state(self.tokenizer), "tokenizer_2": t5_tokenizer_state(self.tokenizer_2)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        tokenizer = tokenizer_for(self.text_encoder, state["tokenizer"])  # both checked before either is replaced
        self.tokenizer, self.tokenizer_2 = tokenizer, t5_tokenizer_for(self.text_encoder_2, state["tokenizer_2"])

    def pipeline_arguments(self) -> dict[str, Any]:
        return {"max_sequence_length": self.max_sequence_length, "guidance_scale": self.guidance_scale}

    def state(self) -> dict[str, Any]:
        return {
            "family": "flux_text",
            "text_encoder_config": self.text_encoder.config.to_dict(),
            "text_encoder_2_config": self.text_encoder_2.config.to_dict(),
            "tokenizer": tokenizer_state(self.tokenizer),
            "tokenizer_2": t5_tokenizer_state(self.tokenizer_2),
            "max_sequence_length": self.max_sequence_length,
            "guidance_scale": self.guidance_scale,
        }


def flux_text_from_state(state: dict[str, Any]) -> FluxText:
    text_encoder_2 = T5EncoderModel(T5Config(**state["text_encoder_2_config"])).eval()
    return FluxText(
        tokenizer_from_state(state["tokenizer"]),
        CLIPTextModel(CLIPTextConfig(**state["text_encoder_config"])).eval(),
        t5_tokenizer_for(text_encoder_2, state["tokenizer_2"]),
        text_encoder_2,
        trainable=False,
        max_sequence_length=state["max_sequence_length"],
        guidance_scale=state["guidance_scale"],
    )


class FluxKontextText(ReferenceImages):
    """FLUX.1 Kontext's conditioning (`FluxKontextPipeline`, Black Forest Labs 2025, arXiv 2506.15742): FluxText's
    prompt (the instruction), and the source image it edits through the VAE as one reference (`ReferenceImages`):
    `Flux.output` packs it into tokens after the noisy ones, with position ids whose first coordinate is 1. The
    pipeline's true CFG guides the text alone."""

    state_name = "flux_kontext"
    model_name = "FLUX.1 Kontext"
    max_references = 1


def flux_kontext_from_state(state: dict[str, Any]) -> FluxKontextText:
    return FluxKontextText(flux_text_from_state(state["text"]))


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


class Flux(Family):
    name = "flux"
    denoiser_class = FluxTransformer2DModel
    takes_text = True
    conditionings = {"flux_text": flux_text_from_state, "flux_kontext": flux_kontext_from_state}

    def latent_channels(self, net: nn.Module) -> int:
        return net.config.in_channels // (PACKED_PATCH * PACKED_PATCH)  # a token holds 2x2 latent pixels

    def output_channels(self, net: nn.Module) -> int:
        return int(net.config.in_channels)  # packed tokens (out_channels None: in_channels)

    def token_side(self, net: nn.Module) -> int:
        return PACKED_PATCH * int(net.config.get("patch_size") or 1)

    def side_multiple(self, net: nn.Module) -> int:
        return self.token_side(net)

    def default_sample_size(self, net: nn.Module) -> int:
        return FLUX_DEFAULT_SAMPLE_SIZE  # rotary positions fit any size: FluxPipeline's default

    def output(self, net: nn.Module, x_t: torch.Tensor, timesteps: torch.Tensor, condition: Condition) -> torch.Tensor:
        """FluxPipeline's transformer call: packed latents, timestep / 1000 in the latents' dtype, guidance in
        float32 (as FluxText gives it), text ids zeros and image ids the latent grid; the output unpacked."""
        height, width = x_t.shape[-2:]
        if height % PACKED_PATCH or width % PACKED_PATCH:
            raise ValueError(f"FLUX packs 2x2 latent patches: latents of {height}x{width} have an odd side")
        kwargs = kwargs_in_dtype(condition, x_t.dtype)
        states = kwargs["encoder_hidden_states"]
        tokens, ids = pack_latents(x_t), latent_image_ids(height, width, x_t.device, x_t.dtype)
        references = kwargs.get("reference_latents")
        if references is not None:  # FLUX.1 Kontext: the source's tokens follow, their ids' first coordinate 1
            reference = references[:, 0]  # its one reference (FluxKontextText.max_references)
            reference_ids = latent_image_ids(*reference.shape[-2:], x_t.device, x_t.dtype)
            reference_ids[:, 0] = 1
            tokens = torch.cat([tokens, pack_latents(reference)], dim=1)
            ids = torch.cat([ids, reference_ids])
        output = net(
            tokens,
            encoder_hidden_states=states,
            pooled_projections=kwargs["pooled_projections"],
            timestep=timesteps.to(x_t.dtype) / FLUX_TIMESTEP_SCALE,
            img_ids=ids,
            txt_ids=torch.zeros(states.shape[1], 3, device=x_t.device, dtype=states.dtype),
            guidance=condition.kwargs.get("guidance"),
        ).sample
        return unpack_latents(output[:, : (height // 2) * (width // 2)], height, width)

    def pipeline_timesteps(self, scheduler: SchedulerMixin, num_inference_steps: int) -> dict[str, Any]:
        """FluxPipeline's own sigmas, linspace(1, 1 / N, N) (FlowMatchEulerDiscreteScheduler's default grid ends at
        1 / num_train_timesteps instead)."""
        if isinstance(scheduler, FlowMatchEulerDiscreteScheduler) and not scheduler.config.get("use_flow_sigmas"):
            return {"sigmas": np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)}
        return {}

    def text_width(self, net: nn.Module) -> int:
        return net.config.pooled_projection_dim  # CLIP's pooled output (the T5 states are joint_attention_dim wide)

    def new_conditioning(self, net: nn.Module, settings: ConditioningSettings, data: DataDescription) -> FluxText:
        """A CLIP for the pooled vector and a T5 as wide as the joint-attention text stream, both from the captions."""
        check_captions(net, data)
        tokenizer, clip = scratch_clip_text(settings, data, self.text_width(net))
        length = settings.max_sequence_length or SCRATCH_MAX_SEQUENCE_LENGTH
        t5_tokenizer = build_t5_tokenizer(data.captions(), model_max_length=length)
        width = net.config.joint_attention_dim
        t5 = t5_encoder_from_scratch(t5_tokenizer, width, settings.text_layers, settings.text_heads, 2 * width)
        guidance = settings.embedded_guidance_scale if net.config.guidance_embeds else None
        text = FluxText(tokenizer, clip, t5_tokenizer, t5, True, length, guidance)
        return FluxKontextText(text) if settings.edit else text

    def pretrained_conditioning(
        self, pretrained: str, net: nn.Module, settings: ConditioningSettings, key: str
    ) -> FluxText:
        parts = pipeline_parts(pretrained, key)
        check_parts_used(pretrained, parts, set(TEXT_PARTS), net, key, TEXT_PARTS, "a CLIP and a T5 encoder")
        text = FluxText(
            load_component(CLIPTokenizer, pretrained, "tokenizer", key),
            load_component(CLIPTextModel, pretrained, "text_encoder", key),
            load_component(T5Tokenizer, pretrained, "tokenizer_2", key),
            load_component(T5EncoderModel, pretrained, "text_encoder_2", key),
            settings.train_text_encoder,
            settings.max_sequence_length or FLUX_MAX_SEQUENCE_LENGTH,
            settings.embedded_guidance_scale if net.config.guidance_embeds else None,
        )
        return FluxKontextText(text) if settings.edit else text

    def with_guidance_input(
        self, net: nn.Module, conditioning: nn.Module, guidance_scale: float, embedding_dim: int
    ) -> tuple[nn.Module, nn.Module]:
        if not isinstance(conditioning, FluxText):
            return super().with_guidance_input(net, conditioning, guidance_scale, embedding_dim)
        family = FluxText(
            conditioning.tokenizer,
            conditioning.text_encoder,
            conditioning.tokenizer_2,
            conditioning.text_encoder_2,
            False,
            conditioning.max_sequence_length,
            guidance_scale,
        )
        return flux_with_guidance_input(net), family

    def read_folder(
        self, folder: Path, net: nn.Module, metadata: dict[str, Any], load_vae: Callable[[], nn.Module]
    ) -> tuple[nn.Module | None, nn.Module]:
        # lightdiff's export records what it trained with; FluxPipeline's defaults otherwise
        settings = ConditioningSettings(
            max_sequence_length=metadata.get("max_sequence_length"),
            embedded_guidance_scale=float(metadata.get("guidance_scale") or FLUX_PIPELINE_GUIDANCE_SCALE),
            edit=pipeline_config_class(str(folder), "the pipeline folder") == "FluxKontextPipeline",
        )
        vae = load_vae()
        conditioning = self.pretrained_conditioning(str(folder), net, settings, "the pipeline folder")
        if isinstance(conditioning, FluxKontextText):
            conditioning.attach_vae(vae)
        return vae, conditioning

    def write(self, parts: PipelineComponents, folder: Path) -> None:
        edits = isinstance(parts.conditioning, FluxKontextText)
        text = parts.conditioning.text if edits else parts.conditioning
        pipeline = (FluxKontextPipeline if edits else FluxPipeline)(
            scheduler=parts.scheduler,
            vae=with_shift_key(parts.vae),
            text_encoder=text.text_encoder,
            tokenizer=text.tokenizer,
            text_encoder_2=text.text_encoder_2,
            tokenizer_2=text.tokenizer_2,
            transformer=parts.net,
        )
        pipeline.save_pretrained(folder, safe_serialization=True)


FAMILY = Flux()
