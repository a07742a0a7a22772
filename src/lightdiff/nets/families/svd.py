"""Stable Video Diffusion (`UNetSpatioTemporalConditionModel`; Blattmann et al. 2023): image-to-video over
(B, F, 2C, H, W), each frame's noisy latents with the conditioning frame's latent concatenated along the channels
(`FirstFrame` gives that latent once; `SVD.output` repeats it over the frames). Exported as
`StableVideoDiffusionPipeline` with its CLIP `image_encoder`, a `feature_extractor` holding the family's
normalisation, the VAE (SVD's AutoencoderKLTemporalDecoder, or a frame-wise AutoencoderKL, which the pipeline decodes
frame by frame) and an Euler scheduler on continuous timesteps; lightdiff.json records `fps`, `motion_bucket_id`,
`noise_aug_strength` and `min_guidance_scale`, the pipeline arguments that reproduce it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import StableVideoDiffusionPipeline, UNetSpatioTemporalConditionModel
from diffusers.utils.torch_utils import randn_tensor
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from lightdiff.config import ConfigError
from lightdiff.nets.families.base import (
    Condition,
    ConditioningSettings,
    DataDescription,
    Family,
    FirstFrameSettings,
    Inputs,
    PipelineComponents,
    encoder_parameters,
    kwargs_in_dtype,
)
from lightdiff.nets.pretrained import load_component

# CLIP's image normalisation (OpenAI's mean and std), what StableVideoDiffusionPipeline's CLIPImageProcessor applies
CLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_pixels(frames: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Frames in [-1, 1] as a CLIP image encoder of `size` px takes them: resized with StableVideoDiffusionPipeline's
    antialiasing (in [-1, 1], as that pipeline resizes), mapped to [0, 1], normalised by the processor's mean and std
    (a CLIPImageProcessor resizes with PIL instead: the same where the frames have the encoder's size)."""
    from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import _resize_with_antialiasing

    if tuple(frames.shape[-2:]) != (size, size):
        frames = _resize_with_antialiasing(frames, (size, size))
    channel_mean = torch.tensor(list(mean), device=frames.device)[:, None, None]
    channel_std = torch.tensor(list(std), device=frames.device)[:, None, None]
    return ((frames + 1) / 2 - channel_mean) / channel_std


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
        return clip_pixels(frames, self.image_encoder.config.image_size, self.image_mean, self.image_std)

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

    def pipeline_arguments(self) -> dict[str, Any]:
        """StableVideoDiffusionPipeline's arguments that reproduce it."""
        return {"first_frame": dataclasses.asdict(self.settings)}

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


def first_frame_from_state(state: dict[str, Any]) -> FirstFrame:
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**state["image_encoder_config"])).eval()
    settings = FirstFrameSettings(**state["settings"])
    return FirstFrame(encoder, False, settings, state["image_mean"], state["image_std"])


def pretrained_first_frame(pretrained: str, settings: FirstFrameSettings, trainable: bool) -> FirstFrame:
    """A Stable Video Diffusion pipeline's CLIP image encoder and its processor's normalisation (`FirstFrame`)."""
    from transformers import CLIPImageProcessor

    processor = load_component(CLIPImageProcessor, pretrained, "feature_extractor")
    encoder = load_component(CLIPVisionModelWithProjection, pretrained, "image_encoder")
    return FirstFrame(encoder, trainable, settings, processor.image_mean, processor.image_std)


class SVD(Family):
    name = "svd"
    denoiser_class = UNetSpatioTemporalConditionModel
    video = True
    conditionings = {"first_frame": first_frame_from_state}

    def latent_channels(self, net: nn.Module) -> int:
        return net.config.in_channels // 2  # the conditioning frame's latent is concatenated to the noisy one

    def default_num_frames(self, net: nn.Module) -> int:
        return net.config.num_frames  # StableVideoDiffusionPipeline's default: the UNet's

    def output(self, net: nn.Module, x_t: torch.Tensor, timesteps: torch.Tensor, condition: Condition) -> torch.Tensor:
        """StableVideoDiffusionPipeline's channel concatenation of the frame's latent to every noisy frame."""
        kwargs = kwargs_in_dtype(condition, x_t.dtype)
        image_latents = kwargs.pop("image_latents")[:, None].expand(-1, x_t.shape[1], -1, -1, -1)
        return net(torch.cat([x_t, image_latents], dim=2), timestep=timesteps, **kwargs).sample

    def new_conditioning(self, net: nn.Module, settings: ConditioningSettings, data: DataDescription) -> FirstFrame:
        return scratch_first_frame(net, settings.first_frame, data.resolution)

    def pretrained_conditioning(
        self, pretrained: str, net: nn.Module, settings: ConditioningSettings, key: str
    ) -> FirstFrame:
        return pretrained_first_frame(pretrained, settings.first_frame, settings.train_text_encoder)

    def read_folder(
        self, folder: Path, net: nn.Module, metadata: dict[str, Any], load_vae: Callable[[], nn.Module]
    ) -> tuple[nn.Module | None, nn.Module]:
        vae = load_vae()
        settings = FirstFrameSettings(**(metadata.get("first_frame") or {}))
        conditioning = pretrained_first_frame(str(folder), settings, trainable=False)
        conditioning.attach_vae(vae)
        return vae, conditioning

    def write(self, parts: PipelineComponents, folder: Path) -> None:
        from transformers import CLIPImageProcessor

        family = parts.conditioning
        size = family.image_encoder.config.image_size
        processor = CLIPImageProcessor(
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            image_mean=family.image_mean,
            image_std=family.image_std,
        )
        pipeline = StableVideoDiffusionPipeline(
            vae=parts.vae,
            image_encoder=family.image_encoder,
            unet=parts.net,
            scheduler=parts.scheduler,
            feature_extractor=processor,
        )
        pipeline.save_pretrained(folder, safe_serialization=True)


FAMILY = SVD()
