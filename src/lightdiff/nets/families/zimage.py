"""Z-Image (`ZImageTransformer2DModel`; Tongyi-MAI 2025, "Z-Image: An Efficient Image Generation Foundation Model
with Single-Stream Diffusion Transformer", arXiv 2511.22699): a single-stream DiT over the caption's and the image's
tokens together (each refined apart first), conditioned on a Qwen3 language model's hidden states, behind FLUX.1's
kind of VAE (`AutoencoderKL` with `shift_factor`). It patchifies the latents itself (2x2 patches) and takes them, and
the captions, as lists of per-sample tensors, so captions of any length share a batch.

Z-Image's own conventions, which `ZImage.output` turns into lightdiff's (the same flow matching as SD3 and FLUX:
x_t = (1 - sigma) x_0 + sigma noise, velocity noise - x_0):
- its time runs the other way: the network takes t = 1 - sigma (ZImagePipeline passes (1000 - timestep) / 1000);
- it predicts x_0 - noise, which the pipeline negates before the scheduler's step.

Text (`ZImageText`, `ZImagePipeline._encode_prompt`): the prompt as the one user message of the tokenizer's chat
template with the generation prompt (thinking on: no empty thinking block), Qwen3's second-to-last hidden states, every
token under the attention mask kept (the template's too: nothing is dropped). A tokenizer built from the captions
carries Qwen3's template for such messages (`nets.text.QWEN3_CHAT_TEMPLATE`).

Guidance: ZImagePipeline combines cond + g (cond - uncond), so its `guidance_scale` g is lightdiff's s - 1 (lightdiff
guides uncond + s (cond - uncond); Z-Image-Turbo's g = 0 is s = 1, unguided). Exported as `ZImagePipeline`; plain
diffusers reproduces lightdiff's samples with `max_sequence_length` = lightdiff.json's and `guidance_scale` = s - 1
(its default unconditional input is the empty prompt, as lightdiff's).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, SchedulerMixin, ZImagePipeline, ZImageTransformer2DModel
from torch import nn
from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3Model

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
    hidden_states_past,
    kwargs_in_dtype,
    prompt_rows,
)
from lightdiff.nets.families.flux import FAMILY as FLUX
from lightdiff.nets.families.sd3 import with_shift_key
from lightdiff.nets.pretrained import check_parts_used, load_component, pipeline_parts
from lightdiff.nets.text import (
    QWEN3_CHAT_TEMPLATE,
    build_qwen2_tokenizer,
    qwen2_tokenizer_for,
    qwen2_tokenizer_state,
    qwen3_config,
)

ZIMAGE_PATCH = 2  # ZImagePipeline calls the transformer with patch_size=2, f_patch_size=1
ZIMAGE_MAX_SEQUENCE_LENGTH = 512  # ZImagePipeline.__call__'s default: template and prompt tokens together
ZIMAGE_DEFAULT_SAMPLE_SIZE = 128  # ZImagePipeline draws 1024 x 1024 by default: 128 latents a side behind an 8x VAE
ZIMAGE_HIDDEN_LAYER = -2  # ZImagePipeline reads Qwen3's second-to-last hidden states
TEXT_PARTS = ("tokenizer", "text_encoder")
# the chat template's text around one user message (generation prompt on): a from-scratch tokenizer learns its words
ZIMAGE_MESSAGE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


def chat_prompts(tokenizer: Qwen2Tokenizer, prompts: Sequence[str]) -> list[str]:
    """Each prompt as ZImagePipeline formats it: the one user message of the chat template, generation prompt on."""
    if not tokenizer.chat_template:
        raise ConfigError("Z-Image formats prompts with its tokenizer's chat template, and this tokenizer has none")
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=True
        )
        for prompt in prompts
    ]


class ZImageText(PromptStates):
    """Z-Image's conditioning: per prompt, Qwen3's second-to-last hidden states over the formatted prompt's tokens
    (`encoder_hidden_states`, zero-padded to `max_sequence_length` rows, so a batch, its unconditional twin and the
    text cache share one length) and which rows are tokens (`encoder_hidden_states_mask`); `ZImage.output` hands the
    transformer only those rows, as the pipeline does. The unconditional twin encodes the negative prompt ("" by
    default). The summary a discriminator projects is the mean of the prompt's states."""

    state_name = "zimage_text"

    def __init__(
        self,
        tokenizer: Qwen2Tokenizer,
        text_encoder: Qwen3Model,
        trainable: bool,  # whether the method trains the encoder (a from-scratch one does)
        max_sequence_length: int,  # tokens per formatted prompt (the pipeline's, 512)
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.requires_grad_(trainable)
        self.trainable = trainable
        self.max_sequence_length = max_sequence_length
        self.summary_dim = text_encoder.config.hidden_size

    def check(self, net: nn.Module, data: DataDescription) -> None:
        check_captions(net, data)
        if net.config.cap_feat_dim != self.summary_dim:
            raise ConfigError(
                f"net.cap_feat_dim={net.config.cap_feat_dim} differs from the Qwen3 encoder's "
                f"hidden_size={self.summary_dim}"
            )

    def cache_fingerprint(self) -> str:
        state = {**qwen2_tokenizer_state(self.tokenizer), "max_sequence_length": self.max_sequence_length}
        return f"qwen3|{module_fingerprint(state, self.text_encoder)}"

    def prompt_lengths(self, prompts: Sequence[str]) -> torch.Tensor:
        """Each formatted prompt's tokens, at most `max_sequence_length`."""
        lengths = [len(self.tokenizer(text).input_ids) for text in chat_prompts(self.tokenizer, prompts)]
        return torch.tensor(lengths).clamp(max=self.max_sequence_length)

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """(B, max_sequence_length, hidden): `_encode_prompt`'s states, zero past each prompt's tokens. The pipeline
        pads every prompt to max_sequence_length; with the tokenizer padding on the right (Qwen's), Qwen3's causal
        attention gives the real tokens the same states at any padding, so only the longest prompt's length is run."""
        padding = "longest" if self.tokenizer.padding_side == "right" else "max_length"
        tokens = self.tokenizer(
            chat_prompts(self.tokenizer, prompts),
            padding=padding,
            max_length=self.max_sequence_length,
            truncation=True,
            return_tensors="pt",
        ).to(self.text_encoder.device)
        mask = tokens.attention_mask.bool()
        hidden = self.text_encoder(input_ids=tokens.input_ids, attention_mask=mask, output_hidden_states=True)
        return hidden_states_past(hidden.hidden_states[ZIMAGE_HIDDEN_LAYER], mask, 0, self.max_sequence_length)

    def forward(self, inputs: Inputs) -> Condition:
        states = self.prompt_states(inputs)
        mask, summary = prompt_rows(states, self.prompt_lengths([str(text) for text in inputs["text"]]))
        return Condition({"encoder_hidden_states": states, "encoder_hidden_states_mask": mask}, summary)

    def tokenizer_state(self) -> dict[str, Any]:
        return qwen2_tokenizer_state(self.tokenizer)

    def tokenizer_from_state(self, state: dict[str, Any]) -> Any:
        return qwen2_tokenizer_for(self.text_encoder, state)


def zimage_text_from_state(state: dict[str, Any]) -> ZImageText:
    text_encoder = Qwen3Model(Qwen3Config(**state["text_encoder_config"])).eval()
    tokenizer = qwen2_tokenizer_for(text_encoder, state["tokenizer"])
    return ZImageText(tokenizer, text_encoder, trainable=False, max_sequence_length=state["max_sequence_length"])


class ZImage(Family):
    name = "zimage"
    denoiser_class = ZImageTransformer2DModel
    takes_text = True
    objectives = ("flow_matching",)  # ZImagePipeline samples with a flow sampler
    conditionings = {"zimage_text": zimage_text_from_state}

    def token_side(self, net: nn.Module) -> int:
        return ZIMAGE_PATCH

    def default_sample_size(self, net: nn.Module) -> int:
        return ZIMAGE_DEFAULT_SAMPLE_SIZE  # rotary positions fit any size: ZImagePipeline's default

    def check(self, net: nn.Module, vae: nn.Module | None, num_frames: int | None) -> None:
        sizes, frames = list(net.config.all_patch_size), list(net.config.all_f_patch_size)
        if (ZIMAGE_PATCH, 1) not in zip(sizes, frames):
            raise ConfigError(
                f"net.all_patch_size={sizes}, net.all_f_patch_size={frames}: ZImagePipeline calls the transformer "
                f"with {ZIMAGE_PATCH}x{ZIMAGE_PATCH} patches of one frame (a pair ({ZIMAGE_PATCH}, 1))"
            )
        if vae is not None and type(vae) is not AutoencoderKL:
            raise ConfigError(
                f"model.vae: ZImagePipeline decodes with an AutoencoderKL (latents / scaling_factor + shift_factor), "
                f"not a {type(vae).__name__}"
            )

    def output(self, net: nn.Module, x_t: torch.Tensor, timesteps: torch.Tensor, condition: Condition) -> torch.Tensor:
        """ZImagePipeline's transformer call: each sample's latents as one frame (C, 1, H, W), the time 1 - sigma,
        each caption's own states (the rows under its mask); its x_0 - noise prediction negated into the velocity."""
        kwargs = kwargs_in_dtype(condition, x_t.dtype)
        states, mask = kwargs["encoder_hidden_states"], kwargs["encoder_hidden_states_mask"]
        output = net(
            list(x_t.unsqueeze(2).unbind(dim=0)),
            (1000 - timesteps.to(x_t.dtype)) / 1000,
            [sample[kept] for sample, kept in zip(states, mask.bool())],
            return_dict=False,
        )[0]
        return -torch.stack(output).squeeze(2).to(x_t.dtype)

    def pipeline_timesteps(self, scheduler: SchedulerMixin, num_inference_steps: int) -> dict[str, Any]:
        return FLUX.pipeline_timesteps(scheduler, num_inference_steps)  # get_default_z_image_sigmas: FLUX's grid

    def blocks(self, net: nn.Module) -> list[nn.Module]:
        return list(net.layers)  # the main single-stream blocks over caption and image tokens

    def initialise(self, net: nn.Module) -> nn.Module:
        """Every modulated block starts as the identity: its adaLN projection (scales of the attention and MLP
        inputs, tanh gates of their outputs) zeroed, DiT's adaLN-Zero (Section 3.2) in Z-Image's layout. The
        caption refiner's blocks have no modulation and train from their random start."""
        with torch.no_grad():
            for block in [*net.noise_refiner, *net.layers]:
                block.adaLN_modulation[0].weight.zero_()
                block.adaLN_modulation[0].bias.zero_()
        return net

    def text_width(self, net: nn.Module) -> int:
        return net.config.cap_feat_dim

    def new_conditioning(self, net: nn.Module, settings: ConditioningSettings, data: DataDescription) -> ZImageText:
        """A Qwen2 tokenizer learnt from the captions and Qwen3's chat template, and a small Qwen3 as wide as the
        transformer's caption input, trained with it."""
        check_captions(net, data)
        tokenizer = build_qwen2_tokenizer(data.captions(), [ZIMAGE_MESSAGE])
        tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
        width = settings.text_hidden_size or self.text_width(net)
        encoder = Qwen3Model(qwen3_config(tokenizer, width, settings.text_layers, settings.text_heads))
        return ZImageText(tokenizer, encoder, True, settings.max_sequence_length or ZIMAGE_MAX_SEQUENCE_LENGTH)

    def pretrained_conditioning(
        self, pretrained: str, net: nn.Module, settings: ConditioningSettings, key: str
    ) -> ZImageText:
        """A Z-Image folder's Qwen3 and tokenizer (its chat template with it)."""
        if settings.edit:
            raise ConfigError(f"model.edit=true: {key}={pretrained!r} is a Z-Image pipeline, which edits no image")
        parts = pipeline_parts(pretrained, key)
        check_parts_used(pretrained, parts, set(TEXT_PARTS), net, key, TEXT_PARTS, "a Qwen3 text encoder")
        encoder = load_component(Qwen3Model, pretrained, "text_encoder", key)
        tokenizer = load_component(Qwen2Tokenizer, pretrained, "tokenizer", key)
        length = settings.max_sequence_length or ZIMAGE_MAX_SEQUENCE_LENGTH
        return ZImageText(tokenizer, encoder, settings.train_text_encoder, length)

    def read_folder(
        self, folder: Path, net: nn.Module, metadata: dict[str, Any], load_vae: Callable[[], nn.Module]
    ) -> tuple[nn.Module | None, nn.Module]:
        settings = ConditioningSettings(max_sequence_length=metadata.get("max_sequence_length"))
        return load_vae(), self.pretrained_conditioning(str(folder), net, settings, "the pipeline folder")

    def write(self, parts: PipelineComponents, folder: Path) -> None:
        text = parts.conditioning
        pipeline = ZImagePipeline(
            scheduler=parts.scheduler,
            vae=with_shift_key(parts.vae),
            text_encoder=text.text_encoder,
            tokenizer=text.tokenizer,
            transformer=parts.net,
        )
        pipeline.save_pretrained(folder, safe_serialization=True)


FAMILY = ZImage()
