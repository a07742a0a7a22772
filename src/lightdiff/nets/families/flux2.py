"""FLUX.2 [klein] (`Flux2Transformer2DModel`; Black Forest Labs 2025/2026, "FLUX.2"): FLUX's double- then
single-stream transformer with modulation shared across blocks, SwiGLU MLPs and 4-axis rotary positions (time, row,
column, token), behind FLUX.2's VAE (`AutoencoderKLFlux2`), conditioned on a Qwen3 language model's hidden states.

Latents: FLUX.2's VAE latents are z cut into 2x2 patches (4 x 32 channels at 1/16 of the side), normalised per channel
by the VAE's BatchNorm statistics (`nets.vae`, `batch_norm_patches`): those are lightdiff's latents, and each latent
pixel is one token (`patch_size` 1), so `Flux2.output` only flattens them. The network takes timestep / 1000 and each
token's (time, row, column, index) id: image tokens (0, row, column, 0), text tokens (0, 0, 0, index).

Text (`Flux2KleinText`, `Flux2KleinPipeline._get_qwen3_prompt_embeds`): the prompt as one user message of the
tokenizer's chat template with thinking off (the empty thinking block appended), padded to `max_sequence_length`, and
the hidden states of three layers of Qwen3 side by side (the pipeline's (9, 18, 27) of Qwen3-4B's and -8B's 36
layers: a quarter, half and three quarters of the way, the rule lightdiff applies to any depth). Every one of the
`max_sequence_length` states reaches the transformer, padding included, as in the pipeline (it passes no mask).

Guidance is plain CFG on the empty prompt (the pipeline's `guidance_scale`, the same number). Exported as
`Flux2KleinPipeline`; plain diffusers reproduces lightdiff's samples with `max_sequence_length` and
`text_encoder_out_layers` = lightdiff.json's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel, SchedulerMixin
from torch import nn
from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3ForCausalLM

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
    ReferenceImages,
    check_captions,
    kwargs_in_dtype,
    prompt_rows,
)
from lightdiff.nets.families.flux import FAMILY as FLUX
from lightdiff.nets.pretrained import check_parts_used, load_component, pipeline_parts
from lightdiff.nets.text import (
    QWEN3_CHAT_TEMPLATE,
    build_qwen2_tokenizer,
    qwen2_tokenizer_for,
    qwen2_tokenizer_state,
    qwen3_config,
)

FLUX2_MAX_SEQUENCE_LENGTH = 512  # Flux2KleinPipeline.__call__'s default
FLUX2_DEFAULT_SAMPLE_SIZE = 64  # Flux2KleinPipeline draws 1024 x 1024 by default: 64 patches a side
FLUX2_TIMESTEP_SCALE = 1000  # the pipeline passes timestep / 1000
TEXT_PARTS = ("tokenizer", "text_encoder")
# the chat template's text around one user message, thinking off: a from-scratch tokenizer learns its words
FLUX2_MESSAGE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def out_layers(num_layers: int) -> tuple[int, int, int]:
    """The hidden states read (indices into Qwen3's `hidden_states`, 0 the embeddings): a quarter, half and three
    quarters of the way through; (9, 18, 27) for Qwen3-4B's and -8B's 36 layers, Flux2KleinPipeline's default."""
    return tuple(max(1, part * num_layers // 4) for part in (1, 2, 3))  # type: ignore[return-value]


class Flux2KleinText(PromptStates):
    """FLUX.2 [klein]'s conditioning: per prompt, `max_sequence_length` rows (padding included) of Qwen3's hidden
    states at `layers`, side by side (`encoder_hidden_states`, 3 x hidden wide). The unconditional twin encodes the
    negative prompt ("" by default, the pipeline's only one). The summary a discriminator projects is the mean of the
    prompt's own rows."""

    state_name = "flux2_klein_text"

    def __init__(
        self,
        tokenizer: Qwen2Tokenizer,
        text_encoder: Qwen3ForCausalLM,
        trainable: bool,  # whether the method trains the encoder (a from-scratch one does)
        max_sequence_length: int,  # rows per prompt (the pipeline's, 512)
        layers: Sequence[int],  # which hidden states (Flux2KleinPipeline's text_encoder_out_layers)
    ) -> None:
        super().__init__()
        depth = text_encoder.config.num_hidden_layers
        if not layers or not all(0 <= layer <= depth for layer in layers):
            raise ConfigError(f"text_encoder_out_layers={list(layers)}: the Qwen3 has hidden states 0..{depth}")
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.requires_grad_(trainable)
        self.trainable = trainable
        self.max_sequence_length = max_sequence_length
        self.layers = tuple(int(layer) for layer in layers)
        self.summary_dim = text_encoder.config.hidden_size * len(self.layers)

    def check(self, net: nn.Module, data: DataDescription) -> None:
        check_captions(net, data)
        if net.config.joint_attention_dim != self.summary_dim:
            raise ConfigError(
                f"net.joint_attention_dim={net.config.joint_attention_dim} differs from {len(self.layers)} x the Qwen3 "
                f"encoder's hidden_size={self.text_encoder.config.hidden_size} (its layers side by side)"
            )

    def cache_fingerprint(self) -> str:
        state = {
            **qwen2_tokenizer_state(self.tokenizer),
            "max_sequence_length": self.max_sequence_length,
            "layers": list(self.layers),
        }
        return f"qwen3_layers|{module_fingerprint(state, self.text_encoder)}"

    def chat(self, prompts: Sequence[str]) -> list[str]:
        if not self.tokenizer.chat_template:
            raise ConfigError("FLUX.2 [klein] formats prompts with its tokenizer's chat template, and it has none")
        return [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=False
            )
            for prompt in prompts
        ]

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """(B, max_sequence_length, layers x hidden): `_get_qwen3_prompt_embeds`."""
        tokens = self.tokenizer(
            self.chat(prompts),
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            return_tensors="pt",
        ).to(self.text_encoder.device)
        hidden = self.text_encoder(
            input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, output_hidden_states=True, use_cache=False
        ).hidden_states
        return torch.cat([hidden[layer] for layer in self.layers], dim=-1)  # the pipeline's stack and reshape

    def forward(self, inputs: Inputs) -> Condition:
        states = self.prompt_states(inputs)
        chats = self.chat([str(text) for text in inputs["text"]])
        _, summary = prompt_rows(states, torch.tensor([len(self.tokenizer(chat).input_ids) for chat in chats]))
        return Condition({"encoder_hidden_states": states}, summary)  # every row reaches the transformer, unmasked

    def pipeline_arguments(self) -> dict[str, Any]:
        return {"max_sequence_length": self.max_sequence_length, "text_encoder_out_layers": list(self.layers)}

    def tokenizer_state(self) -> dict[str, Any]:
        return qwen2_tokenizer_state(self.tokenizer)

    def tokenizer_from_state(self, state: dict[str, Any]) -> Any:
        return qwen2_tokenizer_for(self.text_encoder, state)

    def state(self) -> dict[str, Any]:
        return {**super().state(), "layers": list(self.layers)}


def flux2_klein_text_from_state(state: dict[str, Any]) -> Flux2KleinText:
    text_encoder = Qwen3ForCausalLM(Qwen3Config(**state["text_encoder_config"])).eval()
    tokenizer = qwen2_tokenizer_for(text_encoder, state["tokenizer"])
    return Flux2KleinText(tokenizer, text_encoder, False, state["max_sequence_length"], state["layers"])


class Flux2KleinEdit(ReferenceImages):
    """FLUX.2 [klein] with reference images (`model.edit=true`; Flux2KleinPipeline's `image`): Flux2KleinText's prompt
    (the instruction) and each pair's source(s) through the VAE (`ReferenceImages`): `Flux2.output` makes them tokens
    after the noisy ones, reference k with time id 10 + 10 k (`_prepare_image_ids`). The pipeline's CFG sees them in
    both calls."""

    state_name = "flux2_klein_edit"
    model_name = "FLUX.2"


def flux2_klein_edit_from_state(state: dict[str, Any]) -> Flux2KleinEdit:
    return Flux2KleinEdit(flux2_klein_text_from_state(state["text"]))


REFERENCE_TIME_STEP = 10  # Flux2KleinPipeline._prepare_image_ids: reference k's time id is 10 + 10 k


def token_ids(batch: int, rows: int, columns: int, text_tokens: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(image ids (B, rows x columns, 4), text ids (B, text_tokens, 4)): Flux2KleinPipeline's `_prepare_latent_ids`
    (0, row, column, 0) and `_prepare_text_ids` (0, 0, 0, index)."""
    one = torch.arange(1, device=device)
    text = torch.cartesian_prod(one, one, one, torch.arange(text_tokens, device=device))
    return image_ids(0, rows, columns, device).expand(batch, -1, -1), text.expand(batch, -1, -1)


def image_ids(time: int, rows: int, columns: int, device: torch.device) -> torch.Tensor:
    """(rows x columns, 4): the ids (time, row, column, 0) of an image's tokens."""
    grid = (torch.arange(rows, device=device), torch.arange(columns, device=device))
    return torch.cartesian_prod(
        torch.tensor([time], device=device), *grid, torch.zeros(1, dtype=torch.long, device=device)
    )


class Flux2(Family):
    name = "flux2"
    denoiser_class = Flux2Transformer2DModel
    takes_text = True
    objectives = ("flow_matching",)  # Flux2KleinPipeline samples with a flow sampler
    conditionings = {"flux2_klein_text": flux2_klein_text_from_state, "flux2_klein_edit": flux2_klein_edit_from_state}

    def default_sample_size(self, net: nn.Module) -> int:
        return FLUX2_DEFAULT_SAMPLE_SIZE  # rotary positions fit any size: the pipeline's default

    def check(self, net: nn.Module, vae: nn.Module | None, num_frames: int | None) -> None:
        if net.config.patch_size != 1:
            raise ConfigError(
                f"net.patch_size={net.config.patch_size}: Flux2KleinPipeline feeds one token per latent patch "
                "(patch_size 1; the VAE's 2x2 patches are the latents)"
            )
        if net.config.guidance_embeds:
            raise ConfigError("net.guidance_embeds=true: Flux2KleinPipeline calls the transformer without guidance")
        if vae is not None and type(vae).__name__ != "AutoencoderKLFlux2":
            raise ConfigError(
                f"model.vae: a Flux2Transformer2DModel learns FLUX.2's VAE (AutoencoderKLFlux2), not a "
                f"{type(vae).__name__}: Flux2KleinPipeline could not decode its latents"
            )

    def output(self, net: nn.Module, x_t: torch.Tensor, timesteps: torch.Tensor, condition: Condition) -> torch.Tensor:
        """Flux2KleinPipeline's transformer call: a token per latent pixel, timestep / 1000, the 4-axis ids; reference
        images' tokens after the noisy ones, and only the noisy tokens' output kept."""
        batch, channels, rows, columns = x_t.shape
        kwargs = kwargs_in_dtype(condition, x_t.dtype)
        references = kwargs.pop("reference_latents", None)
        ids, text_ids = token_ids(batch, rows, columns, kwargs["encoder_hidden_states"].shape[1], x_t.device)
        tokens = x_t.reshape(batch, channels, rows * columns).transpose(1, 2)  # the pipeline's _pack_latents
        if references is not None:
            for k, reference in enumerate(references.unbind(dim=1)):
                time = REFERENCE_TIME_STEP * (k + 1)
                tokens = torch.cat([tokens, reference.flatten(2).transpose(1, 2)], dim=1)
                grid = image_ids(time, *reference.shape[-2:], x_t.device).expand(batch, -1, -1)
                ids = torch.cat([ids, grid], dim=1)
        output = net(
            hidden_states=tokens,
            timestep=timesteps.to(x_t.dtype) / FLUX2_TIMESTEP_SCALE,
            img_ids=ids,
            txt_ids=text_ids,
            guidance=None,
            **kwargs,
        ).sample
        return output[:, : rows * columns].transpose(1, 2).reshape(batch, -1, rows, columns)

    def pipeline_timesteps(self, scheduler: SchedulerMixin, num_inference_steps: int) -> dict[str, Any]:
        return FLUX.pipeline_timesteps(scheduler, num_inference_steps)  # Flux2KleinPipeline's sigmas are FLUX's

    def initialise(self, net: nn.Module) -> nn.Module:
        """Every block starts as the identity: the three modulations all blocks share (double-stream image and text,
        single-stream: shift, scale and gate of each sub-block) zeroed, DiT's adaLN-Zero (Section 3.2) in FLUX.2's
        layout."""
        with torch.no_grad():
            for modulation in (
                net.double_stream_modulation_img,
                net.double_stream_modulation_txt,
                net.single_stream_modulation,
            ):
                modulation.linear.weight.zero_()
        return net

    def text_width(self, net: nn.Module) -> int:
        return net.config.joint_attention_dim // 3  # three layers' states side by side

    def new_conditioning(self, net: nn.Module, settings: ConditioningSettings, data: DataDescription) -> Flux2KleinText:
        """A Qwen2 tokenizer learnt from the captions and Qwen3's chat template (thinking off), and a small Qwen3 a
        third as wide as the transformer's text input, trained with it."""
        check_captions(net, data)
        tokenizer = build_qwen2_tokenizer(data.captions(), [FLUX2_MESSAGE])
        tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
        width = settings.text_hidden_size or self.text_width(net)
        encoder = Qwen3ForCausalLM(qwen3_config(tokenizer, width, settings.text_layers, settings.text_heads))
        length = settings.max_sequence_length or FLUX2_MAX_SEQUENCE_LENGTH
        text = Flux2KleinText(tokenizer, encoder, True, length, out_layers(settings.text_layers))
        return Flux2KleinEdit(text) if settings.edit else text

    def pretrained_conditioning(
        self, pretrained: str, net: nn.Module, settings: ConditioningSettings, key: str
    ) -> Flux2KleinText:
        """A FLUX.2 [klein] folder's Qwen3 and tokenizer (its chat template with it); with model.edit=true, read with
        reference images (klein's one pipeline does both)."""
        parts = pipeline_parts(pretrained, key)
        check_parts_used(pretrained, parts, set(TEXT_PARTS), net, key, TEXT_PARTS, "a Qwen3 text encoder")
        encoder = load_component(Qwen3ForCausalLM, pretrained, "text_encoder", key)
        tokenizer = load_component(Qwen2Tokenizer, pretrained, "tokenizer", key)
        length = settings.max_sequence_length or FLUX2_MAX_SEQUENCE_LENGTH
        layers = out_layers(encoder.config.num_hidden_layers)
        text = Flux2KleinText(tokenizer, encoder, settings.train_text_encoder, length, layers)
        return Flux2KleinEdit(text) if settings.edit else text

    def read_folder(
        self, folder: Path, net: nn.Module, metadata: dict[str, Any], load_vae: Callable[[], nn.Module]
    ) -> tuple[nn.Module | None, nn.Module]:
        settings = ConditioningSettings(max_sequence_length=metadata.get("max_sequence_length"))
        text = self.pretrained_conditioning(str(folder), net, settings, "the pipeline folder")
        if metadata.get("text_encoder_out_layers"):  # lightdiff's export says which
            text = Flux2KleinText(
                text.tokenizer, text.text_encoder, False, text.max_sequence_length, metadata["text_encoder_out_layers"]
            )
        return load_vae(), text

    def write(self, parts: PipelineComponents, folder: Path) -> None:
        text = parts.conditioning.text if isinstance(parts.conditioning, Flux2KleinEdit) else parts.conditioning
        pipeline = Flux2KleinPipeline(
            scheduler=parts.scheduler,
            vae=parts.vae,
            text_encoder=text.text_encoder,
            tokenizer=text.tokenizer,
            transformer=parts.net,
        )
        pipeline.save_pretrained(folder, safe_serialization=True)


FAMILY = Flux2()
