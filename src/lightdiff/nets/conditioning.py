"""Conditioning families: one object per family turns a batch's labels or prompts into the network's keyword
arguments, and into their unconditional twin for guidance.

Training, guided sampling, the turbo teacher, the discriminator, the text cache and the exporter all go through the
same object, so a new family (SDXL's two encoders and size / crop ids, FLUX's CLIP + T5 and position ids) is a new
class here (plus a net preset and an export writer), with no edits across methods. diffusers' SDXL training script
builds `encoder_hidden_states`, `text_embeds` and `time_ids` in three helpers every call site must remember; here a
`Condition` carries all of a family's inputs at once.

The families:
- `NoCondition`: unconditional networks (`UNet2DModel` without class embeddings);
- `ClassLabels`: `class_labels` (a class-conditional `UNet2DModel`, a `DiTTransformer2DModel`);
- `CLIPText`: one CLIP encoder's last hidden states as cross-attention keys, as `StableDiffusionPipeline` makes them
  (`UNet2DConditionModel`; `PixArtTransformer2DModel`, with no size conditioning);
- `SD3CLIPText`: SD3's joint-attention text stream and pooled vector made from one CLIP encoder standing in for
  SD3's two (`SD3Transformer2DModel`; see the class);
- `SD3Text`: SD3's three encoders (CLIP-L, CLIP-G, T5) as StableDiffusion3Pipeline uses them, or one CLIP standing in
  for both plus a T5 (`model.t5`);
- `FluxText`: FLUX's CLIP pooled vector and T5 states (`FluxTransformer2DModel`);
- `T5Text`: one T5 encoder's states, CogVideoX's text (`CogVideoXTransformer3DModel`);
- `FirstFrame`: Stable Video Diffusion's image conditioning (`UNetSpatioTemporalConditionModel`): the first frame's CLIP
  image embedding, its VAE latent concatenated to the noisy latents, and the fps / motion / noise-augmentation ids;
- `SDXLText`: SDXL's two CLIP encoders (penultimate states side by side, the second's pooled projection) and the
  size / crop ids of each image (`UNet2DConditionModel` with `addition_embed_type="text_time"`);
- `GuidanceEmbedded`: a text family plus the guidance-scale input of a latent consistency model (`model=lcm`).

What a family is given (`inputs`) is a batch as the data modules serve it, or as the samplers make it: a mapping
with "label" (a (B,) tensor), "text" (B captions), "size_and_crop" (B, 6), "image" (B, 3, H, W) and the samplers'
per-sample "generators", of which each family reads what it needs.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from diffusers import (
    CogVideoXTransformer3DModel,
    DiTTransformer2DModel,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
    UNetSpatioTemporalConditionModel,
)
from diffusers.utils.torch_utils import randn_tensor
from torch import nn
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from lightdiff.config import ConfigError
from lightdiff.files import module_fingerprint
from lightdiff.nets.text import (
    EOS,
    build_t5_tokenizer,
    t5_encoder_from_scratch,
    t5_tokenizer_from_vocab,
    text_encoder_from_scratch,
    tokenize_prompts,
)

log = logging.getLogger(__name__)


class DataDescription(Protocol):
    """What a family may ask of the data set it trains on (`lightdiff.data.ImageDataModule` has it)."""

    @property
    def num_classes(self) -> int: ...

    def captions(self) -> list[str]: ...


Inputs = Mapping[str, Any]  # {"label": (B,) tensor, "text": B captions, ...}: what a family reads its condition from
# Each image's (original height, original width, crop top, crop left, target height, target width) in pixels: the data
# sets record the size an image had and the crop taken of it (after resizing), as SDXL's training conditions on them
# (Podell et al. 2023, Sections 2.2-2.3); a sampler asks for an uncropped image of the size it draws.
SIZE_AND_CROP = "size_and_crop"
FLUX_MAX_SEQUENCE_LENGTH = 512  # FluxPipeline refuses longer T5 sequences
SCRATCH_MAX_SEQUENCE_LENGTH = 16  # T5 tokens per prompt of a T5 built from the captions (short shape captions)
# Which samples' text is zeroed rather than encoded (B bools): SDXL's empty negative prompt (`without_condition`).
ZEROED_TEXT = "zeroed_text"


def size_and_crop(
    height: int,  # target height in pixels
    width: int,  # target width in pixels
    count: int,  # batch size
    original_size: Sequence[int] | None = None,  # (height, width) the image claims to come from; None: the target
    crop_top_left: Sequence[int] = (0, 0),  # where its crop began
) -> torch.Tensor:
    """(count, 6) size and crop records, as StableDiffusionXLPipeline's `_get_add_time_ids` builds them."""
    original = tuple(original_size) if original_size is not None else (height, width)
    record = torch.tensor([*original, *crop_top_left, height, width], dtype=torch.long)
    if record.shape != (6,):
        raise ValueError(f"original_size={original_size} and crop_top_left={crop_top_left} must be two numbers each")
    return record.expand(count, 6).clone()


def tree_map(function: Callable[[torch.Tensor], torch.Tensor], tree: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        return function(tree)
    if isinstance(tree, dict):
        return {key: tree_map(function, value) for key, value in tree.items()}
    return tree  # None, numbers, strings: the same for every sample


def _tree_cat(first: Any, second: Any) -> Any:
    if isinstance(first, torch.Tensor):
        return torch.cat([first, second])
    if isinstance(first, dict):
        return {key: _tree_cat(first[key], second[key]) for key in first}
    return first


@dataclass
class Condition:
    """One batch's condition, as the network and the discriminator take it."""

    kwargs: dict[str, Any] = field(default_factory=dict)  # the network's keyword arguments (tensors (B, ...), dicts)
    summary: torch.Tensor | None = None  # (B, D): one vector per sample, projected by the discriminator's heads

    def cat(self, other: Condition) -> Condition:
        """This batch followed by `other` (classifier-free guidance runs both halves in one network call)."""
        summary = None if self.summary is None else torch.cat([self.summary, other.summary])
        return Condition(_tree_cat(self.kwargs, other.kwargs), summary)

    def to(self, device: torch.device | str) -> Condition:
        summary = None if self.summary is None else self.summary.to(device)
        return Condition(tree_map(lambda tensor: tensor.to(device), self.kwargs), summary)


@runtime_checkable
class Conditioning(Protocol):
    """What every family offers; families are `nn.Module`s so that an encoder that trains is part of the method."""

    summary_dim: int  # width of `Condition.summary`; 0: the family gives none (the discriminator is unconditional)
    has_unconditional: bool  # whether `without_condition` exists: needed by caption dropping and guidance
    reads: tuple[str, ...]  # the keys of `inputs` it reads ("label", "text"): what a sampler must give it

    def check(self, net: nn.Module, data: DataDescription) -> None:
        """A ConfigError naming the key where the family, `net` and the data set do not fit together."""
        ...

    def __call__(self, inputs: Inputs) -> Condition:
        """The network's keyword arguments for a batch."""
        ...

    def without_condition(self, inputs: Inputs, which: Sequence[bool], negative_prompt: str = "") -> Inputs:
        """`inputs` with the samples marked in `which` made unconditional (the negative prompt where there is one)."""
        ...

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the method's optimiser trains of this family (a from-scratch text encoder), else nothing."""
        ...

    def state(self) -> dict[str, Any]:
        """Plain data that rebuilds the family with `conditioning_from_state` (weights apart, under `conditioning.`)."""
        ...


@runtime_checkable
class CacheableText(Protocol):
    """A family whose whole condition is one text state per caption, encoded by a frozen encoder: what
    `data.cache_latents` can store once per distinct caption (lightdiff.data.latent_cache)."""

    cacheable: bool  # False while the encoder trains (or where the family takes more than the states)

    def cache_fingerprint(self) -> str:
        """A hash of the tokenizer and the encoder: the text cache's key."""
        ...

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """The states (B, tokens, width) the cache stores for `prompts`."""
        ...


def check_captions(net: nn.Module, data: DataDescription) -> None:
    """A text family trains on captions: a data set without any is a ConfigError naming the net."""
    if not data.captions():
        raise ConfigError(f"net: {type(net).__name__} is text-conditioned and the data set has no captions")


def pack_pooled(states: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """States (B, tokens, width) with the pooled vector (B, <= width) zero-padded as one more row: what a family with
    pooled text stores in the text cache, one tensor per caption (`unpack_pooled` undoes it)."""
    return torch.cat([states, F.pad(pooled, (0, states.shape[-1] - pooled.shape[-1]))[:, None]], dim=1)


def unpack_pooled(packed: torch.Tensor, pooled_width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(states, pooled) of `pack_pooled`'s output."""
    return packed[:, :-1], packed[:, -1, :pooled_width]


def encoder_parameters(trainable: bool, *encoders: nn.Module | None) -> list[nn.Parameter]:
    """What a text family's optimiser trains: its encoders' trainable parameters, or nothing when frozen."""
    if not trainable:
        return []
    return [p for encoder in encoders if encoder is not None for p in encoder.parameters() if p.requires_grad]


def drop_conditions(
    conditioning: Conditioning, inputs: Inputs, probability: float, size: int
) -> tuple[Inputs, torch.Tensor]:
    """Each of the batch's `size` samples made unconditional with `probability`: one network then learns p(x | c) and
    p(x), which classifier-free guidance combines (Ho & Salimans 2022, Section 3.2). Python's RNG, seeded by
    seed_everything. Returns the inputs and which samples were dropped (B,)."""
    if probability == 0:
        return inputs, torch.zeros(size, dtype=torch.bool)
    which = [random.random() < probability for _ in range(size)]
    return conditioning.without_condition(inputs, which), torch.tensor(which)


class NoCondition(nn.Module):
    """An unconditional network: no keyword arguments."""

    summary_dim = 0
    has_unconditional = True
    reads = ()

    def check(self, net: nn.Module, data: DataDescription) -> None:
        pass

    def forward(self, inputs: Inputs) -> Condition:
        return Condition()

    def without_condition(self, inputs: Inputs, which: Sequence[bool], negative_prompt: str = "") -> Inputs:
        return inputs

    def trainable_parameters(self) -> list[nn.Parameter]:
        return []

    def state(self) -> dict[str, Any]:
        return {"family": "none"}


class ClassLabels(nn.Module):
    """`class_labels` of a class-conditional network; the discriminator sees the label one-hot."""

    has_unconditional = False  # a DiT drops labels to its null class itself while training (diffusers' embedding)
    reads = ("label",)

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.summary_dim = num_classes

    def check(self, net: nn.Module, data: DataDescription) -> None:
        key = "net.num_embeds_ada_norm" if isinstance(net, DiTTransformer2DModel) else "net.num_class_embeds"
        if data.num_classes == 0:
            raise ConfigError(f"{key} is set but the data set has no labels; set it to null (a DiT needs labels)")
        if data.num_classes > self.num_classes:
            raise ConfigError(f"{key}={self.num_classes} is below the data set's {data.num_classes} classes")

    def forward(self, inputs: Inputs) -> Condition:
        labels = inputs.get("label")
        if labels is None:
            raise ValueError("this model is class-conditional: give labels to sample")
        labels = torch.as_tensor(labels).long()
        return Condition({"class_labels": labels}, F.one_hot(labels, self.num_classes).float())

    def without_condition(self, inputs: Inputs, which: Sequence[bool], negative_prompt: str = "") -> Inputs:
        raise ValueError("a class-conditional network has no unconditional input here (no guidance, no dropping)")

    def trainable_parameters(self) -> list[nn.Parameter]:
        return []

    def state(self) -> dict[str, Any]:
        return {"family": "class_labels", "num_classes": self.num_classes}


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
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.requires_grad_(trainable)
        self.trainable = trainable
        self.network_extras = dict(network_extras or {})
        self.summary_dim = text_encoder.config.hidden_size

    def check(self, net: nn.Module, data: DataDescription) -> None:
        check_captions(net, data)
        for key, width, expected, name in text_widths(net, self.text_encoder):
            if width != expected:
                raise ConfigError(f"{key}={width} differs from the text encoder's {name} (model.text_hidden_size)")
        if isinstance(net, PixArtTransformer2DModel):
            width = net.config.num_attention_heads * net.config.attention_head_dim
            if net.config.caption_channels is not None and net.config.cross_attention_dim != width:
                raise ConfigError(
                    f"net.cross_attention_dim={net.config.cross_attention_dim} must be the width num_attention_heads "
                    f"x attention_head_dim={width}: the caption projection (net.caption_channels) maps the text to it"
                )
            if net.config.use_additional_conditions:
                raise ConfigError(
                    "net.use_additional_conditions=true: lightdiff has no resolution / aspect-ratio input"
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
        texts = [negative_prompt if drop else str(text) for text, drop in zip(inputs["text"], which)]
        return {**inputs, "text": texts}

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
        }


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

    @property
    def cacheable(self) -> bool:
        return False  # the cache holds one tensor per caption; SD3 takes two

    def check(self, net: nn.Module, data: DataDescription) -> None:
        super().check(net, data)
        hidden = self.text_encoder.config.hidden_size
        if not isinstance(self.text_encoder, CLIPTextModelWithProjection):
            raise ConfigError("an SD3 transformer (net=mmdit_tiny) needs a CLIPTextModelWithProjection text encoder")
        if self.joint_attention_dim < 2 * hidden:
            raise ConfigError(
                f"net.joint_attention_dim={self.joint_attention_dim} is below 2 x the text encoder's "
                f"hidden_size={hidden} (SD3 concatenates two CLIP encoders' states; model.text_hidden_size)"
            )

    def forward(self, inputs: Inputs) -> Condition:
        output = self.text_encoder(self.token_ids([str(text) for text in inputs["text"]]), output_hidden_states=True)
        hidden = output.hidden_states[-2]
        states = F.pad(torch.cat([hidden, hidden], dim=-1), (0, self.joint_attention_dim - 2 * hidden.shape[-1]))
        pooled = torch.cat([output[0], output[0]], dim=-1)
        return Condition({"encoder_hidden_states": states, "pooled_projections": pooled}, pooled.float())

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
            packed = torch.where(dropped[:, None, None], self.encode([""]).to(packed), packed)
            states, pooled = unpack_pooled(packed, self.summary_dim)
        else:
            states, pooled = self.encoded(captions)
        return Condition({"encoder_hidden_states": states, "pooled_projections": pooled}, pooled.float())

    def without_condition(self, inputs: Inputs, which: Sequence[bool], negative_prompt: str = "") -> Inputs:
        texts = [negative_prompt if drop else str(text) for text, drop in zip(inputs["text"], which)]
        return {**inputs, "text": texts}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return encoder_parameters(self.trainable, self.text_encoder, self.text_encoder_2, self.text_encoder_3)

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
        for key, width, expected, name in text_widths(net, self.text_encoder, self.text_encoder_2):
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
        texts = [negative_prompt if drop else str(text) for text, drop in zip(inputs["text"], which)]
        zeroed = inputs.get(ZEROED_TEXT) or [False] * len(texts)
        zero = self.force_zeros_for_empty_prompt and negative_prompt == ""
        zeroed = [bool(done) or (drop and zero) for done, drop in zip(zeroed, which)]
        return {**inputs, "text": texts, ZEROED_TEXT: zeroed}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return encoder_parameters(self.trainable, self.text_encoder, self.text_encoder_2)

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


class FluxText(nn.Module):
    """FLUX's conditioning (`FluxPipeline.encode_prompt`): a CLIPTextModel's pooled output as `pooled_projections`
    (the modulation) and a T5 encoder's last hidden states, padded to `max_sequence_length` tokens, as the
    joint-attention text stream (`encoder_hidden_states`); with a transformer that embeds the guidance scale
    (`guidance_embeds`, FLUX.1-dev's guidance distillation), that scale as `guidance`. Text position ids (zeros) and
    image ones (the latent grid) are made per call by `lightdiff.nets.denoiser`, from the shapes.

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
        texts = [negative_prompt if drop else str(text) for text, drop in zip(inputs["text"], which)]
        return {**inputs, "text": texts}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return encoder_parameters(self.trainable, self.text_encoder, self.text_encoder_2)

    def get_extra_state(self) -> dict[str, Any]:  # both tokenizers travel with the weights (see CLIPText's)
        return {"tokenizer": tokenizer_state(self.tokenizer), "tokenizer_2": t5_tokenizer_state(self.tokenizer_2)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        tokenizer = tokenizer_for(self.text_encoder, state["tokenizer"])  # both checked before either is replaced
        self.tokenizer, self.tokenizer_2 = tokenizer, t5_tokenizer_for(self.text_encoder_2, state["tokenizer_2"])

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


class T5Text(nn.Module):
    """CogVideoX's conditioning (`CogVideoXPipeline.encode_prompt`): a T5 encoder's last hidden states of the prompt,
    padded to `max_sequence_length` tokens without an attention mask, as `encoder_hidden_states`; the transformer
    joins them to the video tokens in one sequence, so the length is the transformer's `max_text_seq_length` (226).
    The unconditional twin encodes the negative prompt, "" by default, as the pipeline does. The summary a
    discriminator projects is the states' mean over tokens (T5 has no pooled output)."""

    has_unconditional = True
    reads = ("text",)

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

    def train(self, mode: bool = True) -> T5Text:
        return super().train(mode and self.trainable)

    @property
    def cacheable(self) -> bool:
        return not self.trainable

    def cache_fingerprint(self) -> str:
        state = {**t5_tokenizer_state(self.tokenizer), "max_sequence_length": self.max_sequence_length}
        return f"t5|{module_fingerprint(state, self.text_encoder)}"

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """(B, max_sequence_length, d_model): CogVideoXPipeline's `_get_t5_prompt_embeds`."""
        ids = tokenize_prompts(self.tokenizer, prompts, self.max_sequence_length).to(self.text_encoder.device)
        return self.text_encoder(ids)[0]

    def forward(self, inputs: Inputs) -> Condition:
        captions = [str(text) for text in inputs["text"]]
        if "text_states" in inputs:  # data.cache_latents; a dropped caption is encoded as ""
            states = inputs["text_states"].to(self.text_encoder.device, self.text_encoder.dtype)
            dropped = torch.tensor([caption == "" for caption in captions], device=states.device)
            states = torch.where(dropped[:, None, None], self.encode([""]).to(states), states)
        else:
            states = self.encode(captions)
        return Condition({"encoder_hidden_states": states}, states.float().mean(dim=1))

    def without_condition(self, inputs: Inputs, which: Sequence[bool], negative_prompt: str = "") -> Inputs:
        texts = [negative_prompt if drop else str(text) for text, drop in zip(inputs["text"], which)]
        return {**inputs, "text": texts}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return encoder_parameters(self.trainable, self.text_encoder)

    def get_extra_state(self) -> dict[str, Any]:  # the tokenizer travels with the weights (see CLIPText's)
        return {"tokenizer": t5_tokenizer_state(self.tokenizer)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.tokenizer = t5_tokenizer_for(self.text_encoder, state["tokenizer"])

    def state(self) -> dict[str, Any]:
        return {
            "family": "t5_text",
            "text_encoder_config": self.text_encoder.config.to_dict(),
            "tokenizer": t5_tokenizer_state(self.tokenizer),
            "max_sequence_length": self.max_sequence_length,
        }


# CLIP's image normalisation (OpenAI's mean and std), what StableVideoDiffusionPipeline's CLIPImageProcessor applies
CLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class FirstFrameSettings:
    """`model.first_frame`: Stable Video Diffusion's micro-conditioning (Blattmann et al. 2023, Section 4.4), as
    StableVideoDiffusionPipeline takes it, and the size of a CLIP image encoder built from scratch."""

    fps: int = 7  # frames per second asked for; the network is given fps - 1, as SVD was trained
    motion_bucket_id: int = 127  # the amount of motion asked for (SVD's default)
    noise_aug_strength: float = 0.02  # noise added to the conditioning frame before it is encoded
    min_guidance_scale: float = 1.0  # guidance rises linearly over the frames from this to the guidance scale
    encoder_width: int = 64  # a from-scratch CLIPVisionModelWithProjection's hidden size
    encoder_layers: int = 2
    encoder_heads: int = 4
    encoder_patch_size: int = 4

    def __post_init__(self) -> None:
        if self.noise_aug_strength < 0:
            raise ConfigError(f"model.first_frame.noise_aug_strength={self.noise_aug_strength} must be >= 0")
        if self.fps < 1:
            raise ConfigError(f"model.first_frame.fps={self.fps} must be at least 1")


@runtime_checkable
class EncodesWithVae(Protocol):
    """A family that encodes pixels through the method's own VAE (SVD's conditioning frame): given it once the VAE
    exists (`attach_vae`), without owning it."""

    def attach_vae(self, vae: nn.Module) -> None: ...


class FirstFrame(nn.Module):
    """Stable Video Diffusion's conditioning (`StableVideoDiffusionPipeline`): of the clip's first frame (`"image"`,
    or frame 0 of a training batch's clips), a CLIP image encoder's `image_embeds` as the one cross-attention token
    (`encoder_hidden_states`, (B, 1, D)), its VAE latent (the posterior's mode of the frame plus `noise_aug_strength`
    noise, unscaled) which the network call concatenates to every frame's noisy latents (`image_latents`), and
    `added_time_ids` = [fps - 1, motion_bucket_id, noise_aug_strength]. The unconditional twin is zeros for the
    embedding and the latent, as the pipeline's. The augmentation noise of sample i comes from its generator when the
    sampler gives one (before its latents' noise, the pipeline's order), else from the global random stream."""

    has_unconditional = True
    reads = ("image", "generators")

    def __init__(
        self,
        image_encoder: CLIPVisionModelWithProjection,
        trainable: bool,  # whether the method trains the encoder (a from-scratch one does)
        settings: FirstFrameSettings,
        image_mean: Sequence[float] = CLIP_IMAGE_MEAN,
        image_std: Sequence[float] = CLIP_IMAGE_STD,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder.requires_grad_(trainable)
        self.trainable = trainable
        self.settings = settings
        self.image_mean, self.image_std = list(image_mean), list(image_std)
        self.summary_dim = image_encoder.config.projection_dim
        self.guidance_scale_min = settings.min_guidance_scale  # sampling's per-frame guidance ramp starts here
        self.__dict__["vae"] = None  # the method's VAE, not a submodule of this family (`attach_vae`)

    def attach_vae(self, vae: nn.Module) -> None:
        self.__dict__["vae"] = vae

    def check(self, net: nn.Module, data: DataDescription) -> None:
        if net.config.cross_attention_dim != self.summary_dim:
            raise ConfigError(
                f"net.cross_attention_dim={net.config.cross_attention_dim} differs from the image encoder's "
                f"projection_dim={self.summary_dim}"
            )
        ids = 3 * net.config.addition_time_embed_dim
        if net.config.projection_class_embeddings_input_dim != ids:
            raise ConfigError(
                f"net.projection_class_embeddings_input_dim={net.config.projection_class_embeddings_input_dim} must "
                f"be 3 x net.addition_time_embed_dim={ids}: fps, motion bucket and noise augmentation"
            )

    def train(self, mode: bool = True) -> FirstFrame:
        return super().train(mode and self.trainable)

    def _clip_input(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames in [-1, 1] as CLIP takes them: resized to its size with the pipeline's antialiasing (in [-1, 1],
        as the pipeline resizes), mapped to [0, 1], normalised by the processor's mean and std."""
        from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import (
            _resize_with_antialiasing,
        )

        size = self.image_encoder.config.image_size
        if tuple(frames.shape[-2:]) != (size, size):
            frames = _resize_with_antialiasing(frames, (size, size))
        mean = torch.tensor(self.image_mean, device=frames.device)[:, None, None]
        std = torch.tensor(self.image_std, device=frames.device)[:, None, None]
        return ((frames + 1) / 2 - mean) / std

    def forward(self, inputs: Inputs) -> Condition:
        frames = inputs["image"] if inputs.get("image") is not None else inputs["pixel_values"][:, 0]
        encoder = self.image_encoder
        frames = frames.to(encoder.device, torch.float32)
        count = len(frames)
        dropped = torch.tensor(list(inputs.get("dropped") or [False] * count), device=frames.device)
        embeddings = encoder(self._clip_input(frames).to(encoder.dtype)).image_embeds[:, None]
        generators = inputs.get("generators")
        if generators is not None:  # only the kept samples draw, as the pipeline draws once for its conditional half
            noise = torch.zeros_like(frames)
            for index in (i for i in range(count) if not dropped[i]):
                noise[index] = randn_tensor(frames[index : index + 1].shape, generator=generators[index])[0]
        else:
            noise = torch.randn_like(frames)
        vae = self.__dict__["vae"]
        augmented = (frames + self.settings.noise_aug_strength * noise).to(vae.dtype)
        image_latents = vae.encode(augmented).latent_dist.mode().float()
        keep = (~dropped).float()
        embeddings = embeddings * keep[:, None, None].to(embeddings.dtype)
        image_latents = image_latents * keep[:, None, None, None]
        ids = [self.settings.fps - 1, self.settings.motion_bucket_id, self.settings.noise_aug_strength]
        added_time_ids = torch.tensor([ids], dtype=torch.float32, device=frames.device).repeat(count, 1)
        kwargs = {"encoder_hidden_states": embeddings, "added_time_ids": added_time_ids, "image_latents": image_latents}
        return Condition(kwargs, embeddings[:, 0].float())

    def without_condition(self, inputs: Inputs, which: Sequence[bool], negative_prompt: str = "") -> Inputs:
        previous = list(inputs.get("dropped") or [False] * len(which))
        return {**inputs, "dropped": [old or new for old, new in zip(previous, which)]}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return encoder_parameters(self.trainable, self.image_encoder)

    def state(self) -> dict[str, Any]:
        return {
            "family": "first_frame",
            "image_encoder_config": self.image_encoder.config.to_dict(),
            "settings": dict(vars(self.settings)),
            "image_mean": self.image_mean,
            "image_std": self.image_std,
        }


def scratch_first_frame(
    net: UNetSpatioTemporalConditionModel, settings: FirstFrameSettings, resolution: int
) -> FirstFrame:
    """`FirstFrame` with a CLIP image encoder built from scratch (it trains with the denoiser): `resolution` px input
    (no resizing), its projection as wide as the network's cross-attention."""
    if resolution % settings.encoder_patch_size:
        raise ConfigError(
            f"data.resolution={resolution} is not a multiple of model.first_frame.encoder_patch_size="
            f"{settings.encoder_patch_size}"
        )
    config = CLIPVisionConfig(
        hidden_size=settings.encoder_width,
        intermediate_size=2 * settings.encoder_width,
        num_hidden_layers=settings.encoder_layers,
        num_attention_heads=settings.encoder_heads,
        image_size=resolution,
        patch_size=settings.encoder_patch_size,
        projection_dim=net.config.cross_attention_dim,
    )
    return FirstFrame(CLIPVisionModelWithProjection(config), True, settings)


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
        text: CLIPText | SDXLText,  # the teacher's text family (its encoders stay frozen)
        guidance_scale: float,  # the scale samples are drawn at (the pipeline's guidance_scale)
        embedding_dim: int,  # the network's time_cond_proj_dim
    ) -> None:
        super().__init__()
        self.text = text
        self.guidance_scale = guidance_scale
        self.embedding_dim = embedding_dim
        self.reads = text.reads
        self.summary_dim = text.summary_dim

    @property
    def text_encoder(self) -> nn.Module:  # what an exporter writes, as for the text family itself
        return self.text.text_encoder

    @property
    def tokenizer(self) -> CLIPTokenizer:
        return self.text.tokenizer

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

    def state(self) -> dict[str, Any]:
        return {
            "family": "guidance_embedded",
            "guidance_scale": self.guidance_scale,
            "embedding_dim": self.embedding_dim,
            "text": self.text.state(),
        }


# ----- which family a network takes --------------------------------------------------------------------------------

TEXT_NETS = (
    UNet2DConditionModel,
    SD3Transformer2DModel,
    PixArtTransformer2DModel,
    FluxTransformer2DModel,
    CogVideoXTransformer3DModel,
)


def takes_text(net: nn.Module) -> bool:
    return isinstance(net, TEXT_NETS)


def takes_first_frame(net: nn.Module) -> bool:
    """Whether `net` is conditioned on a clip's first frame (Stable Video Diffusion's UNet)."""
    return isinstance(net, UNetSpatioTemporalConditionModel)


def is_sdxl(net: nn.Module) -> bool:
    """An SDXL-shaped UNet: pooled text and size / crop ids added to the timestep embedding."""
    return isinstance(net, UNet2DConditionModel) and net.config.addition_embed_type == "text_time"


def sdxl_pooled_width(net: UNet2DConditionModel) -> int:
    """The pooled text width an SDXL UNet's added embedding takes besides its six embedded size / crop ids."""
    return net.config.projection_class_embeddings_input_dim - 6 * net.config.addition_time_embed_dim


def num_classes(net: nn.Module) -> int | None:
    """How many class labels the network embeds (None: it takes no labels)."""
    if isinstance(net, UNet2DModel):
        return net.config.num_class_embeds
    if isinstance(net, DiTTransformer2DModel):
        return net.config.num_embeds_ada_norm
    return None


def label_conditioning(net: nn.Module) -> NoCondition | ClassLabels:
    """The family of a network without text: class labels when it embeds classes."""
    classes = num_classes(net)
    return ClassLabels(classes) if classes is not None else NoCondition()


def text_encoder_class(net: nn.Module) -> type[CLIPTextModel]:
    """SD3 transformers take the pooled, projected prompt (`text_embeds`), which only the projection class has."""
    return CLIPTextModelWithProjection if isinstance(net, SD3Transformer2DModel) else CLIPTextModel


def text_conditioning(
    net: nn.Module, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, trainable: bool
) -> CLIPText:
    """The text family of a text-conditioned network, as its diffusers pipeline conditions it."""
    if isinstance(net, SD3Transformer2DModel):
        return SD3CLIPText(tokenizer, text_encoder, trainable, net.config.joint_attention_dim)
    if isinstance(net, PixArtTransformer2DModel):
        # No resolution / aspect-ratio embedding (net.use_additional_conditions=false, checked by the method).
        return CLIPText(
            tokenizer, text_encoder, trainable, {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
        )
    if is_sdxl(net):
        raise TypeError("an SDXL UNet takes two text encoders: use SDXLText")
    if isinstance(net, UNet2DConditionModel):
        return CLIPText(tokenizer, text_encoder, trainable)
    raise TypeError(f"{type(net).__name__} takes no text")


def scratch_text_conditioning(
    net: nn.Module,
    tokenizer: CLIPTokenizer,  # built from the data's captions (nets/text.py)
    hidden_size: int | None,  # each CLIP encoder's width; None: what the net takes
    layers: int,
    heads: int,
    captions: Sequence[str] = (),  # the data's captions: a T5 tokenizer is learnt from them (FLUX, `t5`)
    max_sequence_length: int | None = None,  # T5 tokens per prompt; None: SCRATCH_MAX_SEQUENCE_LENGTH
    embedded_guidance_scale: float | None = None,  # the `guidance` input of a guidance-embedding FLUX transformer
    t5: bool = False,  # add a T5 encoder to an SD3 transformer's CLIP (SD3's third encoder); FLUX always has one
) -> CLIPText | SDXLText | FluxText | SD3Text | T5Text:
    """The text family of `net` with encoders built from scratch (they train with the denoiser)."""
    hidden_size = hidden_size or text_width(net)
    if isinstance(net, CogVideoXTransformer3DModel):  # T5 alone, its length the transformer's text positions
        length = max_sequence_length or net.config.max_text_seq_length
        t5_tokenizer = build_t5_tokenizer(captions, model_max_length=length)
        encoder = t5_encoder_from_scratch(t5_tokenizer, hidden_size, layers, heads, 2 * hidden_size)
        return T5Text(t5_tokenizer, encoder, trainable=True, max_sequence_length=length)
    max_sequence_length = max_sequence_length or SCRATCH_MAX_SEQUENCE_LENGTH
    if t5 and not isinstance(net, SD3Transformer2DModel):
        raise ConfigError(
            f"model.t5=true adds SD3's T5 encoder to an SD3 transformer (net=mmdit_tiny), not a {type(net).__name__}"
            " (a FLUX transformer always has one)"
        )
    if t5 or isinstance(net, FluxTransformer2DModel):  # T5 as wide as the joint-attention text stream
        t5_tokenizer = build_t5_tokenizer(captions, model_max_length=max_sequence_length)
        width = net.config.joint_attention_dim
        t5_encoder = t5_encoder_from_scratch(t5_tokenizer, width, layers, heads, 2 * width)
    if t5:  # one CLIP standing in for both of SD3's, plus the T5 (SD3Text with text_encoder_2=None)
        clip = text_encoder_from_scratch(
            tokenizer, hidden_size, layers, heads, 2 * hidden_size, CLIPTextModelWithProjection
        )
        return SD3Text(tokenizer, clip, None, None, t5_tokenizer, t5_encoder, True, width, max_sequence_length)
    if isinstance(net, FluxTransformer2DModel):  # CLIP for the pooled vector
        return FluxText(
            tokenizer,
            text_encoder_from_scratch(tokenizer, hidden_size, layers, heads, 2 * hidden_size, CLIPTextModel),
            t5_tokenizer,
            t5_encoder,
            trainable=True,
            max_sequence_length=max_sequence_length,
            guidance_scale=embedded_guidance_scale if net.config.guidance_embeds else None,
        )
    if is_sdxl(net):  # two encoders sharing the caption tokenizer; the second's projection is the pooled width
        first = text_encoder_from_scratch(tokenizer, hidden_size, layers, heads, 2 * hidden_size, CLIPTextModel)
        second = text_encoder_from_scratch(
            tokenizer, hidden_size, layers, heads, 2 * hidden_size, CLIPTextModelWithProjection, sdxl_pooled_width(net)
        )
        return SDXLText(tokenizer, first, tokenizer, second, trainable=True)
    encoder = text_encoder_from_scratch(tokenizer, hidden_size, layers, heads, 2 * hidden_size, text_encoder_class(net))
    return text_conditioning(net, tokenizer, encoder, trainable=True)


def text_width(net: nn.Module) -> int:
    """The hidden size a (CLIP) text encoder must have to fit `net` (what a from-scratch encoder is built with)."""
    if isinstance(net, CogVideoXTransformer3DModel):
        return net.config.text_embed_dim  # the T5 states' width
    if isinstance(net, FluxTransformer2DModel):
        return net.config.pooled_projection_dim  # CLIP's pooled output (the T5 states are joint_attention_dim wide)
    if isinstance(net, SD3Transformer2DModel):
        return net.config.pooled_projection_dim // 2  # two pooled vectors side by side (SD3CLIPText)
    if isinstance(net, PixArtTransformer2DModel) and net.config.caption_channels is not None:
        return net.config.caption_channels
    if is_sdxl(net):  # two encoders of equal width side by side (SDXL's are 768 + 1280; built ones are equal)
        return net.config.cross_attention_dim // 2
    return net.config.cross_attention_dim


def text_widths(
    net: nn.Module, text_encoder: CLIPTextModel, text_encoder_2: CLIPTextModelWithProjection | None = None
) -> list[tuple[str, int, int, str]]:
    """(key, the network's width, what the text encoder(s) give, that width's name) per text input."""
    hidden = text_encoder.config.hidden_size
    if is_sdxl(net) and text_encoder_2 is not None:
        both = hidden + text_encoder_2.config.hidden_size
        pooled = text_encoder_2.config.projection_dim
        return [
            ("net.cross_attention_dim", net.config.cross_attention_dim, both, f"hidden sizes side by side={both}"),
            (
                "net.projection_class_embeddings_input_dim",
                net.config.projection_class_embeddings_input_dim,
                6 * net.config.addition_time_embed_dim + pooled,
                f"6 x net.addition_time_embed_dim + text_encoder_2's projection_dim={pooled}",
            ),
        ]
    if isinstance(net, UNet2DConditionModel) or (
        isinstance(net, PixArtTransformer2DModel) and net.config.caption_channels is None
    ):
        return [("net.cross_attention_dim", net.config.cross_attention_dim, hidden, f"hidden_size={hidden}")]
    if isinstance(net, PixArtTransformer2DModel):  # the caption projection takes the states (PixArt's layout)
        return [("net.caption_channels", net.config.caption_channels, hidden, f"hidden_size={hidden}")]
    if isinstance(net, SD3Transformer2DModel):
        # The states are padded up to joint_attention_dim, so it needs to be at least 2 x the width (checked apart).
        width = 2 * text_encoder.config.projection_dim
        return [("net.pooled_projection_dim", net.config.pooled_projection_dim, width, f"2 x projection_dim={width}")]
    return []


def text_encoder_fingerprint(tokenizer: Any, text_encoder: torch.nn.Module) -> str:
    """Hash of a transformers tokenizer (vocabulary, merges, length limit) and text encoder (config, weights)."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    for call_state in ("truncation", "padding"):  # set by the last call, not part of what the tokenizer is
        backend.pop(call_state, None)
    tokenizer_state = {"tokenizer": backend, "max_length": tokenizer.model_max_length}
    return module_fingerprint({**text_encoder.config.to_dict(), **tokenizer_state}, text_encoder)


# ----- checkpoints -------------------------------------------------------------------------------------------------

TEXT_ENCODER_CLASSES: dict[str, type] = {
    "CLIPTextModel": CLIPTextModel,
    "CLIPTextModelWithProjection": CLIPTextModelWithProjection,
}


def tokenizer_state(tokenizer: CLIPTokenizer) -> dict[str, Any]:
    """A CLIP tokenizer as plain data (vocabulary, merges, length limit) for a weights-only checkpoint."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [m.split(" ") if isinstance(m, str) else list(m) for m in model["merges"]]
    return {
        "vocab": dict(model["vocab"]),
        "merges": merges,
        "model_max_length": tokenizer.model_max_length,
        # SD 2.x's and SDXL's second tokenizer pad with "!", not the end token: other ids, other states
        "pad_token": str(tokenizer.pad_token),
    }


def tokenizer_from_state(state: dict[str, Any]) -> CLIPTokenizer:
    merges = [tuple(pair) for pair in state["merges"]]
    return CLIPTokenizer(
        vocab=state["vocab"],
        merges=merges,
        model_max_length=state["model_max_length"],
        pad_token=state.get("pad_token", EOS),  # checkpoints from before it was recorded: CLIPTokenizer's default
    )


def tokenizer_for(text_encoder: nn.Module, state: dict[str, Any]) -> CLIPTokenizer:
    """A checkpoint's tokenizer (`tokenizer_state`), refused if its vocabulary is not the one `text_encoder` embeds."""
    tokenizer = tokenizer_from_state(state)
    if len(tokenizer) != text_encoder.config.vocab_size:
        raise ValueError(
            f"the checkpoint's tokenizer has {len(tokenizer)} tokens, the text encoder embeds "
            f"{text_encoder.config.vocab_size}"
        )
    return tokenizer


def t5_tokenizer_state(tokenizer: T5Tokenizer) -> dict[str, Any]:
    """A T5 tokenizer as plain data (its unigram pieces with their scores, length limit)."""
    vocab = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["vocab"]
    return {
        "vocab": [[str(piece), float(score)] for piece, score in vocab],
        "model_max_length": tokenizer.model_max_length,
    }


def t5_tokenizer_for(text_encoder: nn.Module, state: dict[str, Any]) -> T5Tokenizer:
    """A checkpoint's T5 tokenizer (`t5_tokenizer_state`), refused if `text_encoder` embeds another vocabulary."""
    tokenizer = t5_tokenizer_from_vocab([(piece, score) for piece, score in state["vocab"]], state["model_max_length"])
    if len(tokenizer) != text_encoder.config.vocab_size:
        raise ValueError(
            f"the checkpoint's T5 tokenizer has {len(tokenizer)} tokens, the T5 encoder embeds "
            f"{text_encoder.config.vocab_size}"
        )
    return tokenizer


def _flux_text_from_state(state: dict[str, Any]) -> FluxText:
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


def _t5_text_from_state(state: dict[str, Any]) -> T5Text:
    text_encoder = T5EncoderModel(T5Config(**state["text_encoder_config"])).eval()
    tokenizer = t5_tokenizer_for(text_encoder, state["tokenizer"])
    return T5Text(tokenizer, text_encoder, trainable=False, max_sequence_length=state["max_sequence_length"])


def _first_frame_from_state(state: dict[str, Any]) -> FirstFrame:
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**state["image_encoder_config"])).eval()
    settings = FirstFrameSettings(**state["settings"])
    return FirstFrame(encoder, False, settings, state["image_mean"], state["image_std"])


def _sd3_text_from_state(state: dict[str, Any]) -> SD3Text:
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


def _text_from_state(state: dict[str, Any]) -> CLIPText:
    encoder_class = TEXT_ENCODER_CLASSES.get(state.get("text_encoder_class", ""))
    if encoder_class is None:  # a class named in a file is only ever looked up
        raise ValueError(
            f"text_encoder_class={state.get('text_encoder_class')!r} is not one of {sorted(TEXT_ENCODER_CLASSES)}"
        )
    tokenizer = tokenizer_from_state(state["tokenizer"])
    text_encoder = encoder_class(CLIPTextConfig(**state["text_encoder_config"])).eval()
    if state["family"] == "sd3_clip_text":
        return SD3CLIPText(tokenizer, text_encoder, False, state["joint_attention_dim"])
    return CLIPText(tokenizer, text_encoder, False, state.get("network_extras"))


# family name -> how to rebuild it from `state()`; a plug-in family registers itself here to be loadable by
# sample.py and the exporter (register_family).
FAMILIES: dict[str, Callable[[dict[str, Any]], nn.Module]] = {
    "none": lambda state: NoCondition(),
    "class_labels": lambda state: ClassLabels(state["num_classes"]),
    "clip_text": _text_from_state,
    "sd3_clip_text": _text_from_state,
    "sdxl_text": lambda state: SDXLText(
        tokenizer_from_state(state["tokenizer"]),
        CLIPTextModel(CLIPTextConfig(**state["text_encoder_config"])).eval(),
        tokenizer_from_state(state["tokenizer_2"]),
        CLIPTextModelWithProjection(CLIPTextConfig(**state["text_encoder_2_config"])).eval(),
        trainable=False,
        force_zeros_for_empty_prompt=state["force_zeros_for_empty_prompt"],
    ),
    "flux_text": _flux_text_from_state,
    "t5_text": _t5_text_from_state,
    "first_frame": _first_frame_from_state,
    "sd3_text": _sd3_text_from_state,
    "guidance_embedded": lambda state: GuidanceEmbedded(
        conditioning_from_state(state["text"]), state["guidance_scale"], state["embedding_dim"]
    ),
}


def register_family(name: str, from_state: Callable[[dict[str, Any]], nn.Module]) -> None:
    """Make a conditioning family outside lightdiff loadable from checkpoints (its `state()["family"]` is `name`)."""
    FAMILIES[name] = from_state


def conditioning_from_state(state: dict[str, Any]) -> nn.Module:
    """A family rebuilt from its `state()`, frozen, its weights still to be loaded (under `conditioning.`)."""
    rebuild = FAMILIES.get(state.get("family", ""))
    if rebuild is None:
        raise ValueError(f"conditioning family {state.get('family')!r} is not one of {sorted(FAMILIES)}")
    return rebuild(state).requires_grad_(False).eval()
