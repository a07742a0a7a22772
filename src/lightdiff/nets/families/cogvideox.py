"""CogVideoX (`CogVideoXTransformer3DModel`; Yang et al. 2024, Section 2.2): an expert transformer over a clip's
latents (B, F, C, H, W) and T5 text states (`T5Text`) in one sequence, behind CogVideoX's 3-D VAE (time compressed
4x); CogVideoX 1.0-5B's 3-D rotary embeddings are made per call from the latents' shape. Exported as
`CogVideoXPipeline` with its T5 `text_encoder` and the video VAE; plain diffusers reproduces lightdiff's clips with
`num_frames`, `height` / `width` and `max_sequence_length` = lightdiff.json's (`max_sequence_length` is the
transformer's text length, so the pipeline's default 226 fits a CogVideoX model trained at its own length only). A
flow-matching one keeps the layout, but CogVideoXPipeline calls `scale_model_input`, which
FlowMatchEulerDiscreteScheduler lacks: sample it with lightdiff's sample.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel
from torch import nn
from transformers import T5Config, T5EncoderModel, T5Tokenizer

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
from lightdiff.nets.pretrained import check_parts_used, load_component, pipeline_parts
from lightdiff.nets.text import (
    build_t5_tokenizer,
    t5_encoder_from_scratch,
    t5_tokenizer_for,
    t5_tokenizer_state,
    tokenize_prompts,
)
from lightdiff.nets.vae import temporal_compression


class T5Text(PromptStates):
    """CogVideoX's conditioning (`CogVideoXPipeline.encode_prompt`): a T5 encoder's last hidden states of the prompt,
    padded to `max_sequence_length` tokens without an attention mask, as `encoder_hidden_states`; the transformer
    joins them to the video tokens in one sequence, so the length is the transformer's `max_text_seq_length` (226).
    The unconditional twin encodes the negative prompt, "" by default, as the pipeline does. The summary a
    discriminator projects is the states' mean over tokens (T5 has no pooled output)."""

    state_name = "t5_text"

    def __init__(
        self,
        tokenizer: T5Tokenizer,
        text_encoder: T5EncoderModel,
        trainable: bool,  # whether the method trains the encoder (a from-scratch one does)
        max_sequence_length: int,  # T5 tokens per prompt (CogVideoXPipeline's max_sequence_length, 226)
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.requires_grad_(trainable)
        self.trainable = trainable
        self.max_sequence_length = max_sequence_length
        self.summary_dim = text_encoder.config.d_model

    def check(self, net: nn.Module, data: DataDescription) -> None:
        check_captions(net, data)
        width = self.text_encoder.config.d_model
        if net.config.text_embed_dim != width:
            raise ConfigError(
                f"net.text_embed_dim={net.config.text_embed_dim} differs from the T5 encoder's d_model={width}"
            )
        # learnt / sin-cos positions cover max_text_seq_length text tokens exactly (CogVideoXPatchEmbed)
        if self.max_sequence_length != net.config.max_text_seq_length:
            raise ConfigError(
                f"model.max_sequence_length={self.max_sequence_length} differs from net.max_text_seq_length="
                f"{net.config.max_text_seq_length}: CogVideoX places exactly that many text tokens before the video's"
            )

    def cache_fingerprint(self) -> str:
        state = {**t5_tokenizer_state(self.tokenizer), "max_sequence_length": self.max_sequence_length}
        return f"t5|{module_fingerprint(state, self.text_encoder)}"

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """(B, max_sequence_length, d_model): CogVideoXPipeline's `_get_t5_prompt_embeds`."""
        ids = tokenize_prompts(self.tokenizer, prompts, self.max_sequence_length).to(self.text_encoder.device)
        return self.text_encoder(ids)[0]

    def forward(self, inputs: Inputs) -> Condition:
        states = self.prompt_states(inputs)
        return Condition({"encoder_hidden_states": states}, states.float().mean(dim=1))

    def tokenizer_state(self) -> dict[str, Any]:
        return t5_tokenizer_state(self.tokenizer)

    def tokenizer_from_state(self, state: dict[str, Any]) -> Any:
        return t5_tokenizer_for(self.text_encoder, state)


def t5_text_from_state(state: dict[str, Any]) -> T5Text:
    text_encoder = T5EncoderModel(T5Config(**state["text_encoder_config"])).eval()
    tokenizer = t5_tokenizer_for(text_encoder, state["tokenizer"])
    return T5Text(tokenizer, text_encoder, trainable=False, max_sequence_length=state["max_sequence_length"])


def rotary_embedding(net: CogVideoXTransformer3DModel, x_t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(cos, sin) of CogVideoX 1.0's 3-D rotary position embedding for latents (B, F, C, H, W): the token grid
    resized into the transformer's trained grid (CogVideoXPipeline._prepare_rotary_positional_embeddings, 1.0 branch;
    CogVideoX 1.5's temporal patches are refused by `CogVideoX.check`)."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    patch = net.config.patch_size
    grid_height, grid_width = x_t.shape[-2] // patch, x_t.shape[-1] // patch
    crops = get_resize_crop_region_for_grid(
        (grid_height, grid_width), net.config.sample_width // patch, net.config.sample_height // patch
    )
    return get_3d_rotary_pos_embed(
        embed_dim=net.config.attention_head_dim,
        crops_coords=crops,
        grid_size=(grid_height, grid_width),
        temporal_size=x_t.shape[1],
        device=x_t.device,
    )


class CogVideoX(Family):
    name = "cogvideox"
    denoiser_class = CogVideoXTransformer3DModel
    video = True
    takes_text = True
    vae_encodes_clips = True
    shapes_vae = "vae_moving_shapes"
    image_tokens_first = True  # its blocks return (video, text)
    conditionings = {"t5_text": t5_text_from_state}

    def output(self, net: nn.Module, x_t: torch.Tensor, timesteps: torch.Tensor, condition: Condition) -> torch.Tensor:
        kwargs = kwargs_in_dtype(condition, x_t.dtype)
        if net.config.use_rotary_positional_embeddings:
            kwargs["image_rotary_emb"] = rotary_embedding(net, x_t)
        return net(x_t, timestep=timesteps, **kwargs).sample

    def default_sample_size(self, net: nn.Module) -> tuple[int, int]:
        return net.config.sample_height, net.config.sample_width  # CogVideoXPipeline's default latent size

    def default_num_frames(self, net: nn.Module) -> int:
        return net.config.sample_frames  # CogVideoXPipeline's default num_frames

    def check(self, net: nn.Module, vae: nn.Module | None, num_frames: int | None) -> None:
        compression = temporal_compression(vae)
        if net.config.temporal_compression_ratio != compression:
            raise ConfigError(
                f"net.temporal_compression_ratio={net.config.temporal_compression_ratio} differs from the VAE's "
                f"temporal_compression_ratio={compression}"
            )
        if net.config.get("patch_size_t") is not None:
            raise ConfigError(
                f"net.patch_size_t={net.config.patch_size_t}: CogVideoX 1.5's temporal patches are not supported"
            )

    def text_width(self, net: nn.Module) -> int:
        return net.config.text_embed_dim  # the T5 states' width

    def new_conditioning(self, net: nn.Module, settings: ConditioningSettings, data: DataDescription) -> T5Text:
        """T5 alone, its length the transformer's text positions."""
        check_captions(net, data)
        width = settings.text_hidden_size or self.text_width(net)
        length = settings.max_sequence_length or net.config.max_text_seq_length
        tokenizer = build_t5_tokenizer(data.captions(), model_max_length=length)
        encoder = t5_encoder_from_scratch(tokenizer, width, settings.text_layers, settings.text_heads, 2 * width)
        return T5Text(tokenizer, encoder, trainable=True, max_sequence_length=length)

    def pretrained_conditioning(
        self, pretrained: str, net: nn.Module, settings: ConditioningSettings, key: str
    ) -> T5Text:
        check_parts_used(pretrained, pipeline_parts(pretrained, key), {"tokenizer", "text_encoder"}, net, key)
        return T5Text(
            load_component(T5Tokenizer, pretrained, "tokenizer", key),
            load_component(T5EncoderModel, pretrained, "text_encoder", key),
            settings.train_text_encoder,
            settings.max_sequence_length or net.config.max_text_seq_length,
        )

    def read_folder(
        self, folder: Path, net: nn.Module, metadata: dict[str, Any], load_vae: Callable[[], nn.Module]
    ) -> tuple[nn.Module | None, nn.Module]:
        settings = ConditioningSettings(max_sequence_length=metadata.get("max_sequence_length"))
        return load_vae(), self.pretrained_conditioning(str(folder), net, settings, "the pipeline folder")

    def write(self, parts: PipelineComponents, folder: Path) -> None:
        text = parts.conditioning
        pipeline = CogVideoXPipeline(
            tokenizer=text.tokenizer,
            text_encoder=text.text_encoder,
            vae=parts.vae,
            transformer=parts.net,
            scheduler=parts.scheduler,
        )
        pipeline.save_pretrained(folder, safe_serialization=True)


FAMILY = CogVideoX()
