"""Wan 2.1 / 2.2 text-to-video (`WanTransformer3DModel`; Wan Team 2025, Section 4.2): a diffusion transformer over a
clip's latents, patched 1 x 2 x 2, with cross-attention to UMT5 text states (`UMT5Text`), behind Wan's causal 3-D VAE
(`AutoencoderKLWan`: time 4x, the first frame alone; latents normalised per channel by its `latents_mean` /
`latents_std`). Trained by flow matching, as Wan is (the velocity noise - x_0 is WanPipeline's `flow_prediction`).

The transformer takes (B, C, F, H, W) where lightdiff's clips are (B, F, C, H, W): `Wan.output` transposes, and
`Wan.initial_noise` draws x_T per sample in WanPipeline's (C, F, H, W) order, so a seed draws the same clip in
sample.py and in diffusers. Exported as `WanPipeline` (tokenizer, UMT5 `text_encoder`, `vae`, `transformer`,
scheduler); plain diffusers reproduces lightdiff's clips with `num_frames`, `height` / `width` and
`max_sequence_length` = lightdiff.json's.

Image-to-video (`WanImageToVideo`, the same transformer class with a wider input): the first frame's latents and
mask channels beside the noisy latents (`WanFirstFrame`), with Wan 2.1's CLIP image tokens where the transformer has
`image_dim`; exported as `WanImageToVideoPipeline`, which reproduces it given the same frame.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import WanImageToVideoPipeline, WanPipeline, WanTransformer3DModel
from diffusers.configuration_utils import FrozenDict
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from diffusers.utils.torch_utils import randn_tensor
from torch import nn
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    T5Tokenizer,
    UMT5Config,
    UMT5EncoderModel,
)

from lightdiff.config import ConfigError
from lightdiff.files import module_fingerprint
from lightdiff.nets.families.base import (
    Condition,
    ConditioningSettings,
    DataDescription,
    Family,
    FirstFrameEncoding,
    Inputs,
    PipelineComponents,
    check_captions,
    encoder_parameters,
    kwargs_in_dtype,
    prompts_without_condition,
    wider_input,
    zero_adaln_single,
)
from lightdiff.nets.families.cogvideox import T5Text
from lightdiff.nets.families.svd import CLIP_IMAGE_MEAN, CLIP_IMAGE_STD, clip_pixels
from lightdiff.nets.pretrained import check_parts_used, load_component, pipeline_config, pipeline_parts
from lightdiff.nets.text import (
    build_t5_tokenizer,
    t5_encoder_from_scratch,
    t5_tokenizer_for,
    t5_tokenizer_state,
    tokenize_prompts,
)
from lightdiff.nets.vae import latent_channels, normalised_latents, posterior, temporal_compression, vae_fingerprint

# WanPipeline's default max_sequence_length: UMT5 tokens per prompt, the padded ones zeroed
WAN_TEXT_TOKENS = 512
# WanPipeline's default num_frames (5 s at 16 fps, 21 latent frames)
WAN_NUM_FRAMES = 81
# the scheduler's num_train_timesteps, which WanPipeline multiplies boundary_ratio by
WAN_TRAIN_TIMESTEPS = 1000
# Wan 2.2 A14B's switch between its experts (its model_index.json: text-to-video 0.875, image-to-video 0.9)
WAN_T2V_BOUNDARY_RATIO = 0.875
Expert = Literal["both", "high_noise", "low_noise"]


class WanExperts(nn.Module):
    """Wan 2.2 A14B's mixture of two experts (Wan-AI's Wan 2.2 release, "Mixture-of-Experts architecture"): two
    transformers of one architecture, `transformer` for the high-noise steps (timestep >= boundary_ratio * 1000, the
    layout of the clip) and `transformer_2` for the low-noise rest (its details), switched per step as WanPipeline
    switches them. Called
    like one transformer, it sends each sample to the expert its timestep belongs to, so a batch drawn over the whole
    range trains both experts in one step, and sampling is WanPipeline's.

    `trains` freezes one expert to fine-tune the other on its own side of the boundary (the method restricts the
    timesteps there, `model.timestep_range`); the frozen one stays for previews, sample.py and the export, whose
    pipeline has both. Its config is the experts' (one architecture) plus `boundary_ratio` and `trains`, so a
    checkpoint rebuilds the pair with `from_config`."""

    expert_class = WanTransformer3DModel
    _supports_gradient_checkpointing = True
    _repeated_blocks = WanTransformer3DModel._repeated_blocks

    def __init__(
        self,
        transformer: WanTransformer3DModel,  # the high-noise expert
        transformer_2: WanTransformer3DModel,  # the low-noise expert
        boundary_ratio: float = WAN_T2V_BOUNDARY_RATIO,
        trains: Expert = "both",
    ) -> None:
        super().__init__()
        first, second = (architecture(expert) for expert in (transformer, transformer_2))
        if first != second:
            differ = sorted(key for key in first.keys() | second.keys() if first.get(key) != second.get(key))
            raise ConfigError(f"Wan's two experts must share one architecture; their configs differ in {differ}")
        if not 0 < boundary_ratio < 1:
            raise ConfigError(f"boundary_ratio={boundary_ratio} must lie in (0, 1): the share of timesteps above it")
        if trains not in ("both", "high_noise", "low_noise"):
            raise ConfigError(f"model.train_expert={trains!r} is not one of both, high_noise, low_noise")
        self.transformer, self.transformer_2 = transformer, transformer_2
        self.boundary_ratio, self.trains = float(boundary_ratio), trains
        frozen = {"both": None, "high_noise": transformer_2, "low_noise": transformer}[trains]
        if frozen is not None:
            frozen.requires_grad_(False)

    @property
    def config(self) -> FrozenDict:
        return FrozenDict(
            {**architecture(self.transformer), "boundary_ratio": self.boundary_ratio, "trains": self.trains}
        )

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> WanExperts:
        """The pair a checkpoint's `net_config` describes, new weights."""
        expert = {k: v for k, v in config.items() if k not in ("boundary_ratio", "trains")}
        pair = [WanTransformer3DModel.from_config(expert) for _ in range(2)]
        return cls(*pair, config["boundary_ratio"], config.get("trains", "both"))

    @classmethod
    def from_pipeline(cls, pretrained: str, key: str = "model.pretrained") -> WanExperts:
        """A Wan 2.2 A14B pipeline's `transformer` and `transformer_2`, switched at its `boundary_ratio`."""
        ratio = pipeline_config(pretrained, key).get("boundary_ratio")
        if ratio is None:
            raise ConfigError(f"{key}={pretrained!r} has transformer_2 but no boundary_ratio in its model_index.json")
        experts = [
            load_component(WanTransformer3DModel, pretrained, part, key) for part in ("transformer", "transformer_2")
        ]
        return cls(*experts, ratio)

    @property
    def pipeline_components(self) -> dict[str, WanTransformer3DModel]:
        """The experts as the pipeline names them (each with its own LoRA file, `nets.lora.LORA_FILES`)."""
        return {"transformer": self.transformer, "transformer_2": self.transformer_2}

    @property
    def frozen_component(self) -> str | None:
        """The expert that does not train (`trains`), which LoRA then leaves without adapters."""
        return {"both": None, "high_noise": "transformer_2", "low_noise": "transformer"}[self.trains]

    @property
    def boundary_timestep(self) -> float:
        return self.boundary_ratio * WAN_TRAIN_TIMESTEPS

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    def side(self, expert: Expert) -> tuple[float, float]:
        """The timesteps `expert` denoises: [boundary, 1000] for the high-noise one, [0, boundary) the low-noise."""
        ends = {
            "high_noise": (self.boundary_timestep, float(WAN_TRAIN_TIMESTEPS)),
            "low_noise": (0.0, self.boundary_timestep),
        }
        return ends.get(expert, (0.0, float(WAN_TRAIN_TIMESTEPS)))

    def enable_gradient_checkpointing(self) -> None:
        self.transformer.enable_gradient_checkpointing()
        self.transformer_2.enable_gradient_checkpointing()

    def compile_repeated_blocks(self, mode: str = "default") -> None:
        self.transformer.compile_repeated_blocks(mode=mode)
        self.transformer_2.compile_repeated_blocks(mode=mode)

    def forward(
        self, hidden_states: torch.Tensor, timestep: torch.Tensor, **condition: torch.Tensor
    ) -> Transformer2DModelOutput:
        """Each sample through the expert of its timestep (WanPipeline: `t >= boundary_timestep` -> `transformer`)."""
        high = timestep >= self.boundary_timestep
        if high.all() or not high.any():  # sampling: one step, one expert
            expert = self.transformer if high.all() else self.transformer_2
            return expert(hidden_states, timestep=timestep, **condition)
        sample = None
        for which, expert in ((high, self.transformer), (~high, self.transformer_2)):
            part = {
                k: v[which] if torch.is_tensor(v) and v.ndim and len(v) == len(which) else v
                for k, v in condition.items()
            }
            out = expert(hidden_states[which], timestep=timestep[which], **part).sample
            if sample is None:
                sample = out.new_zeros((len(hidden_states), *out.shape[1:]))
            sample = sample.index_put((which.nonzero()[:, 0],), out)
        return Transformer2DModelOutput(sample=sample)


def architecture(net: nn.Module) -> dict[str, Any]:
    """A diffusers model's config without its private keys (which record how it was built, not what it is)."""
    return {key: value for key, value in net.config.items() if not key.startswith("_")}


def experts_of(net: nn.Module) -> list[WanTransformer3DModel]:
    """A Wan net's transformers: the pair's two, or the one."""
    return [net.transformer, net.transformer_2] if isinstance(net, WanExperts) else [net]


def one_expert(
    net: nn.Module, expert: Expert, timestep_range: tuple[float, float] | None
) -> tuple[WanExperts, tuple[float, float]]:
    """`net`'s pair with only `expert` training, and the timesteps it trains on: `timestep_range` if given (it must
    lie on the expert's side of the boundary, where the pipeline calls it), else that whole side."""
    if not isinstance(net, WanExperts):
        raise ConfigError(
            f"model.train_expert={expert}: a {type(net).__name__} is one network; Wan 2.2 A14B's two experts come "
            "from a pipeline with transformer_2 (model.pretrained=..., model.load_pretrained_unet=true)"
        )
    pair = WanExperts(net.transformer, net.transformer_2, net.boundary_ratio, expert)
    low, high = side = pair.side(expert)
    if timestep_range is None:
        return pair, side
    if not low <= timestep_range[0] < timestep_range[1] <= high:
        raise ConfigError(
            f"model.timestep_range={list(timestep_range)} leaves the {expert} expert's side [{low:g}, {high:g}] "
            f"(boundary_ratio={net.boundary_ratio}): the pipeline calls the other expert there"
        )
    return pair, (float(timestep_range[0]), float(timestep_range[1]))


def pair_parts(net: nn.Module) -> set[str]:
    """The pipeline parts a Wan net is read from besides `transformer`: the low-noise expert of a pair."""
    return {"transformer_2"} if isinstance(net, WanExperts) else set()


def pipeline_transformers(net: nn.Module) -> dict[str, Any]:
    """A Wan pipeline's transformer arguments: the pair as `transformer`, `transformer_2` and `boundary_ratio`."""
    if isinstance(net, WanExperts):
        return {
            "transformer": net.transformer,
            "transformer_2": net.transformer_2,
            "boundary_ratio": net.boundary_ratio,
        }
    return {"transformer": net}


# diffusers' names of a Wan transformer's layers -> the original Wan ones (the Wan-Video repository's, which ComfyUI's
# WanModel keeps and its LoRA files key): diffusers' scripts/convert_wan_to_diffusers.py in reverse, for every linear
# layer LoRA can adapt. Per block first, then the layers outside the blocks.
ORIGINAL_BLOCK_LAYERS = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.add_k_proj": "cross_attn.k_img",  # Wan 2.1 image-to-video: the CLIP image tokens' keys and values
    "attn2.add_v_proj": "cross_attn.v_img",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}
ORIGINAL_LAYERS = {
    "proj_out": "head.head",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
}


def original_layer_name(name: str) -> str:
    """A Wan transformer layer's original (ComfyUI) name: `blocks.3.attn1.to_q` -> `blocks.3.self_attn.q`."""
    if name in ORIGINAL_LAYERS:
        return ORIGINAL_LAYERS[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blocks" and parts[2] in ORIGINAL_BLOCK_LAYERS:
        return f"blocks.{parts[1]}.{ORIGINAL_BLOCK_LAYERS[parts[2]]}"
    raise ConfigError(
        f"export_format=comfyui: the adapted layer {name!r} has no original Wan name lightdiff knows (it maps "
        f"{sorted(ORIGINAL_BLOCK_LAYERS)} in every block and {sorted(ORIGINAL_LAYERS)})"
    )


class UMT5Text(T5Text):
    """Wan's conditioning (`WanPipeline._get_t5_prompt_embeds`): the prompt cleaned (`prompt_clean`), UMT5's last
    hidden states computed under the attention mask of its tokens, and every state past the prompt's length set to
    zero, `max_sequence_length` (512) rows in all, as `encoder_hidden_states`. Unlike CogVideoX's `T5Text` the length
    is no property of the transformer, which cross-attends to any number of rows, but the zero rows still take part
    in the attention: a plain pipeline reproduces the model at the length it trained with (lightdiff.json keeps it).
    The unconditional twin encodes the negative prompt, "" by default, as the pipeline does."""

    state_name = "umt5_text"

    def check(self, net: nn.Module, data: DataDescription) -> None:
        check_captions(net, data)
        width = self.text_encoder.config.d_model
        if net.config.text_dim != width:
            raise ConfigError(f"net.text_dim={net.config.text_dim} differs from the UMT5 encoder's d_model={width}")

    def cache_fingerprint(self) -> str:
        state = {**t5_tokenizer_state(self.tokenizer), "max_sequence_length": self.max_sequence_length}
        return f"umt5|{module_fingerprint(state, self.text_encoder)}"

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """(B, max_sequence_length, d_model): WanPipeline's `_get_t5_prompt_embeds`."""
        cleaned = [prompt_clean(prompt) for prompt in prompts]
        ids = tokenize_prompts(self.tokenizer, cleaned, self.max_sequence_length).to(self.text_encoder.device)
        mask = ids.ne(self.tokenizer.pad_token_id)  # padding is on the right: the prompt's tokens come first
        states = self.text_encoder(ids, attention_mask=mask.long()).last_hidden_state
        return states.masked_fill(~mask[..., None], 0.0)


def umt5_text_from_state(state: dict[str, Any]) -> UMT5Text:
    text_encoder = UMT5EncoderModel(UMT5Config(**state["text_encoder_config"])).eval()
    tokenizer = t5_tokenizer_for(text_encoder, state["tokenizer"])
    return UMT5Text(tokenizer, text_encoder, trainable=False, max_sequence_length=state["max_sequence_length"])


def pretrained_umt5_text(pretrained: str, settings: ConditioningSettings, key: str) -> UMT5Text:
    """A Wan pipeline's tokenizer and UMT5 encoder, frozen unless `model.train_text_encoder`."""
    return UMT5Text(
        load_component(T5Tokenizer, pretrained, "tokenizer", key),
        load_component(UMT5EncoderModel, pretrained, "text_encoder", key),
        settings.train_text_encoder,
        settings.max_sequence_length or WAN_TEXT_TOKENS,
    )


class Wan(Family):
    name = "wan"
    denoiser_class = WanTransformer3DModel
    video = True
    takes_text = True
    vae_encodes_clips = True
    objectives = ("flow_matching",)  # WanPipeline's schedulers are flow samplers
    shapes_vae = "vae_moving_shapes_wan"  # experiments/video_shapes: Wan's VAE trained on the moving shapes
    conditionings = {"umt5_text": umt5_text_from_state}

    other_denoiser_classes = (WanExperts,)

    def describes(self, net: nn.Module) -> bool:
        # text-to-video: the input is the noisy latents alone (image-to-video concatenates its frame's channels)
        is_wan = isinstance(net, (WanTransformer3DModel, WanExperts))
        return is_wan and net.config.in_channels == net.config.out_channels

    def token_side(self, net: nn.Module) -> int:
        return int(net.config.patch_size[1])  # (time, height, width): Wan's 1 x 2 x 2

    def default_sample_size(self, net: nn.Module) -> None:
        return None  # rotary positions fit any size (WanPipeline's default is 480 x 832 px)

    def default_num_frames(self, net: nn.Module) -> int:
        return WAN_NUM_FRAMES

    def blocks(self, net: nn.Module) -> list[nn.Module]:
        return [block for expert in experts_of(net) for block in expert.blocks]

    def output(self, net: nn.Module, x_t: torch.Tensor, timesteps: torch.Tensor, condition: Condition) -> torch.Tensor:
        """The transformer reads and writes (B, C, F, H, W)."""
        out = net(x_t.transpose(1, 2), timestep=timesteps, **kwargs_in_dtype(condition, x_t.dtype)).sample
        return out.transpose(1, 2)

    def initial_noise(
        self, shape: tuple[int, ...], generators: list[torch.Generator], device: torch.device
    ) -> torch.Tensor:
        """WanPipeline.prepare_latents: each sample's noise drawn in (C, F, H, W) order."""
        batch, frames, channels, height, width = shape
        noise = randn_tensor(
            (batch, channels, frames, height, width), generator=generators, device=device, dtype=torch.float32
        )
        return noise.transpose(1, 2)

    def initialise(self, net: nn.Module) -> nn.Module:
        """Wan's blocks start as the identity: its design is PixArt's adaLN-single (`base.zero_adaln_single`)."""
        for expert in experts_of(net):
            zero_adaln_single(expert.condition_embedder.time_proj, expert.blocks)
        return net

    def widened_input(self, net: nn.Module, in_channels: int) -> nn.Module:
        """A text-to-video transformer (or pair) as the start of an image-to-video one: its patch embedding widened
        to the first frame's mask and latents, which WanImageToVideoPipeline concatenates after the noisy latents."""
        wide = [wider_input(expert, "patch_embedding", in_channels) for expert in experts_of(net)]
        if isinstance(net, WanExperts):
            return WanExperts(*wide, net.boundary_ratio, net.trains)
        return wide[0]

    def check(self, net: nn.Module, vae: nn.Module | None, num_frames: int | None) -> None:
        if net.config.patch_size[0] != 1:
            raise ConfigError(f"net.patch_size={list(net.config.patch_size)}: Wan patches one latent frame at a time")
        if vae is not None and type(vae).__name__ != "AutoencoderKLWan":
            raise ConfigError(
                f"model.vae: a WanTransformer3DModel learns Wan's VAE (AutoencoderKLWan), not a {type(vae).__name__}: "
                "WanPipeline could not decode its latents"
            )

    def text_width(self, net: nn.Module) -> int:
        return net.config.text_dim  # the UMT5 states' width

    def comfyui_layer_name(self, name: str) -> str:
        return original_layer_name(name)

    def new_conditioning(self, net: nn.Module, settings: ConditioningSettings, data: DataDescription) -> UMT5Text:
        """UMT5 built from the captions, trained with the transformer."""
        check_captions(net, data)
        width = settings.text_hidden_size or self.text_width(net)
        length = settings.max_sequence_length or WAN_TEXT_TOKENS
        tokenizer = build_t5_tokenizer(data.captions(), model_max_length=length)
        encoder = t5_encoder_from_scratch(
            tokenizer, width, settings.text_layers, settings.text_heads, 2 * width, encoder_class=UMT5EncoderModel
        )
        return UMT5Text(tokenizer, encoder, trainable=True, max_sequence_length=length)

    def pretrained_conditioning(
        self, pretrained: str, net: nn.Module, settings: ConditioningSettings, key: str
    ) -> UMT5Text:
        check_parts_used(
            pretrained, pipeline_parts(pretrained, key), {"tokenizer", "text_encoder"} | pair_parts(net), net, key
        )
        return pretrained_umt5_text(pretrained, settings, key)

    def read_folder(
        self, folder: Path, net: nn.Module, metadata: dict[str, Any], load_vae: Callable[[], nn.Module]
    ) -> tuple[nn.Module | None, nn.Module]:
        settings = ConditioningSettings(max_sequence_length=metadata.get("max_sequence_length"))
        return load_vae(), self.pretrained_conditioning(str(folder), net, settings, "the pipeline folder")

    def write(self, parts: PipelineComponents, folder: Path) -> None:
        text = parts.conditioning
        pipeline = WanPipeline(
            tokenizer=text.tokenizer,
            text_encoder=text.text_encoder,
            vae=parts.vae,
            scheduler=parts.scheduler,
            **pipeline_transformers(parts.net),
        )
        pipeline.save_pretrained(folder, safe_serialization=True)


FAMILY = Wan()


# ----- image-to-video ----------------------------------------------------------------------------------------------


class WanFirstFrame(nn.Module):
    """Wan's image-to-video conditioning (`WanImageToVideoPipeline`): the prompt's UMT5 states (`UMT5Text`), and the
    clip's first frame (`"image"`, or frame 0 of a training batch's clips) followed by black frames, encoded by the
    VAE (the posterior's mode, normalised per channel) behind `temporal_compression` mask channels that mark the first
    latent frame (1) from the rest (0); the network call concatenates both to the noisy latents (Wan 2.1 I2V:
    16 + 4 + 16 = 36 input channels). With a Wan 2.1 transformer (`net.image_dim`), also a CLIP image encoder's
    penultimate hidden states of the frame as `encoder_hidden_states_image`. The unconditional twin is the negative
    prompt with the same frame: the pipeline guides the text alone."""

    has_unconditional = True
    reads = ("text", "image", "num_frames")

    def __init__(
        self,
        text: UMT5Text,
        image_encoder: CLIPVisionModel | None,  # Wan 2.1's (net.image_dim); None for Wan 2.2's I2V transformers
        train_image_encoder: bool,  # whether the method trains the image encoder (a from-scratch one does)
        image_mean: Sequence[float] = CLIP_IMAGE_MEAN,  # the image processor's normalisation
        image_std: Sequence[float] = CLIP_IMAGE_STD,
    ) -> None:
        super().__init__()
        self.text = text
        self.image_encoder = image_encoder.requires_grad_(train_image_encoder) if image_encoder is not None else None
        self.train_image_encoder = train_image_encoder and image_encoder is not None
        self.trainable = text.trainable  # the text encoder's (`TextEncoders`)
        self.summary_dim = text.summary_dim
        self.image_mean, self.image_std = list(image_mean), list(image_std)
        self.__dict__["vae"] = None  # the method's VAE, not a submodule of this conditioning (`attach_vae`)

    def attach_vae(self, vae: nn.Module) -> None:
        self.__dict__["vae"] = vae

    def check(self, net: nn.Module, data: DataDescription) -> None:
        self.text.check(net, data)
        if net.config.image_dim is None:
            return
        width = self.image_encoder.config.hidden_size if self.image_encoder is not None else None
        if width != net.config.image_dim:
            raise ConfigError(f"net.image_dim={net.config.image_dim} differs from the CLIP image encoder's {width}")
        if self.text.max_sequence_length != WAN_TEXT_TOKENS:
            raise ConfigError(
                f"model.max_sequence_length={self.text.max_sequence_length}: a Wan 2.1 image-to-video transformer "
                f"(net.image_dim) splits its context after {WAN_TEXT_TOKENS} text tokens (WanAttnProcessor)"
            )

    def train(self, mode: bool = True) -> WanFirstFrame:
        super().train(mode)
        if self.image_encoder is not None:
            self.image_encoder.train(mode and self.train_image_encoder)
        return self

    @torch.no_grad()
    def _frame_latents(self, frames: torch.Tensor, num_frames: int) -> torch.Tensor:
        """(B, T + C, F', h, w): the mask channels and the normalised latents of the first frame and black frames."""
        vae = self.__dict__["vae"]
        clips = torch.cat([frames[:, None], frames.new_zeros(len(frames), num_frames - 1, *frames.shape[1:])], dim=1)
        # the posterior's mode, as the pipeline takes it (`retrieve_latents(..., "argmax")`), in the VAE's layout
        latents = normalised_latents(vae, posterior(vae, clips.to(vae.dtype)).mode().float())
        mask = latents.new_zeros(len(latents), temporal_compression(vae), *latents.shape[2:])
        mask[:, :, 0] = 1.0  # WanImageToVideoPipeline.prepare_latents' mask: the first frame is given
        return torch.cat([mask, latents], dim=1)

    @property
    def cacheable(self) -> bool:
        """The prompt's states may be cached (`CacheableText`) where the text encoder is frozen; the frame's
        condition has its own cache (`first_frame_encoding`)."""
        return self.text.cacheable

    def cache_fingerprint(self) -> str:
        return self.text.cache_fingerprint()

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.text.encode(prompts)

    def first_frame_encoding(self) -> FirstFrameEncoding | None:
        """For `data.cache_latents`: the condition as a function of each clip (its first frame through the frozen
        VAE), where nothing else decides it; None with Wan 2.1's CLIP image encoder (it reads the frame's pixels)."""
        vae = self.__dict__["vae"]
        if self.image_encoder is not None or vae is None:
            return None
        fingerprint = f"wan_first_frame|{vae_fingerprint(vae)}"

        def encode(clips: torch.Tensor) -> torch.Tensor:
            frames = clips[:, 0].to(next(vae.parameters()).device, torch.float32)  # where the VAE is
            return self._frame_latents(frames, clips.shape[1])

        return FirstFrameEncoding(fingerprint, encode)

    def forward(self, inputs: Inputs) -> Condition:
        text = self.text(inputs)
        device = self.text.text_encoder.device
        if inputs.get("first_frame_condition") is not None:  # data.cache_latents: made once by `first_frame_encoding`
            kwargs = {**text.kwargs, "condition_latents": inputs["first_frame_condition"].to(device, torch.float32)}
            return Condition(kwargs, text.summary)
        clips = inputs.get("pixel_values")
        frames = inputs["image"] if inputs.get("image") is not None else clips[:, 0]
        num_frames = inputs["num_frames"] if inputs.get("num_frames") is not None else clips.shape[1]
        frames = frames.to(device, torch.float32)
        kwargs = {**text.kwargs, "condition_latents": self._frame_latents(frames, num_frames)}
        if self.image_encoder is not None:
            size = self.image_encoder.config.image_size
            pixels = clip_pixels(frames, size, self.image_mean, self.image_std).to(self.image_encoder.dtype)
            states = self.image_encoder(pixels, output_hidden_states=True).hidden_states[-2]
            kwargs["encoder_hidden_states_image"] = states
        return Condition(kwargs, text.summary)

    def without_condition(self, inputs: Inputs, which: Sequence[bool], negative_prompt: str = "") -> Inputs:
        return prompts_without_condition(inputs, which, negative_prompt)

    def trainable_parameters(self) -> list[nn.Parameter]:
        image = encoder_parameters(self.train_image_encoder, self.image_encoder)
        return [*self.text.trainable_parameters(), *image]

    def text_encoders(self) -> dict[str, nn.Module]:
        return self.text.text_encoders()

    def pipeline_arguments(self) -> dict[str, Any]:
        return self.text.pipeline_arguments()

    def state(self) -> dict[str, Any]:
        encoder = self.image_encoder
        return {
            "family": "wan_first_frame",
            "text": self.text.state(),
            "image_encoder_config": encoder.config.to_dict() if encoder is not None else None,
            "image_mean": self.image_mean,
            "image_std": self.image_std,
        }


def wan_first_frame_from_state(state: dict[str, Any]) -> WanFirstFrame:
    config = state["image_encoder_config"]
    encoder = CLIPVisionModel(CLIPVisionConfig(**config)).eval() if config is not None else None
    text = umt5_text_from_state(state["text"])
    return WanFirstFrame(text, encoder, False, state["image_mean"], state["image_std"])


class WanImageToVideo(Wan):
    """Wan 2.1 / 2.2 image-to-video: the same transformer class, its input the noisy latents with the first frame's
    mask and latents concatenated (in_channels = 2 z + temporal compression; `WanFirstFrame`). Exported as
    `WanImageToVideoPipeline` (with `image_encoder` and `image_processor` for a Wan 2.1 transformer)."""

    name = "wan_i2v"
    conditionings = {"wan_first_frame": wan_first_frame_from_state}

    def describes(self, net: nn.Module) -> bool:
        is_wan = isinstance(net, (WanTransformer3DModel, WanExperts))
        return is_wan and net.config.in_channels != net.config.out_channels

    def latent_channels(self, net: nn.Module) -> int:
        return int(net.config.out_channels)  # the noisy latents; the rest of the input is the first frame's

    def output(self, net: nn.Module, x_t: torch.Tensor, timesteps: torch.Tensor, condition: Condition) -> torch.Tensor:
        kwargs = kwargs_in_dtype(condition, x_t.dtype)
        hidden = torch.cat([x_t.transpose(1, 2), kwargs.pop("condition_latents")], dim=1)
        return net(hidden, timestep=timesteps, **kwargs).sample.transpose(1, 2)

    def check(self, net: nn.Module, vae: nn.Module | None, num_frames: int | None) -> None:
        super().check(net, vae, num_frames)
        if vae is None:
            return
        expected = 2 * latent_channels(vae) + temporal_compression(vae)
        if net.config.in_channels != expected:
            raise ConfigError(
                f"net.in_channels={net.config.in_channels} must be {expected}: the noisy latents, the first frame's "
                f"mask ({temporal_compression(vae)} channels) and its latents ({latent_channels(vae)})"
            )

    def new_conditioning(self, net: nn.Module, settings: ConditioningSettings, data: DataDescription) -> WanFirstFrame:
        """UMT5 built from the captions and, for a Wan 2.1 transformer, a CLIP image encoder of the data's frames,
        both trained with the transformer."""
        text = super().new_conditioning(net, settings, data)
        if net.config.image_dim is None:
            return WanFirstFrame(text, None, False)
        frame = settings.first_frame
        if data.resolution % frame.encoder_patch_size:
            raise ConfigError(
                f"data.resolution={data.resolution} is not a multiple of model.first_frame.encoder_patch_size="
                f"{frame.encoder_patch_size}"
            )
        config = CLIPVisionConfig(
            hidden_size=net.config.image_dim,
            intermediate_size=2 * net.config.image_dim,
            num_hidden_layers=frame.encoder_layers,
            num_attention_heads=frame.encoder_heads,
            image_size=data.resolution,
            patch_size=frame.encoder_patch_size,
        )
        return WanFirstFrame(text, CLIPVisionModel(config), True)

    def pretrained_conditioning(
        self, pretrained: str, net: nn.Module, settings: ConditioningSettings, key: str
    ) -> WanFirstFrame:
        parts = pipeline_parts(pretrained, key)
        used = {"tokenizer", "text_encoder", "image_encoder", "image_processor"} | pair_parts(net)
        takes = "a CLIP image encoder (net.image_dim: Wan 2.1's image-to-video)"
        required = ("image_encoder", "image_processor") if net.config.image_dim is not None else ()
        check_parts_used(pretrained, parts, used, net, key, required, takes)
        text = pretrained_umt5_text(pretrained, settings, key)
        if net.config.image_dim is None:
            return WanFirstFrame(text, None, False)
        processor = load_component(CLIPImageProcessor, pretrained, "image_processor", key)
        encoder = load_component(CLIPVisionModel, pretrained, "image_encoder", key)
        return WanFirstFrame(text, encoder, settings.train_text_encoder, processor.image_mean, processor.image_std)

    def read_folder(
        self, folder: Path, net: nn.Module, metadata: dict[str, Any], load_vae: Callable[[], nn.Module]
    ) -> tuple[nn.Module | None, nn.Module]:
        vae, conditioning = super().read_folder(folder, net, metadata, load_vae)
        conditioning.attach_vae(vae)
        return vae, conditioning

    def write(self, parts: PipelineComponents, folder: Path) -> None:
        frame = parts.conditioning
        encoder, processor = frame.image_encoder, None
        if encoder is not None:
            size = encoder.config.image_size
            processor = CLIPImageProcessor(
                size={"shortest_edge": size},
                crop_size={"height": size, "width": size},
                image_mean=frame.image_mean,
                image_std=frame.image_std,
            )
        pipeline = WanImageToVideoPipeline(
            tokenizer=frame.text.tokenizer,
            text_encoder=frame.text.text_encoder,
            vae=parts.vae,
            scheduler=parts.scheduler,
            image_processor=processor,
            image_encoder=encoder,
            **pipeline_transformers(parts.net),
        )
        pipeline.save_pretrained(folder, safe_serialization=True)


I2V_FAMILY = WanImageToVideo()
