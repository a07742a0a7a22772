"""Stable Diffusion 1.x / 2.x (`UNet2DConditionModel`): a UNet cross-attending to one CLIP encoder's last hidden
states (`CLIPText`, `StableDiffusionPipeline.encode_prompt`), exported as `StableDiffusionPipeline`; a latent
consistency student (`model=lcm`: a guidance-scale input `time_cond_proj_dim`, LCMScheduler) as
`LatentConsistencyModelPipeline`, whose `guidance_scale` is the student's input (lightdiff.json keeps the trained
default); a guidance-distilled UNet (`model=guidance_distill`: the same input, a full-step sampler) as
`StableDiffusionPipeline`, which embeds its `guidance_scale` for a UNet with `time_cond_proj_dim` instead of guiding.

A flow-matching UNet keeps the layout, but diffusers' StableDiffusionPipeline calls `scale_model_input`, which
FlowMatchEulerDiscreteScheduler lacks: sample it with lightdiff's sample.py. `CLIPText` and the guidance input
(`GuidanceEmbedded`) serve SDXL and PixArt too.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import (
    LatentConsistencyModelPipeline,
    LCMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from lightdiff.config import ConfigError
from lightdiff.nets.families.base import (
    Condition,
    ConditioningSettings,
    DataDescription,
    Family,
    Inputs,
    PipelineComponents,
    check_captions,
    conditioning_from_state,
    prompts_without_condition,
)
from lightdiff.nets.pretrained import check_parts_used, load_component, pipeline_parts
from lightdiff.nets.text import (
    TEXT_ENCODER_CLASSES,
    build_caption_tokenizer,
    text_encoder_fingerprint,
    text_encoder_from_scratch,
    tokenize_prompts,
    tokenizer_for,
    tokenizer_from_state,
    tokenizer_state,
)
from lightdiff.nets.vae import latent_shift


class CLIPText(nn.Module):
    """A CLIP text encoder's last hidden states as cross-attention keys, padded to the tokenizer's length, no mask:
    `StableDiffusionPipeline.encode_prompt` for a UNet; the same states for PixArt (whose pipeline takes masked T5
    states; lightdiff's CLIP ones attend to every token, as a UNet's cross-attention does)."""

    has_unconditional = True
    reads = ("text",)

    def __init__(
        self,
        tokenizer: CLIPTokenizer,  # a pipeline's, or one built from the captions (nets/text.py)
        text_encoder: CLIPTextModel | CLIPTextModelWithProjection,
        trainable: bool,  # whether the method trains the encoder (a from-scratch one always does)
        network_extras: dict[str, Any] | None = None,  # fixed keyword arguments (PixArt: no size conditioning)
        width_key: str = "net.cross_attention_dim",  # the network's setting the states' width must equal
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.requires_grad_(trainable)
        self.trainable = trainable
        self.network_extras = dict(network_extras or {})
        self.width_key = width_key
        self.summary_dim = text_encoder.config.hidden_size

    def check(self, net: nn.Module, data: DataDescription) -> None:
        check_captions(net, data)
        width, hidden = net.config[self.width_key.removeprefix("net.")], self.text_encoder.config.hidden_size
        if width != hidden:
            raise ConfigError(
                f"{self.width_key}={width} differs from the text encoder's hidden_size={hidden} "
                "(model.text_hidden_size)"
            )

    def train(self, mode: bool = True) -> CLIPText:
        return super().train(mode and self.trainable)  # a frozen encoder stays in inference mode

    def token_ids(self, prompts: Sequence[str]) -> torch.Tensor:
        return tokenize_prompts(self.tokenizer, prompts).to(self.text_encoder.device)

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """The states (B, tokens, width) of `prompts`: what the text cache stores."""
        return self.text_encoder(self.token_ids(prompts))[0]

    @property
    def cacheable(self) -> bool:
        """A frozen encoder's states can be encoded once per caption (data.cache_latents)."""
        return not self.trainable

    def cache_fingerprint(self) -> str:
        return text_encoder_fingerprint(self.tokenizer, self.text_encoder)

    def forward(self, inputs: Inputs) -> Condition:
        captions = [str(text) for text in inputs["text"]]
        token_ids = self.token_ids(captions)
        if "text_states" in inputs:  # data.cache_latents with a frozen encoder: states were encoded once
            empty = self.encode([""])  # what a dropped caption gets
            dropped = torch.tensor([caption == "" for caption in captions], device=empty.device)
            states = torch.where(dropped[:, None, None], empty, inputs["text_states"].to(empty))
        else:
            states = self.text_encoder(token_ids)[0]
        return Condition({"encoder_hidden_states": states, **self.network_extras}, self.pooled(states, token_ids))

    def pooled(self, states: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """The prompt's pooled embedding, the end-of-text token's final state (CLIP's `pooler_output`, which ADD's
        discriminator is conditioned on): picked from the states, so cached states give it too."""
        eos_token_id = self.text_encoder.config.eos_token_id
        # transformers' rule: configs from before eos_token_id was set (id 2) take the highest id, the end token.
        ends = token_ids.argmax(dim=-1) if eos_token_id == 2 else (token_ids == eos_token_id).int().argmax(dim=-1)
        return states[torch.arange(len(states), device=states.device), ends.to(states.device)].float()

    def without_condition(self, inputs: Inputs, which: Sequence[bool], negative_prompt: str = "") -> Inputs:
        return prompts_without_condition(inputs, which, negative_prompt)

    def text_encoders(self) -> dict[str, nn.Module]:
        return {"text_encoder": self.text_encoder}

    def trainable_parameters(self) -> list[nn.Parameter]:
        # all of a from-scratch or unfrozen encoder; its LoRA adapters alone (model.lora.text_encoder)
        return [p for p in self.text_encoder.parameters() if p.requires_grad] if self.trainable else []

    def get_extra_state(self) -> dict[str, Any]:
        """The tokenizer travels in the state dict with the encoder's weights: the two only make sense together, so a
        resumed run takes the checkpoint's instead of the one it built from the captions (`set_extra_state`). Before
        `build_caption_tokenizer` reserved the word-final symbols, a rebuilt tokenizer numbered tokens otherwise in
        every process; and the captions a run starts with may not be the ones its checkpoint was trained on."""
        return {"tokenizer": tokenizer_state(self.tokenizer)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.tokenizer = tokenizer_for(self.text_encoder, state["tokenizer"])

    def state(self) -> dict[str, Any]:
        return {
            "family": "clip_text",
            "text_encoder_class": type(self.text_encoder).__name__,
            "text_encoder_config": self.text_encoder.config.to_dict(),
            "tokenizer": tokenizer_state(self.tokenizer),
            "network_extras": self.network_extras,
            "width_key": self.width_key,
        }


def guidance_scale_embedding(guidance: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of w = guidance_scale - 1, scaled by 1000 (VDM's timestep embedding, Kingma et al. 2021;
    LCM, Section 4.2): (B,) -> (B, dim), as LatentConsistencyModelPipeline's `get_guidance_scale_embedding`."""
    half = dim // 2
    frequencies = torch.exp(torch.arange(half, dtype=torch.float32) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    angles = (guidance.float() * 1000.0)[:, None] * frequencies.to(guidance.device)[None, :]
    embedding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return F.pad(embedding, (0, 1)) if dim % 2 == 1 else embedding


class GuidanceEmbedded(nn.Module):
    """A text family plus LCM's guidance-scale input (`timestep_cond`, Luo et al. 2023, Section 4.2): a student
    distilled from classifier-free guidance at scale w + 1 takes w as an input, so it samples unguided, one network
    call per step, as LatentConsistencyModelPipeline does with its `guidance_scale`. A batch may carry its own
    per-sample scales ("guidance_scale", (B,)), as LCM training draws them; otherwise `guidance_scale` applies."""

    has_unconditional = False  # the guidance is an input: no unconditional twin, no guidance at sampling

    def __init__(
        self,
        text: CLIPText | nn.Module,  # CLIPText, SDXLText: the teacher's text family (its encoders stay frozen)
        guidance_scale: float,  # the scale samples are drawn at (the pipeline's guidance_scale)
        embedding_dim: int,  # the network's time_cond_proj_dim
    ) -> None:
        super().__init__()
        self.text = text
        self.guidance_scale = guidance_scale
        self.embedding_dim = embedding_dim
        self.reads = text.reads
        self.summary_dim = text.summary_dim

    trainable = False  # the teacher's encoders: frozen

    @property
    def text_encoder(self) -> nn.Module:  # what an exporter writes, as for the text family itself
        return self.text.text_encoder

    @property
    def tokenizer(self) -> CLIPTokenizer:
        return self.text.tokenizer

    def text_encoders(self) -> dict[str, nn.Module]:
        return self.text.text_encoders()

    def check(self, net: nn.Module, data: DataDescription) -> None:
        self.text.check(net, data)
        width = getattr(net.config, "time_cond_proj_dim", None)
        if width != self.embedding_dim:
            raise ConfigError(
                f"the network's time_cond_proj_dim={width} differs from the guidance embedding's {self.embedding_dim}"
            )

    def forward(self, inputs: Inputs) -> Condition:
        return self.with_guidance(self.text(inputs), inputs.get("guidance_scale"))

    def with_guidance(self, text: Condition, scales: torch.Tensor | None = None) -> Condition:
        """The text family's `Condition` plus the guidance input: `scales` (B,), or `guidance_scale` for all. A method
        that has the text condition already (LCM's teacher call) adds the input without encoding the prompts again."""
        states = text.kwargs["encoder_hidden_states"]
        if scales is None:
            scales = torch.full((len(states),), self.guidance_scale)
        embedding = guidance_scale_embedding(torch.as_tensor(scales).to(states.device) - 1, self.embedding_dim)
        return Condition({**text.kwargs, "timestep_cond": embedding.to(states.dtype)}, text.summary)

    def without_condition(self, inputs: Inputs, which: Sequence[bool], negative_prompt: str = "") -> Inputs:
        return self.text.without_condition(inputs, which, negative_prompt)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return []

    def pipeline_arguments(self) -> dict[str, Any]:
        return {"guidance_scale": self.guidance_scale}

    def state(self) -> dict[str, Any]:
        return {
            "family": "guidance_embedded",
            "guidance_scale": self.guidance_scale,
            "embedding_dim": self.embedding_dim,
            "text": self.text.state(),
        }


def clip_text_from_state(state: dict[str, Any]) -> CLIPText:
    """`CLIPText` (or a subclass registered under `state["family"]`) rebuilt from its `state()`."""
    encoder_class = TEXT_ENCODER_CLASSES.get(state.get("text_encoder_class", ""))
    if encoder_class is None:  # a class named in a file is only ever looked up
        raise ValueError(
            f"text_encoder_class={state.get('text_encoder_class')!r} is not one of {sorted(TEXT_ENCODER_CLASSES)}"
        )
    tokenizer = tokenizer_from_state(state["tokenizer"])
    text_encoder = encoder_class(CLIPTextConfig(**state["text_encoder_config"])).eval()
    width_key = state.get("width_key", "net.cross_attention_dim")
    return CLIPText(tokenizer, text_encoder, False, state.get("network_extras"), width_key)


def scratch_clip_text(
    settings: ConditioningSettings,
    data: DataDescription,
    width: int,  # the encoder's hidden size the network takes (model.text_hidden_size overrides it)
    encoder_class: type[CLIPTextModel] = CLIPTextModel,
    projection_dim: int | None = None,  # a CLIPTextModelWithProjection's projection width
) -> tuple[CLIPTokenizer, CLIPTextModel]:
    """A tokenizer learnt from the data's captions and a CLIP text encoder built for it (both train)."""
    width = settings.text_hidden_size or width
    tokenizer = build_caption_tokenizer(data.captions(), model_max_length=settings.max_prompt_tokens)
    encoder = text_encoder_from_scratch(
        tokenizer, width, settings.text_layers, settings.text_heads, 2 * width, encoder_class, projection_dim
    )
    return tokenizer, encoder


def read_clip_parts(source: str | Path, encoder_class: type[CLIPTextModel], key: str) -> tuple[CLIPTokenizer, Any]:
    """A pipeline's (or a parts folder's) `tokenizer/` and `text_encoder/`."""
    tokenizer = load_component(CLIPTokenizer, str(source), "tokenizer", key)
    return tokenizer, load_component(encoder_class, str(source), "text_encoder", key)


def read_clip_folder(folder: Path) -> tuple[CLIPTokenizer, CLIPTextModel]:
    """The tokenizer and frozen CLIP encoder of an exported folder whose denoiser cross-attends to one CLIP's states
    (Stable Diffusion's pipeline, PixArt's parts layout), refused naming the part it lacks."""
    for component in ("vae", "text_encoder", "tokenizer"):
        if not (folder / component).is_dir():
            raise ValueError(f"{folder} has a text-conditioned network but no {component}/")
    tokenizer, encoder = read_clip_parts(folder, CLIPTextModel, "the pipeline folder")
    return tokenizer, encoder.eval()


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


def with_lcm_input(net: nn.Module, conditioning: nn.Module, metadata: dict[str, Any]) -> nn.Module:
    """A pipeline folder's text conditioning, wrapped in the guidance input when its UNet has one (an LCM)."""
    width = net.config.get("time_cond_proj_dim")
    if not width:
        return conditioning
    scale = float(metadata.get("guidance_scale") or LCM_PIPELINE_GUIDANCE_SCALE)  # the guidance is an input
    return GuidanceEmbedded(conditioning, scale, width)


LCM_PIPELINE_GUIDANCE_SCALE = 8.5  # LatentConsistencyModelPipeline's default, for LCM folders written elsewhere


def check_no_shift(vae: nn.Module | None) -> None:
    """StableDiffusionPipeline and StableDiffusionXLPipeline decode latents / scaling_factor without a shift."""
    shift = latent_shift(vae) if vae is not None else 0.0
    if shift:  # checked before anything is written
        raise ValueError(
            f"the VAE's shift_factor={shift}: StableDiffusionPipeline and StableDiffusionXLPipeline decode latents / "
            "scaling_factor without a shift, so an export would not reproduce this model; sample it with sample.py"
        )


class StableDiffusion(Family):
    name = "sd"
    denoiser_class = UNet2DConditionModel
    takes_text = True
    single_file = True
    conditionings = {
        "clip_text": clip_text_from_state,
        "guidance_embedded": lambda state: GuidanceEmbedded(
            conditioning_from_state(state["text"]), state["guidance_scale"], state["embedding_dim"]
        ),
    }

    def describes(self, net: nn.Module) -> bool:
        return isinstance(net, UNet2DConditionModel) and net.config.addition_embed_type != "text_time"

    def text_width(self, net: nn.Module) -> int:
        return int(net.config.cross_attention_dim)

    def new_conditioning(self, net: nn.Module, settings: ConditioningSettings, data: DataDescription) -> CLIPText:
        check_captions(net, data)  # before a tokenizer is learnt from them
        tokenizer, encoder = scratch_clip_text(settings, data, self.text_width(net))
        return CLIPText(tokenizer, encoder, trainable=True)

    def pretrained_conditioning(
        self, pretrained: str, net: nn.Module, settings: ConditioningSettings, key: str
    ) -> CLIPText:
        check_parts_used(pretrained, pipeline_parts(pretrained, key), {"tokenizer", "text_encoder"}, net, key)
        tokenizer, encoder = read_clip_parts(pretrained, CLIPTextModel, key)
        return CLIPText(tokenizer, encoder, settings.train_text_encoder)

    def with_guidance_input(
        self, net: nn.Module, conditioning: nn.Module, guidance_scale: float, embedding_dim: int
    ) -> tuple[nn.Module, nn.Module]:
        student = unet_with_guidance_input(net, embedding_dim)
        return student, GuidanceEmbedded(conditioning, guidance_scale, embedding_dim)

    def read_folder(
        self, folder: Path, net: nn.Module, metadata: dict[str, Any], load_vae: Callable[[], nn.Module]
    ) -> tuple[nn.Module | None, nn.Module]:
        tokenizer, encoder = read_clip_folder(folder)
        return load_vae(), with_lcm_input(net, CLIPText(tokenizer, encoder, trainable=False), metadata)

    def write(self, parts: PipelineComponents, folder: Path) -> None:
        check_no_shift(parts.vae)
        text = parts.conditioning.text if isinstance(parts.conditioning, GuidanceEmbedded) else parts.conditioning
        # A latent consistency model (guidance-scale input, LCMScheduler) is diffusers' LatentConsistencyModelPipeline;
        # a guidance-distilled UNet (the same input, a full-step sampler) StableDiffusionPipeline, which feeds it too.
        consistency = isinstance(parts.scheduler, LCMScheduler)
        pipeline_class = LatentConsistencyModelPipeline if consistency else StableDiffusionPipeline
        pipeline = pipeline_class(
            vae=parts.vae,
            text_encoder=text.text_encoder,
            tokenizer=text.tokenizer,
            unet=parts.net,
            scheduler=parts.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipeline.save_pretrained(folder, safe_serialization=True)


FAMILY = StableDiffusion()
