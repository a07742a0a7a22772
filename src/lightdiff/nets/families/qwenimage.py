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

Editing (`model.edit=true`, Qwen-Image-Edit, `QwenEditText`): the source image, resized as QwenImageEditPipeline
resizes it, is read by Qwen2.5-VL inside the edit template beside the instruction and encoded by the VAE into
reference latents, which `QwenImage.output` packs after the noisy tokens as a second image of `img_shapes`.
Exported as `QwenImageEditPipeline`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    QwenImageEditPipeline,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SchedulerMixin,
)
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions
from PIL import Image
from torch import nn
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLProcessor,
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
    PromptStates,
    check_captions,
    encoder_parameters,
    hidden_states_past,
    kwargs_in_dtype,
    masked_mean,
    prompt_rows,
    prompts_without_condition,
)
from lightdiff.nets.families.flux import FAMILY as FLUX
from lightdiff.nets.families.flux import PACKED_PATCH, pack_latents, unpack_latents
from lightdiff.nets.pretrained import check_parts_used, load_component, pipeline_config_class, pipeline_parts
from lightdiff.nets.text import (
    build_qwen2_tokenizer,
    load_qwen2_vl_processor,
    qwen2_tokenizer_for,
    qwen2_tokenizer_state,
    qwen2_vl_image_processor,
    qwen2_vl_processor,
    qwen_vl_from_scratch,
    save_qwen2_vl_processor,
)
from lightdiff.nets.vae import normalised_latents, posterior, vae_scale_factor

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
# QwenImageEditPipeline's template (the source's vision tokens before the instruction), the tokens it drops (the
# system prefix and "<|im_start|>user\n": the states start at <|vision_start|>) and the area it resizes sources to
QWEN_EDIT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new image "
    "that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
QWEN_EDIT_DROP_TOKENS = 64  # QwenImageEditPipeline.prompt_template_encode_start_idx
QWEN_EDIT_SOURCE_AREA = 1024 * 1024  # QwenImageEditPipeline.__call__: calculate_dimensions(1024 * 1024, ratio)
EDIT_PARTS = (*TEXT_PARTS, "processor")


def check_prefix(tokenizer: Qwen2Tokenizer, prefix: str, dropped: int, pipeline: str) -> None:
    """The pipeline drops a fixed number of tokens, its template's prefix in Qwen's vocabulary: a tokenizer that
    splits the prefix otherwise would keep or lose states, so it is refused."""
    count = len(tokenizer(prefix).input_ids)
    if count != dropped:
        raise ConfigError(
            f"the tokenizer splits {pipeline}'s template prefix into {count} tokens; the pipeline drops {dropped} "
            "(Qwen's tokenizer, or one built by lightdiff.nets.text.build_qwen2_tokenizer)"
        )


class QwenText(PromptStates):
    """Qwen-Image's conditioning: per prompt, Qwen2.5-VL's last hidden states past the template's system prefix
    (`encoder_hidden_states`, zero-padded to `max_sequence_length` rows) and their mask
    (`encoder_hidden_states_mask`); padding rows take no part in the joint attention, so the length padded to does not
    change the transformer's output. The unconditional twin encodes the negative prompt, "" by default. The summary a
    discriminator projects is the mean of the prompt's states."""

    state_name = "qwen_text"

    def __init__(
        self,
        tokenizer: Qwen2Tokenizer,
        text_encoder: Qwen2_5_VLForConditionalGeneration,
        trainable: bool,  # whether the method trains the encoder (a from-scratch one does)
        max_sequence_length: int,  # text tokens per prompt after the system prefix (the pipeline's, 512)
    ) -> None:
        super().__init__()
        check_prefix(tokenizer, QWEN_TEMPLATE.split("{}")[0], QWEN_DROP_TOKENS, "QwenImagePipeline")
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
        return hidden_states_past(hidden, tokens.attention_mask, QWEN_DROP_TOKENS, self.max_sequence_length)

    def forward(self, inputs: Inputs) -> Condition:
        states = self.prompt_states(inputs)
        mask, summary = prompt_rows(states, self.prompt_lengths([str(text) for text in inputs["text"]]))
        return Condition({"encoder_hidden_states": states, "encoder_hidden_states_mask": mask}, summary)

    def tokenizer_state(self) -> dict[str, Any]:
        return qwen2_tokenizer_state(self.tokenizer)

    def tokenizer_from_state(self, state: dict[str, Any]) -> Any:
        return qwen2_tokenizer_for(self.text_encoder, state)


def qwen_text_from_state(state: dict[str, Any]) -> QwenText:
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**state["text_encoder_config"])).eval()
    tokenizer = qwen2_tokenizer_for(text_encoder, state["tokenizer"])
    return QwenText(tokenizer, text_encoder, trainable=False, max_sequence_length=state["max_sequence_length"])


class QwenEditText(nn.Module):
    """Qwen-Image-Edit's conditioning (`QwenImageEditPipeline`; Qwen Team 2025, arXiv 2508.02324): the
    source image (`source_pixel_values`, (B, 3, H, W) in [-1, 1]) resized to about 1024 x 1024 at its aspect ratio
    (`calculate_dimensions`, the pipeline's Lanczos resize of the 8-bit image), then seen twice:
    - by Qwen2.5-VL, its patches in place of the template's `<|image_pad|>` beside the instruction; the last hidden
      states past the 64-token system prefix (the source's vision tokens, then the instruction's) are the text;
    - through the VAE: the posterior's mode, normalised per channel (`_encode_vae_image`), as `reference_latents`,
      which `QwenImage.output` packs after the noisy tokens as the second image of `img_shapes`.
    The states are zero-padded with a mask to the source's vision tokens + `max_sequence_length` instruction rows, so
    a batch and its unconditional twin (the negative prompt with the same source) share one length; an instruction
    past that is cut, as QwenImagePipeline cuts prompts. The states depend on the image, so none is cached."""

    has_unconditional = True
    reads = ("text", "source_pixel_values")
    cacheable = False

    def __init__(
        self,
        processor: Qwen2VLProcessor,
        text_encoder: Qwen2_5_VLForConditionalGeneration,
        trainable: bool,  # whether the method trains the encoder (a from-scratch one does)
        max_sequence_length: int,  # instruction tokens kept (the template's end included)
    ) -> None:
        super().__init__()
        prefix = QWEN_EDIT_TEMPLATE.split("<|vision_start|>")[0]
        check_prefix(processor.tokenizer, prefix, QWEN_EDIT_DROP_TOKENS, "QwenImageEditPipeline")
        self.processor = processor
        self.text_encoder = text_encoder.requires_grad_(trainable)
        self.trainable = trainable
        self.max_sequence_length = max_sequence_length
        self.summary_dim = text_encoder.config.text_config.hidden_size
        self.__dict__["vae"] = None  # the method's VAE, not a submodule of this conditioning (`attach_vae`)

    def attach_vae(self, vae: nn.Module) -> None:
        self.__dict__["vae"] = vae

    def check(self, net: nn.Module, data: DataDescription) -> None:
        check_captions(net, data)
        if net.config.joint_attention_dim != self.summary_dim:
            raise ConfigError(
                f"net.joint_attention_dim={net.config.joint_attention_dim} differs from the Qwen2.5-VL encoder's "
                f"hidden_size={self.summary_dim}"
            )
        if self.__dict__["vae"] is None:
            raise ConfigError("model.edit=true: Qwen-Image-Edit reads its source image through a VAE (model.vae)")

    def train(self, mode: bool = True) -> QwenEditText:
        return super().train(mode and self.trainable)

    def sources(self, pixels: torch.Tensor) -> list[Image.Image]:
        """The sources as QwenImageEditPipeline takes them: 8-bit images resized to its area at their ratio."""
        width, height, _ = calculate_dimensions(QWEN_EDIT_SOURCE_AREA, pixels.shape[-1] / pixels.shape[-2])
        images = VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy((pixels.float() / 2 + 0.5).clamp(0, 1)))
        return [self.image_processor.resize(image, height, width) for image in images]

    @property
    def image_processor(self) -> VaeImageProcessor:
        """The pipeline's (its `vae_scale_factor` x 2: sides are multiples of a packed token)."""
        return VaeImageProcessor(vae_scale_factor=vae_scale_factor(self.__dict__["vae"]) * PACKED_PATCH)

    @torch.no_grad()
    def reference_latents(self, sources: list[Image.Image]) -> torch.Tensor:
        """(B, C, h, w): QwenImageEditPipeline._encode_vae_image of the resized sources."""
        vae = self.__dict__["vae"]
        width, height = sources[0].size
        pixels = self.image_processor.preprocess(sources, height, width).to(vae.device, vae.dtype)
        return normalised_latents(vae, posterior(vae, pixels).mode().float())

    def encode(self, prompts: Sequence[str], sources: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """(states, mask): `_get_qwen_prompt_embeds` of the instructions beside their sources, each row padded to
        the vision tokens + `max_sequence_length`."""
        texts = [QWEN_EDIT_TEMPLATE.format(prompt) for prompt in prompts]
        inputs = self.processor(text=texts, images=sources, padding=True, return_tensors="pt")
        inputs = inputs.to(self.text_encoder.device)
        hidden = self.text_encoder(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=inputs["pixel_values"].to(self.text_encoder.dtype),
            image_grid_thw=inputs["image_grid_thw"],
            output_hidden_states=True,
        ).hidden_states[-1]
        merge = self.processor.image_processor.merge_size**2
        vision_tokens = int(inputs["image_grid_thw"][0].prod()) // merge + 2  # with <|vision_start|> and _end|>
        length = vision_tokens + self.max_sequence_length
        kept = inputs["attention_mask"].sum(dim=1) - QWEN_EDIT_DROP_TOKENS
        mask = torch.arange(length, device=hidden.device)[None] < kept.clamp(max=length)[:, None]
        return hidden_states_past(hidden, inputs["attention_mask"], QWEN_EDIT_DROP_TOKENS, length), mask

    def forward(self, inputs: Inputs) -> Condition:
        pixels = inputs.get("source_pixel_values")
        if pixels is None:
            raise ValueError(
                "Qwen-Image-Edit reads its source at the pipeline's size: give source_pixel_values (data=shapes_edit, "
                "pairs; data.cache_latents stores sources at the data's size)"
            )
        if pixels.ndim != 4:
            raise ValueError("Qwen-Image-Edit takes one source image per pair, not a list of references")
        sources = self.sources(pixels)
        states, mask = self.encode([str(text) for text in inputs["text"]], sources)
        summary = masked_mean(states, mask)
        kwargs = {"encoder_hidden_states": states, "encoder_hidden_states_mask": mask}
        return Condition({**kwargs, "reference_latents": self.reference_latents(sources)}, summary)

    def without_condition(self, inputs: Inputs, which: Sequence[bool], negative_prompt: str = "") -> Inputs:
        return prompts_without_condition(inputs, which, negative_prompt)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return encoder_parameters(self.trainable, self.text_encoder)

    def text_encoders(self) -> dict[str, nn.Module]:
        return {"text_encoder": self.text_encoder}

    def pipeline_arguments(self) -> dict[str, Any]:
        return {}  # QwenImageEditPipeline keeps every state (its max_sequence_length is only checked)

    def get_extra_state(self) -> dict[str, Any]:  # the processor travels with the weights (see QwenText's)
        return self.processor_state()

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.processor = processor_from_state(self.text_encoder, state)

    def processor_state(self) -> dict[str, Any]:
        image_processor = json.loads(self.processor.image_processor.to_json_string())  # plain data (no PIL enums)
        image_processor.pop("image_processor_type", None)
        return {"tokenizer": qwen2_tokenizer_state(self.processor.tokenizer), "image_processor": image_processor}

    def state(self) -> dict[str, Any]:
        return {
            "family": "qwen_edit",
            "text_encoder_config": self.text_encoder.config.to_dict(),
            **self.processor_state(),
            "max_sequence_length": self.max_sequence_length,
        }


def processor_from_state(text_encoder: Qwen2_5_VLForConditionalGeneration, state: dict[str, Any]) -> Qwen2VLProcessor:
    """A checkpoint's processor (`QwenEditText.processor_state`), its tokenizer checked against `text_encoder`."""
    tokenizer = qwen2_tokenizer_for(text_encoder, state["tokenizer"])
    return qwen2_vl_processor(tokenizer, qwen2_vl_image_processor(state["image_processor"]))


def qwen_edit_from_state(state: dict[str, Any]) -> QwenEditText:
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**state["text_encoder_config"])).eval()
    processor = processor_from_state(text_encoder, state)
    return QwenEditText(processor, text_encoder, trainable=False, max_sequence_length=state["max_sequence_length"])


def image_shapes(*latents: torch.Tensor) -> list[list[tuple[int, int, int]]]:
    """QwenImagePipeline's `img_shapes`: per sample, the (frame, rows, columns) grid of each image's packed tokens
    (the noisy latents', then a source's reference latents' for Qwen-Image-Edit)."""
    grids = [(1, z.shape[-2] // PACKED_PATCH, z.shape[-1] // PACKED_PATCH) for z in latents]
    return [grids] * len(latents[0])


class QwenImage(Family):
    name = "qwenimage"
    denoiser_class = QwenImageTransformer2DModel
    takes_text = True
    objectives = ("flow_matching",)  # QwenImagePipeline samples with a flow sampler
    conditionings = {"qwen_text": qwen_text_from_state, "qwen_edit": qwen_edit_from_state}

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
        """QwenImagePipeline's transformer call: packed latents, timestep / 1000, the packed grid; unpacked.
        Qwen-Image-Edit's reference latents follow as tokens of a second grid, and only the noisy tokens' output is
        kept (QwenImageEditPipeline)."""
        height, width = x_t.shape[-2:]
        kwargs = kwargs_in_dtype(condition, x_t.dtype)
        reference = kwargs.pop("reference_latents", None)
        images = (x_t,) if reference is None else (x_t, reference)
        output = net(
            torch.cat([pack_latents(image) for image in images], dim=1),
            timestep=timesteps.to(x_t.dtype) / QWEN_TIMESTEP_SCALE,
            img_shapes=image_shapes(*images),
            **kwargs,
        ).sample
        return unpack_latents(output[:, : (height // PACKED_PATCH) * (width // PACKED_PATCH)], height, width)

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

    def new_conditioning(
        self, net: nn.Module, settings: ConditioningSettings, data: DataDescription
    ) -> QwenText | QwenEditText:
        """A Qwen2 tokenizer learnt from the captions and both pipelines' templates (as Qwen's vocabulary holds every
        word of both, so a text-to-image model built here can be trained into an editing one), and a small
        Qwen2.5-VL as wide as the transformer's text stream, trained with it (Qwen2.5-VL's image processor for an
        editing model's sources)."""
        check_captions(net, data)
        tokenizer = build_qwen2_tokenizer(data.captions(), [QWEN_TEMPLATE, QWEN_EDIT_TEMPLATE])
        width = settings.text_hidden_size or self.text_width(net)
        encoder = qwen_vl_from_scratch(tokenizer, width, settings.text_layers, settings.text_heads)
        length = settings.max_sequence_length or QWEN_MAX_SEQUENCE_LENGTH
        if settings.edit:
            return QwenEditText(qwen2_vl_processor(tokenizer, qwen2_vl_image_processor()), encoder, True, length)
        return QwenText(tokenizer, encoder, True, length)

    def pretrained_conditioning(
        self, pretrained: str, net: nn.Module, settings: ConditioningSettings, key: str
    ) -> QwenText | QwenEditText:
        """A Qwen-Image folder's Qwen2.5-VL and tokenizer; with model.edit=true also its processor, or, from a
        text-to-image base (editing trained from Qwen-Image, as Qwen-Image-Edit was), Qwen2.5-VL's image
        processor beside its tokenizer."""
        parts = pipeline_parts(pretrained, key)
        if "processor" in parts and not settings.edit:
            raise ConfigError(
                f"{key}={pretrained!r} is an editing pipeline (it has a processor/): set model.edit=true to train it "
                "on pairs (data=shapes_edit, an image folder with source_file_name)"
            )
        used = EDIT_PARTS if settings.edit else TEXT_PARTS
        check_parts_used(pretrained, parts, set(used), net, key, TEXT_PARTS, "a Qwen2.5-VL text encoder")
        encoder = load_component(Qwen2_5_VLForConditionalGeneration, pretrained, "text_encoder", key)
        tokenizer = load_component(Qwen2Tokenizer, pretrained, "tokenizer", key)
        length = settings.max_sequence_length or QWEN_MAX_SEQUENCE_LENGTH
        if not settings.edit:
            return QwenText(tokenizer, encoder, settings.train_text_encoder, length)
        if "processor" not in parts:
            processor = qwen2_vl_processor(tokenizer, qwen2_vl_image_processor())
        else:
            try:
                processor = load_qwen2_vl_processor(pretrained)
            except (OSError, ValueError) as error:
                problem = f"{key}={pretrained!r} has no usable processor/ (Qwen2VLProcessor): {error}"
                raise ConfigError(problem) from error
        return QwenEditText(processor, encoder, settings.train_text_encoder, length)

    def read_folder(
        self, folder: Path, net: nn.Module, metadata: dict[str, Any], load_vae: Callable[[], nn.Module]
    ) -> tuple[nn.Module | None, nn.Module]:
        settings = ConditioningSettings(
            max_sequence_length=metadata.get("max_sequence_length"),
            edit=pipeline_config_class(str(folder), "the pipeline folder") == "QwenImageEditPipeline",
        )
        vae = load_vae()
        conditioning = self.pretrained_conditioning(str(folder), net, settings, "the pipeline folder")
        if isinstance(conditioning, QwenEditText):
            conditioning.attach_vae(vae)
        return vae, conditioning

    def write(self, parts: PipelineComponents, folder: Path) -> None:
        text = parts.conditioning
        if isinstance(text, QwenEditText):
            write_edit_pipeline(parts, text, folder)
            return
        pipeline = QwenImagePipeline(
            scheduler=parts.scheduler,
            vae=parts.vae,
            text_encoder=text.text_encoder,
            tokenizer=text.tokenizer,
            transformer=parts.net,
        )
        pipeline.save_pretrained(folder, safe_serialization=True)


def write_edit_pipeline(parts: PipelineComponents, text: QwenEditText, folder: Path) -> None:
    """A QwenImageEditPipeline folder; its processor written by `save_qwen2_vl_processor` (which needs no
    torchvision) and named in model_index.json as diffusers names it."""
    pipeline = QwenImageEditPipeline(
        scheduler=parts.scheduler,
        vae=parts.vae,
        text_encoder=text.text_encoder,
        tokenizer=text.processor.tokenizer,
        processor=None,
        transformer=parts.net,
    )
    pipeline.save_pretrained(folder, safe_serialization=True)
    save_qwen2_vl_processor(text.processor, folder / "processor")
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text())
    index["processor"] = ["transformers", type(text.processor).__name__]
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


FAMILY = QwenImage()
