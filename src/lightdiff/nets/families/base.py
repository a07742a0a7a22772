"""What every model family offers, and the registry that finds a network's family.

A family (`Family`) is everything lightdiff knows about one kind of diffusers denoiser: how the network is called
(FLUX packs latents into tokens, CogVideoX takes rotary embeddings, SVD concatenates a frame's latent), its latent
layout, how it is initialised, which conditioning it takes (built from scratch for the data, or read from a pipeline),
and the pipeline folder it is exported as and read back from. Each family is one module of this package; callers ask
`family_of(net)` and never test a network's class.

A conditioning (`Conditioning`) turns a batch's labels, prompts or frames into the network's keyword arguments, and
into their unconditional twin for guidance. Training, guided sampling, the turbo teacher, the discriminator, the text
cache and the exporter all go through the same object. `state()` is plain data that `conditioning_from_state`
rebuilds it from (weights apart), through the name each family registers its conditionings under.

What a conditioning is given (`inputs`) is a batch as the data modules serve it, or as the samplers make it: a
mapping with "label" (a (B,) tensor), "text" (B captions), "size_and_crop" (B, 6), "image" (B, 3, H, W) and the
samplers' per-sample "generators", of which each conditioning reads what it needs.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from diffusers import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from lightdiff.config import ConfigError
from lightdiff.nets.vae import normalised_latents, posterior

Denoiser = nn.Module  # a diffusers denoiser of a registered family (`family_of` says which)
Inputs = Mapping[str, Any]  # {"label": (B,) tensor, "text": B captions, ...}: what a conditioning reads
# Each image's (original height, original width, crop top, crop left, target height, target width) in pixels: the data
# sets record the size an image had and the crop taken of it (after resizing), as SDXL's training conditions on them
# (Podell et al. 2023, Sections 2.2-2.3); a sampler asks for an uncropped image of the size it draws.
SIZE_AND_CROP = "size_and_crop"
# diffusers' modulations that carry gates (FLUX's single-stream blocks: AdaLayerNormZeroSingle)
# CogVideoXLayerNormZero modulates the video and the text tokens in one linear layer, gates included (CogVideoX, 3.1)
ADALN_ZERO = ("AdaLayerNormZero", "SD35AdaLayerNormZeroX", "AdaLayerNormZeroSingle", "CogVideoXLayerNormZero")


class DataDescription(Protocol):
    """What a family may ask of the data set it trains on (`lightdiff.data.ImageDataModule` has it)."""

    @property
    def num_classes(self) -> int: ...

    @property
    def resolution(self) -> int: ...

    def captions(self) -> list[str]: ...


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
    """What every conditioning offers; they are `nn.Module`s so that an encoder that trains is part of the method."""

    summary_dim: int  # width of `Condition.summary`; 0: none (the discriminator is unconditional)
    has_unconditional: bool  # whether `without_condition` exists: needed by caption dropping and guidance
    reads: tuple[str, ...]  # the keys of `inputs` it reads ("label", "text"): what a sampler must give it

    def check(self, net: nn.Module, data: DataDescription) -> None:
        """A ConfigError naming the key where the conditioning, `net` and the data set do not fit together."""
        ...

    def __call__(self, inputs: Inputs) -> Condition:
        """The network's keyword arguments for a batch."""
        ...

    def without_condition(self, inputs: Inputs, which: Sequence[bool], negative_prompt: str = "") -> Inputs:
        """`inputs` with the samples marked in `which` made unconditional (the negative prompt where there is one)."""
        ...

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the method's optimiser trains of this conditioning (a from-scratch text encoder), else nothing."""
        ...

    def state(self) -> dict[str, Any]:
        """Plain data that rebuilds it with `conditioning_from_state` (weights apart, under `conditioning.`)."""
        ...


@runtime_checkable
class TextEncoders(Protocol):
    """A conditioning with text encoders a pipeline holds (what LoRA adapts, the exporter and single files write)."""

    trainable: bool  # whether the method trains the encoders (their states are then never cached)

    def text_encoders(self) -> dict[str, nn.Module]:
        """The pipeline's text encoder parts by name ("text_encoder", "text_encoder_2", ...), in pipeline order."""
        ...


@runtime_checkable
class RecordsPipelineArguments(Protocol):
    """A conditioning whose samples a plain pipeline reproduces only with some call arguments (FLUX's and
    CogVideoX's `max_sequence_length`, an LCM's `guidance_scale`, SVD's micro-conditioning): lightdiff.json keeps
    them beside the export."""

    def pipeline_arguments(self) -> dict[str, Any]: ...


@runtime_checkable
class ReadsLabels(Protocol):
    """A conditioning of class labels: how many it embeds (samplers and the demo cycle labels through them)."""

    num_classes: int


@runtime_checkable
class EmbedsGuidance(Protocol):
    """A conditioning that feeds the network the guidance scale as an input (LCM's `GuidanceEmbedded`, FLUX's
    guidance embedding): sampling then calls the network once a step, unguided. None: this network has no such input
    (a FLUX transformer without `guidance_embeds`)."""

    guidance_scale: float | None


@runtime_checkable
class RampsGuidance(Protocol):
    """Guidance that rises linearly over a clip's frames from `guidance_scale_min` to the guidance scale
    (StableVideoDiffusionPipeline's `min_guidance_scale`)."""

    guidance_scale_min: float


@runtime_checkable
class CacheableText(Protocol):
    """A conditioning whose whole condition is one text state per caption, encoded by a frozen encoder: what
    `data.cache_latents` can store once per distinct caption (lightdiff.data.latent_cache)."""

    cacheable: bool  # False while the encoder trains (or where the conditioning takes more than the states)

    def cache_fingerprint(self) -> str:
        """A hash of the tokenizer and the encoder: the text cache's key."""
        ...

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """The states (B, tokens, width) the cache stores for `prompts`."""
        ...


@dataclass(frozen=True)
class FirstFrameEncoding:
    """How an image-to-video conditioning makes its condition from clips (B, F, 3, H, W) in [-1, 1] (of which it
    reads the first frame), and a fingerprint of everything that decides it: `data.cache_latents` then caches each
    clip's condition beside its latents (`lightdiff.data.latent_cache.cached_first_frames`)."""

    fingerprint: str
    encode: Callable[[torch.Tensor], torch.Tensor]


@runtime_checkable
class CachesFirstFrames(Protocol):
    """An image-to-video conditioning whose frame condition `data.cache_latents` may store per clip."""

    def first_frame_encoding(self) -> FirstFrameEncoding | None:
        """The encoding, or None where the condition is not a function of the frame and the frozen VAE alone."""
        ...


@runtime_checkable
class EncodesWithVae(Protocol):
    """A conditioning that encodes pixels through the method's own VAE (SVD's conditioning frame): given it once the
    VAE exists (`attach_vae`), without owning it."""

    def attach_vae(self, vae: nn.Module) -> None: ...


def kwargs_in_dtype(condition: Condition, dtype: torch.dtype) -> dict[str, Any]:
    """The condition's keyword arguments with floating tensors in `dtype`: frozen text encoders may run in half
    precision (model.frozen_dtype), and their outputs meet the network in its dtype."""
    return tree_map(lambda tensor: tensor.to(dtype) if tensor.is_floating_point() else tensor, condition.kwargs)


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


def hidden_states_past(hidden: torch.Tensor, mask: torch.Tensor, drop: int, length: int) -> torch.Tensor:
    """(B, length, width): each row's states under its attention mask past its first `drop`, cut to `length` (the
    Qwen pipelines' `_extract_masked_hidden` and slice, Z-Image's masked rows) and zero-padded."""
    states = hidden.new_zeros(len(hidden), length, hidden.shape[-1])
    for row, (sample, kept) in enumerate(zip(hidden, mask.bool())):
        rows = sample[kept][drop:][:length]
        states[row, : len(rows)] = rows
    return states


def masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, width), float32: the mean of each sample's rows under `mask` (B, rows): the summary a discriminator
    projects of per-token text states."""
    return (states.float() * mask[..., None]).sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp(min=1)


def prompt_rows(states: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, summary) of per-prompt states (B, rows, width) whose first `lengths` rows are the prompt's: which rows
    are (B, rows) and their `masked_mean`."""
    kept = lengths.to(states.device).clamp(max=states.shape[1])
    mask = torch.arange(states.shape[1], device=states.device)[None] < kept[:, None]
    return mask, masked_mean(states, mask)


def encoder_parameters(trainable: bool, *encoders: nn.Module | None) -> list[nn.Parameter]:
    """What a text family's optimiser trains: its encoders' trainable parameters, or nothing when frozen."""
    if not trainable:
        return []
    return [p for encoder in encoders if encoder is not None for p in encoder.parameters() if p.requires_grad]


class PromptStates(nn.Module):
    """What a conditioning on one text encoder's per-token states of the prompt shares (T5's for CogVideoX, UMT5's for
    Wan, Qwen2.5-VL's for Qwen-Image): the encoder frozen unless it trains, its states cacheable when frozen, the
    negative prompt as the unconditional twin, `max_sequence_length` recorded for the pipeline call. Subclasses set
    `tokenizer`, `text_encoder`, `trainable` and `max_sequence_length`, and define `encode`."""

    has_unconditional = True
    reads = ("text",)
    state_name: ClassVar[str]  # `state()["family"]`: which reader `conditioning_from_state` picks
    tokenizer: Any
    text_encoder: nn.Module
    trainable: bool
    max_sequence_length: int

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def tokenizer_state(self) -> dict[str, Any]:
        """The tokenizer as plain data: it travels with the weights (see CLIPText's)."""
        raise NotImplementedError

    def tokenizer_from_state(self, state: dict[str, Any]) -> Any:
        """`tokenizer_state`'s tokenizer again, refused if this encoder embeds fewer tokens."""
        raise NotImplementedError

    def get_extra_state(self) -> dict[str, Any]:
        return {"tokenizer": self.tokenizer_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.tokenizer = self.tokenizer_from_state(state["tokenizer"])

    def state(self) -> dict[str, Any]:
        return {
            "family": self.state_name,
            "text_encoder_config": self.text_encoder.config.to_dict(),
            "tokenizer": self.tokenizer_state(),
            "max_sequence_length": self.max_sequence_length,
        }

    def train(self, mode: bool = True) -> PromptStates:
        return super().train(mode and self.trainable)

    @property
    def cacheable(self) -> bool:
        return not self.trainable

    def prompt_states(self, inputs: Inputs) -> torch.Tensor:
        """The prompts' states: encoded now, or read from the text cache (data.cache_latents), where a dropped
        caption's are the empty prompt's, encoded only when one was dropped."""
        captions = [str(text) for text in inputs["text"]]
        if "text_states" not in inputs:
            return self.encode(captions)
        states = inputs["text_states"].to(self.text_encoder.device, self.text_encoder.dtype)
        dropped = torch.tensor([caption == "" for caption in captions], device=states.device)
        if dropped.any():  # the encoder runs only for them (a frozen 7B encoder is the slow part of a step)
            states = torch.where(dropped[:, None, None], self.encode([""]).to(states), states)
        return states

    def without_condition(self, inputs: Inputs, which: Sequence[bool], negative_prompt: str = "") -> Inputs:
        return prompts_without_condition(inputs, which, negative_prompt)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return encoder_parameters(self.trainable, self.text_encoder)

    def text_encoders(self) -> dict[str, nn.Module]:
        return {"text_encoder": self.text_encoder}

    def pipeline_arguments(self) -> dict[str, Any]:
        return {"max_sequence_length": self.max_sequence_length}


class ReferenceImages(nn.Module):
    """An editing conditioning that sees the source as its pipeline's reference images (FLUX.1 Kontext, FLUX.2): a text
    conditioning's prompt (the instruction), and each pair's source(s) (`source_pixel_values`, (B, 3, H, W), or
    (B, K, 3, H, W) for K references, in [-1, 1]; or their cached posteriors, `source_latent_moments`) through the
    method's VAE, the posterior's mode as the pipelines take it, normalised as the latents are, as `reference_latents`
    (B, K, C, h, w). The family's `output` makes them tokens after the noisy ones and keeps the noisy tokens' output.
    The unconditional twin is the negative prompt with the same references (the pipelines guide the text alone).
    Subclasses name their state (`state_name`), the model in messages (`model_name`) and how many references their
    pipeline takes (`max_references`; None: any)."""

    has_unconditional = True
    reads = ("text", "source_pixel_values", "source_latent_moments")  # the latter from data.cache_latents
    state_name: ClassVar[str]
    model_name: ClassVar[str]
    max_references: ClassVar[int | None] = None

    def __init__(self, text: nn.Module) -> None:
        super().__init__()
        self.text = text
        self.trainable = text.trainable
        self.summary_dim = text.summary_dim
        self.__dict__["vae"] = None  # the method's VAE, not a submodule of this conditioning (`attach_vae`)

    def attach_vae(self, vae: nn.Module) -> None:
        self.__dict__["vae"] = vae

    def check(self, net: nn.Module, data: DataDescription) -> None:
        self.text.check(net, data)
        if self.__dict__["vae"] is None:
            raise ConfigError(f"model.edit=true: {self.model_name} reads its source image through a VAE (model.vae)")

    def train(self, mode: bool = True) -> ReferenceImages:
        super().train(mode)
        self.text.train(mode)
        return self

    @torch.no_grad()
    def reference_latents(self, inputs: Inputs) -> torch.Tensor:
        """(B, K, C, h, w): each pair's references as the pipeline encodes them (`_encode_vae_image`)."""
        vae = self.__dict__["vae"]
        moments, pixels = inputs.get("source_latent_moments"), inputs.get("source_pixel_values")
        if moments is not None:  # data.cache_latents: the sources' posteriors, their modes
            modes = moments.to(vae.device).float().chunk(2, dim=-3)[0]
        elif pixels is not None:
            images = pixels.flatten(0, 1) if pixels.ndim == 5 else pixels
            modes = posterior(vae, images.to(vae.device, vae.dtype)).mode().float()
        else:
            raise ValueError(
                f"{self.model_name} edits a source image: give source_pixel_values (data=shapes_edit, pairs)"
            )
        batch = len(inputs["text"])
        latents = normalised_latents(vae, modes.flatten(0, -4))
        references = latents.view(batch, -1, *latents.shape[1:])
        if self.max_references is not None and references.shape[1] > self.max_references:
            raise ValueError(
                f"{self.model_name} takes {self.max_references} source image(s) per pair, not "
                f"{references.shape[1]} references"
            )
        return references

    def forward(self, inputs: Inputs) -> Condition:
        text = self.text(inputs)
        return Condition({**text.kwargs, "reference_latents": self.reference_latents(inputs)}, text.summary)

    def without_condition(self, inputs: Inputs, which: Sequence[bool], negative_prompt: str = "") -> Inputs:
        return prompts_without_condition(inputs, which, negative_prompt)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.text.trainable_parameters()

    def text_encoders(self) -> dict[str, nn.Module]:
        return self.text.text_encoders()

    def pipeline_arguments(self) -> dict[str, Any]:
        return self.text.pipeline_arguments()

    def state(self) -> dict[str, Any]:
        return {"family": self.state_name, "text": self.text.state()}


def prompts_without_condition(inputs: Inputs, which: Sequence[bool], negative_prompt: str) -> Inputs:
    """`inputs` with the prompts marked in `which` replaced by the negative prompt: every text family's twin."""
    texts = [negative_prompt if drop else str(text) for text, drop in zip(inputs["text"], which)]
    return {**inputs, "text": texts}


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


# ----- settings ----------------------------------------------------------------------------------------------------


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


@dataclass
class ConditioningSettings:
    """How a family builds its conditioning: the `model.*` keys that size encoders from scratch or pick a pipeline's
    (every method passes them through unchanged; only a family reads them)."""

    train_text_encoder: bool = False  # unfreeze a pretrained text encoder (one from scratch always trains)
    text_hidden_size: int | None = None  # width of a from-scratch text encoder; None: the width the net takes
    text_layers: int = 2  # layers of a from-scratch text encoder
    text_heads: int = 4  # attention heads of a from-scratch text encoder
    max_prompt_tokens: int = 16  # a from-scratch CLIP tokenizer's length limit (start and end tokens included)
    max_sequence_length: int | None = None  # T5 tokens per prompt; None: the pipeline's (FLUX 512, SD3 256), 16
    t5: bool = False  # add a T5 encoder built from the captions to an SD3 transformer's CLIP (SD3's third)
    embedded_guidance_scale: float = 3.5  # a guidance-embedding FLUX transformer's `guidance` input
    first_frame: FirstFrameSettings = field(default_factory=FirstFrameSettings)  # an SVD UNet's micro-conditioning
    edit: bool = False  # the family's editing conditioning: the source image beside the instruction (FLUX.1 Kontext)


# ----- families ----------------------------------------------------------------------------------------------------


@dataclass
class PipelineComponents:
    """What an exporter writes: the networks as they will be saved (adapters already removed or fused)."""

    net: nn.Module
    vae: nn.Module | None
    conditioning: nn.Module
    scheduler: SchedulerMixin


class Family:
    """One kind of denoiser, as lightdiff trains, samples, loads and exports it. Subclasses set the class attributes
    and override what differs from these defaults (a network called as `net(x_t, timestep=t, **condition)`, its
    input as wide as its latents, initialised with its adaLN-Zero gates zeroed)."""

    name: ClassVar[str]  # the family's name in errors and docs ("sdxl", "flux")
    denoiser_class: ClassVar[type[nn.Module]]  # the diffusers class it drives
    # further classes its networks may be (Wan 2.2's pair of experts), built by name like `denoiser_class`
    other_denoiser_classes: ClassVar[tuple[type[nn.Module], ...]] = ()
    video: ClassVar[bool] = False  # denoises clips (B, F, C, H, W) rather than images
    takes_text: ClassVar[bool] = False  # conditioned on prompts (samplers and the demo then ask for them)
    vae_encodes_clips: ClassVar[bool] = False  # its VAE is a 3-D one (CogVideoX's), not a frame-wise one
    image_tokens_first: ClassVar[bool] = False  # a joint block returns (image, text) tokens, not (text, image)
    single_file: ClassVar[bool] = False  # exportable as one original-layout file (Stable Diffusion 1.x / 2.x / SDXL)
    # the objectives its pipelines sample (Wan's flow samplers: flow_matching only); None: any
    objectives: ClassVar[tuple[str, ...] | None] = None
    # the VAE shipped in lightdiff/assets whose latents its presets are sized for (model=video's default model.vae)
    shapes_vae: ClassVar[str | None] = None
    # state name -> rebuild: the conditionings this family's module defines (`conditioning_from_state`)
    conditionings: ClassVar[dict[str, Callable[[dict[str, Any]], nn.Module]]] = {}

    def describes(self, net: nn.Module) -> bool:
        """Whether `net` is of this family (subclasses narrow it by config where one class serves two families)."""
        return isinstance(net, self.denoiser_class)

    def comfyui_layer_name(self, name: str) -> str:
        """The name ComfyUI's model of this family gives the layer `name` of its diffusers network: the key of its
        adapters in a ComfyUI LoRA file (`export_format=comfyui`). Only families whose original names ComfyUI keys
        its LoRA by, and diffusers' do not reach, have one (Wan); Stable Diffusion's is `export_format=kohya`."""
        raise ConfigError(
            f"export_format=comfyui writes Wan LoRA files; a {self.name} model's adapters: export_format=diffusers "
            "(ComfyUI reads diffusers' LoRA names for it) or, for Stable Diffusion / SDXL, export_format=kohya"
        )

    # ----- layout ---------------------------------------------------------------------------------------------

    def latent_channels(self, net: nn.Module) -> int:
        """Channels of the latents (or pixels) the network denoises."""
        return int(net.config.in_channels)

    def output_channels(self, net: nn.Module) -> int:
        """What `net.config.out_channels` must be."""
        return self.latent_channels(net)

    def token_side(self, net: nn.Module) -> int:
        """Latent pixels per image token along a side: a transformer's patch size, a UNet's 1."""
        return int(net.config.get("patch_size") or 1)

    def side_multiple(self, net: nn.Module) -> int:
        """What the side of the net's input must be a multiple of: a UNet halves it after every down block but the
        last, a transformer cuts it into patches."""
        down_blocks = net.config.get("down_block_types")
        return 2 ** (len(down_blocks) - 1) if down_blocks is not None else self.token_side(net)

    def default_sample_size(self, net: nn.Module) -> int | tuple[int, int] | None:
        """The latent size the network draws by default (its `sample_size`; None: it has none)."""
        return net.config.get("sample_size")

    def default_num_frames(self, net: nn.Module) -> int | None:
        """Frames per clip a video network draws by default (its pipeline's default); None for an image network."""
        return None

    def initial_noise(
        self, shape: tuple[int, ...], generators: list[torch.Generator], device: torch.device
    ) -> torch.Tensor:
        """x_T of `shape` (lightdiff's layout: clips (B, F, C, H, W)), float32, drawn from one generator per sample in
        the order the family's pipeline draws it, so that a seed is the same sample in lightdiff and in diffusers."""
        return randn_tensor(shape, generator=generators, device=device, dtype=torch.float32)

    # ----- the network ----------------------------------------------------------------------------------------

    def output(self, net: nn.Module, x_t: torch.Tensor, timesteps: torch.Tensor, condition: Condition) -> torch.Tensor:
        """The network's prediction for x_t (B, timesteps per sample), shaped like x_t."""
        return net(x_t, timestep=timesteps, **kwargs_in_dtype(condition, x_t.dtype)).sample

    def guided(
        self, net: nn.Module, uncond: torch.Tensor, cond: torch.Tensor, scale: float | torch.Tensor
    ) -> torch.Tensor:
        """Classifier-free guidance as the family's pipeline combines the two predictions (Ho & Salimans 2022, Eq. 6:
        uncond + s (cond - uncond); Qwen-Image's rescales it)."""
        return uncond + scale * (cond - uncond)

    def blocks(self, net: nn.Module) -> list[nn.Module]:
        """A transformer's blocks in the order they run (FLUX's single-stream blocks after its double-stream ones):
        where a feature discriminator reads the tokens; none for a UNet."""
        return [*getattr(net, "transformer_blocks", []), *getattr(net, "single_transformer_blocks", [])]

    def initialise(self, net: nn.Module) -> nn.Module:
        """A network trained from scratch made ready (its transformer blocks start as the identity)."""
        return zero_adaln_gates(net)

    def widened_input(self, net: nn.Module, in_channels: int) -> nn.Module:
        """A pretrained `net` taking `in_channels` input channels, the added ones read through zero weights
        (`model.input_channels`; `base.wider_input`). Only families whose wider input lightdiff drives have one."""
        raise ConfigError(
            f"model.input_channels={in_channels}: lightdiff widens a pretrained Wan transformer's input (image-to-"
            f"video from text-to-video); a {self.name} network's input stays as the pipeline has it"
        )

    def check(self, net: nn.Module, vae: nn.Module | None, num_frames: int | None) -> None:
        """A ConfigError naming the key where `net`, its VAE and the clip length do not fit (beyond the shared
        checks of `methods.diffusion.check_fits`)."""

    def pipeline_timesteps(self, scheduler: SchedulerMixin, num_inference_steps: int) -> dict[str, Any]:
        """What the family's pipeline passes to `set_timesteps` besides the step count (FLUX: its own sigmas)."""
        return {}

    # ----- conditioning ---------------------------------------------------------------------------------------

    def check_settings(self, net: nn.Module, settings: ConditioningSettings) -> None:
        """A ConfigError naming a conditioning setting this family has no use for."""
        if settings.t5:
            raise ConfigError(
                f"model.t5=true adds SD3's T5 encoder to an SD3 transformer (net=mmdit_tiny), not a "
                f"{type(net).__name__} (a FLUX transformer always has one)"
            )

    def new_conditioning(self, net: nn.Module, settings: ConditioningSettings, data: DataDescription) -> nn.Module:
        """The conditioning `net` takes, its encoders built for the data (they train with the denoiser)."""
        raise NotImplementedError(f"the {self.name} family builds no conditioning")

    def pretrained_conditioning(
        self, pretrained: str, net: nn.Module, settings: ConditioningSettings, key: str
    ) -> nn.Module:
        """The conditioning `net` takes, its encoders read from the pipeline `pretrained` (the setting `key`)."""
        return self.new_conditioning(net, settings, NO_DATA)

    def text_width(self, net: nn.Module) -> int | None:
        """The hidden size a from-scratch (CLIP) text encoder is built with to fit `net`; None: it takes no text."""
        return None

    def with_guidance_input(
        self, net: nn.Module, conditioning: nn.Module, guidance_scale: float, embedding_dim: int
    ) -> tuple[nn.Module, nn.Module]:
        """(student network, its conditioning): the teacher's network with a guidance-scale input (guidance
        distillation, LCM), starting as the teacher."""
        raise ConfigError(
            f"a {type(net).__name__} has no guidance-scale input in diffusers; guidance distillation needs a FLUX "
            "transformer (guidance_embeds) or a text-conditioned UNet (time_cond_proj_dim)"
        )

    # ----- pipeline folders -----------------------------------------------------------------------------------

    def read_folder(
        self, folder: Path, net: nn.Module, metadata: dict[str, Any], load_vae: Callable[[], nn.Module]
    ) -> tuple[nn.Module | None, nn.Module]:
        """(VAE or None, conditioning) of a pipeline folder holding `net` (`metadata`: its lightdiff.json;
        `load_vae` reads the folder's VAE)."""
        return None, self.new_conditioning(net, ConditioningSettings(), NO_DATA)

    def write(self, parts: PipelineComponents, folder: Path) -> None:
        """The pipeline folder of `parts`, in the layout its module's docstring describes."""
        raise ValueError(f"no export layout for {type(parts.net).__name__} (the {self.name} family writes none)")


class _NoData:
    """The data a conditioning read from a pipeline is built without."""

    num_classes = 0
    resolution = 0

    def captions(self) -> list[str]:
        return []


NO_DATA = _NoData()


def zero_adaln_gates(net: nn.Module) -> nn.Module:
    """Zero-initialise every adaLN-Zero modulation of a transformer (Peebles & Xie 2023, "DiT", Section 3.2:
    "zero-initializing the final linear layer in each block's adaLN modulation ... initializes the full DiT block
    as the identity function"); a no-op for UNets.

    diffusers' `AdaLayerNormZero.linear` keeps nn.Linear's random init (it expects pretrained weights), so a
    transformer trained from scratch would start with random gates. Zeroed, each block's output equals its input
    streams, and the model first learns to draw, then how far each layer (and, in an MMDiT, the text) should steer."""
    with torch.no_grad():
        for module in net.modules():
            if type(module).__name__ in ADALN_ZERO:
                module.linear.weight.zero_()
                if module.linear.bias is not None:
                    module.linear.bias.zero_()
    return net


def wider_input(model: nn.Module, layer: str, in_channels: int) -> nn.Module:
    """`model`, a diffusers model whose first layer `layer` convolves its `config.in_channels` input channels, rebuilt
    to take `in_channels`: every weight copied, the added input channels' kernels zero. The wider model computes what
    `model` did whatever the new channels hold, and training teaches it to read them: how InstructPix2Pix starts its
    editing UNet from Stable Diffusion's (Brooks et al. 2023, Section 3.4: "initialized to zero"), and how an
    image-to-video model whose input is the noisy latents followed by the first frame's (Wan's) starts from a
    text-to-video one. The new channels come last, where those pipelines concatenate their condition."""
    old = int(model.config.in_channels)
    if in_channels <= old:
        raise ConfigError(
            f"model.input_channels={in_channels} must exceed the pretrained {type(model).__name__}'s {old} input "
            "channels: it widens the input, the added channels carrying the condition"
        )
    wide = type(model).from_config({**model.config, "in_channels": in_channels})
    state = model.state_dict()
    weight = state[f"{layer}.weight"]
    if weight.shape[1] != old:
        raise ValueError(f"{type(model).__name__}.{layer} takes {weight.shape[1]} channels, not in_channels={old}")
    state[f"{layer}.weight"] = torch.cat(
        [weight, weight.new_zeros(weight.shape[0], in_channels - old, *weight.shape[2:])], 1
    )
    wide.load_state_dict(state)
    return wide.to(device=weight.device, dtype=weight.dtype)


def zero_adaln_single(shared_projection: nn.Linear, blocks: Iterable[nn.Module]) -> None:
    """Blocks of an adaLN-single transformer (PixArt-alpha, Chen et al. 2023, 2.3; Wan) start as the identity, which
    takes two zeroings.

    adaLN-single: block i's six modulation vectors (shift, scale, gate of the self-attention and of the MLP) are its
    own `scale_shift_table` plus one projection of the timestep embedding shared by all blocks (`shared_projection`:
    PixArt's `adaln_single.linear`, Wan's `condition_embedder.time_proj`); diffusers initialises both randomly. Zeroing
    both zeroes every block's modulation for every timestep, as DiT's adaLN-Zero zeroes its per-block regression
    (Section 3.2): gates 0, and norms without shift or scale. PixArt's own code keeps the tables random because it
    starts from DiT's weights; lightdiff trains from scratch. The cross-attention to the text (`attn2`) has no gate, so
    its output projection is zeroed, as PixArt-alpha does ("we initialize the output projection layer in the
    cross-attention layer to zero"); a block's output then equals its input. The text path learns from the second step
    on: the zero projection passes no gradient back at the first."""
    with torch.no_grad():
        shared_projection.weight.zero_()
        shared_projection.bias.zero_()
        for block in blocks:
            block.scale_shift_table.zero_()
            output = block.attn2.to_out[0]
            output.weight.zero_()
            if output.bias is not None:
                output.bias.zero_()


# ----- the registry ------------------------------------------------------------------------------------------------

_FAMILIES: list[Family] = []
_CONDITIONINGS: dict[str, Callable[[dict[str, Any]], nn.Module]] = {}


def register_family(family: Family) -> Family:
    """Make `family` known: `family_of` finds it for its networks, its conditionings load from checkpoints, and its
    denoiser class can be named in checkpoints and pipeline folders. A family outside lightdiff registers the same
    way (tests/test_toy_family.py adds one)."""
    if family not in _FAMILIES:
        _FAMILIES.append(family)
    _CONDITIONINGS.update(family.conditionings)
    return family


def register_conditioning(name: str, from_state: Callable[[dict[str, Any]], nn.Module]) -> None:
    """Make a conditioning outside lightdiff loadable from checkpoints (its `state()["family"]` is `name`)."""
    _CONDITIONINGS[name] = from_state


def family_of(net: nn.Module) -> Family:
    """The registered family `net` belongs to (a ConfigError, which is a ValueError, for a class none drives)."""
    found = [family for family in _FAMILIES if family.describes(net)]
    if len(found) != 1:
        known = sorted({family.denoiser_class.__name__ for family in _FAMILIES})
        what = "no family" if not found else f"{len(found)} families ({', '.join(f.name for f in found)})"
        raise ConfigError(
            f"net: {type(net).__name__} has {what}; lightdiff's families take {known} "
            "(a new one: nets/families/, CONTRIBUTING.md)"
        )
    return found[0]


def denoiser_classes() -> dict[str, type[nn.Module]]:
    """The denoiser classes lightdiff builds by name (checkpoints, pipeline folders): a name read from a file is
    never imported, only looked up here."""
    classes = [cls for family in _FAMILIES for cls in (family.denoiser_class, *family.other_denoiser_classes)]
    return {cls.__name__: cls for cls in classes}


def conditioning_from_state(state: dict[str, Any]) -> nn.Module:
    """A conditioning rebuilt from its `state()`, frozen, its weights still to be loaded (under `conditioning.`)."""
    rebuild = _CONDITIONINGS.get(state.get("family", ""))
    if rebuild is None:
        raise ValueError(f"conditioning family {state.get('family')!r} is not one of {sorted(_CONDITIONINGS)}")
    return rebuild(state).requires_grad_(False).eval()
