"""The latent space of a frozen diffusers VAE, as its pipelines use it (Rombach et al. 2022, Section 3).

Latents are (z - shift_factor) * scaling_factor: SD 1.x / 2.x / SDXL VAEs have no shift (None), SD3's and FLUX's
16-channel VAEs do (their pipelines encode and decode with both), so a latent model sees zero-mean, unit-variance
latents either way. A VAE whose config holds per-channel `latents_mean` / `latents_std` (Wan's, Qwen-Image's) is
normalised per channel instead: (z - mean) * (1 / std), as WanPipeline does (`latent_shift_and_scale`). FLUX.2's
(`AutoencoderKLFlux2`) cuts z into 2x2 patches first (4C channels at half the side) and normalises those per channel
by its BatchNorm's running statistics (Flux2KleinPipeline): lightdiff's latents are then the patches, so the denoiser
takes them as they are (`latent_channels` and `vae_scale_factor` count them).

What differs between VAE classes is data (`VaeSpec`, one line per class in `VAE_SPECS`), not a switch.

Video: clips travel through lightdiff as (B, F, C, H, W), the layout of the video denoisers and of their pipelines'
noise (CogVideoXPipeline.prepare_latents, StableVideoDiffusionPipeline.prepare_latents). The 3-D VAEs compress time
too and take and give (B, C, F, H, W): CogVideoX's `AutoencoderKLCogVideoX` (4x: 8m + 1 frames become 2m + 1 latent
frames) and Wan's `AutoencoderKLWan` (4x: 4k + 1 frames become k + 1, the first frame alone, causally); frame-wise
VAEs (an `AutoencoderKL`, SVD's `AutoencoderKLTemporalDecoder`, whose decoder also mixes frames) encode a clip's
frames as images. This module is the one place where the layouts meet, so no method or sampler reshapes a clip.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLCogVideoX,
    AutoencoderKLFlux2,
    AutoencoderKLQwenImage,
    AutoencoderKLTemporalDecoder,
    AutoencoderKLWan,
)
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from lightdiff.files import module_fingerprint

Autoencoder = (
    AutoencoderKL
    | AutoencoderKLCogVideoX
    | AutoencoderKLTemporalDecoder
    | AutoencoderKLWan
    | AutoencoderKLQwenImage
    | AutoencoderKLFlux2
)
# The VAE classes lightdiff builds by name (checkpoints, pipeline folders): a name read from a file is only looked up.
VAE_CLASSES: dict[str, type] = {cls.__name__: cls for cls in typing.get_args(Autoencoder)}


@dataclass(frozen=True)
class VaeSpec:
    """How lightdiff drives one VAE class."""

    encodes_clips: bool = False  # a 3-D VAE: whole clips in (B, C, F, H, W), time compressed (CogVideoX's, Wan's)
    decodes_clips_together: bool = False  # a frame-wise encoder whose decoder mixes a clip's frames (`num_frames`)
    channels_key: str = "latent_channels"  # the config key of its latent channels
    temporal_key: str | None = None  # a 3-D VAE's config key of its time compression
    spatial_key: str | None = None  # the config key of pixels per latent; None: 2 ** (levels - 1) of block_out_channels
    odd_latent_frames: bool = False  # decodes only an odd number of latent frames to as many frames (CogVideoX's)
    per_channel_statistics: bool = False  # normalised by its config's `latents_mean` / `latents_std` (Wan's)
    clamps_decoded: bool = False  # its `decode` clamps the pixels to [-1, 1] (Wan's): no gradient past the clamp
    images_as_frames: bool = False  # a 3-D VAE of images: (B, C, 1, H, W) in and out (Qwen-Image's)
    levels_key: str | None = None  # without spatial_key: 2 ** len(config[levels_key]) pixels per latent
    batch_norm_patches: bool = False  # latents are z's 2x2 patches normalised by its BatchNorm's statistics (FLUX.2's)


VAE_SPECS: dict[str, VaeSpec] = {
    "AutoencoderKL": VaeSpec(),
    "AutoencoderKLCogVideoX": VaeSpec(
        encodes_clips=True, temporal_key="temporal_compression_ratio", odd_latent_frames=True
    ),
    "AutoencoderKLTemporalDecoder": VaeSpec(decodes_clips_together=True),  # SVD's
    # Wan's config says its factors outright (its dim_mult does not: a level may down-sample time only)
    "AutoencoderKLWan": VaeSpec(
        encodes_clips=True,
        channels_key="z_dim",
        temporal_key="scale_factor_temporal",
        spatial_key="scale_factor_spatial",
        per_channel_statistics=True,
        clamps_decoded=True,
    ),
    # Qwen-Image's: Wan's architecture for single frames; QwenImagePipeline's vae_scale_factor is
    # 2 ** len(temperal_downsample)
    "AutoencoderKLQwenImage": VaeSpec(
        channels_key="z_dim",
        per_channel_statistics=True,
        clamps_decoded=True,
        images_as_frames=True,
        levels_key="temperal_downsample",
    ),
    "AutoencoderKLFlux2": VaeSpec(batch_norm_patches=True),
}


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """Hash of the VAE's config and weights (the key of every cache of what it encodes)."""
    return module_fingerprint(dict(vae.config), vae)


def vae_spec(vae: torch.nn.Module) -> VaeSpec:
    spec = VAE_SPECS.get(type(vae).__name__)
    if spec is None:
        raise ValueError(f"{type(vae).__name__} is not a VAE lightdiff drives ({sorted(VAE_SPECS)})")
    return spec


def is_video_vae(vae: torch.nn.Module) -> bool:
    """Whether `vae` is a 3-D VAE that encodes whole clips (B, F, 3, H, W), compressing time (CogVideoX's, Wan's)."""
    return vae_spec(vae).encodes_clips


def latent_channels(vae: torch.nn.Module) -> int:
    """Channels of the VAE's latents (`latent_channels`; Wan's `z_dim`; FLUX.2's patches: 4 x `latent_channels`)."""
    return int(vae.config[vae_spec(vae).channels_key]) * _patch_area(vae)


def _patch_area(vae: torch.nn.Module) -> int:
    """Latent pixels per lightdiff latent: FLUX.2's 2x2 patches, else 1."""
    return math.prod(vae.config.patch_size) if vae_spec(vae).batch_norm_patches else 1


def patchified(vae: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    """FLUX.2's latents' layout: (B, C, h, w) -> (B, C * ph * pw, h / ph, w / pw), each channel's patch pixels
    adjacent (Flux2KleinPipeline._patchify_latents); z itself for every other VAE."""
    if not vae_spec(vae).batch_norm_patches:
        return z
    (ph, pw), (b, c, h, w) = vae.config.patch_size, z.shape
    return z.view(b, c, h // ph, ph, w // pw, pw).permute(0, 1, 3, 5, 2, 4).reshape(b, c * ph * pw, h // ph, w // pw)


def unpatchified(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """`patchified`'s inverse (Flux2KleinPipeline._unpatchify_latents)."""
    if not vae_spec(vae).batch_norm_patches:
        return latents
    (ph, pw), (b, c, h, w) = vae.config.patch_size, latents.shape
    z = latents.reshape(b, c // (ph * pw), ph, pw, h, w).permute(0, 1, 4, 2, 5, 3)
    return z.reshape(b, c // (ph * pw), h * ph, w * pw)


def temporal_compression(vae: torch.nn.Module) -> int:
    """Frames per latent frame after the first (CogVideoX's and Wan's: 4); 1 for an image VAE."""
    key = vae_spec(vae).temporal_key
    return int(vae.config[key]) if key is not None else 1


def latent_frames(vae: torch.nn.Module, num_frames: int) -> int:
    """Latent frames of a clip of `num_frames`: the first frame alone, then one per `temporal_compression` frames
    (CogVideoXPipeline: (num_frames - 1) // vae_scale_factor_temporal + 1)."""
    return (num_frames - 1) // temporal_compression(vae) + 1


def frame_count_problem(vae: torch.nn.Module, num_frames: int) -> str | None:
    """Why a video VAE cannot encode and decode clips of `num_frames` frames back to as many (None: it can).

    A 3-D VAE keeps the first frame and compresses the rest `temporal_compression` times, so clips have c k + 1
    frames (Wan's 81 frames are 21 latent frames, 1 + 4 (n - 1) back). CogVideoX's decoder doubles an odd frame count
    n to 2n - 1 (the first frame kept) but an even one to 2n, so only an odd number of latent frames decodes to the
    clip's length: 2 c m + 1 frames (9, 17, ... for c = 4; CogVideoX's 49 frames are 13 latent frames)."""
    if not is_video_vae(vae):
        return None if num_frames >= 1 else f"{num_frames} frames: a clip needs at least one"
    compression = temporal_compression(vae)
    odd = vae_spec(vae).odd_latent_frames
    period = 2 * compression if odd else compression
    if num_frames >= 1 and (num_frames - 1) % period == 0:
        return None
    next_valid = period * max(0, -(-(num_frames - 1) // period)) + 1
    why = ", and decodes only an odd number of latent frames back to as many frames" if odd else ""
    return (
        f"{num_frames} frames must be {period}m + 1 (e.g. {next_valid}): the VAE keeps the first frame and compresses "
        f"the rest {compression}x in time{why}"
    )


def _to_vae_layout(tensor: torch.Tensor) -> torch.Tensor:
    """(B, F, C, H, W) <-> (B, C, F, H, W): its own inverse."""
    return tensor.transpose(1, 2)


def posterior(vae: Autoencoder, pixels: torch.Tensor) -> DiagonalGaussianDistribution:
    """q(z | x) of images (B, 3, H, W) or clips (B, F, 3, H, W), its parameters in the VAE's own layout (what the
    latent cache stores): (B, 2C, F', h, w) for a 3-D VAE, a frame-wise VAE's (B * F, 2C, h, w)."""
    if is_video_vae(vae):
        return vae.encode(_to_vae_layout(pixels)).latent_dist
    images = pixels.flatten(0, 1) if pixels.ndim == 5 else pixels
    if vae_spec(vae).images_as_frames:  # one frame each, the frame axis taken out again
        return DiagonalGaussianDistribution(vae.encode(images[:, :, None]).latent_dist.parameters[:, :, 0])
    return vae.encode(images).latent_dist


def decode(vae: Autoencoder, latents: torch.Tensor) -> torch.Tensor:
    """Pixels of unscaled latents z in the VAE's own layout (the autoencoder stage's reconstructions): images
    (B, 3, H, W), or a 3-D VAE's clips (B, F, 3, H, W)."""
    if vae_spec(vae).images_as_frames:
        return vae.decode(latents[:, :, None]).sample[:, :, 0]
    pixels = vae.decode(latents).sample
    return _to_vae_layout(pixels) if is_video_vae(vae) else pixels


def decode_for_training(vae: Autoencoder, latents: torch.Tensor) -> torch.Tensor:
    """`decode`'s pixels as the decoder computed them, before any clamp: what the autoencoder stage's losses take.

    `AutoencoderKLWan.decode` clamps its output to [-1, 1], which passes no gradient where the output overshoots (the
    black of moving-shapes frames, below -1): a moving-shapes VAE trained through the clamp stayed at 14 dB from step
    24 to 1600, the same recipe through the unclamped output reached 18.1 dB at step 500 (experiments/video_shapes).
    Its decoder's own outputs (one call per latent frame, read by a forward hook, so diffusers' decode path runs
    unchanged) are the unclamped clip."""
    if not vae_spec(vae).clamps_decoded:
        return decode(vae, latents)
    if vae.config.get("patch_size") is not None:
        raise ValueError(f"{type(vae).__name__} with patch_size={vae.config.patch_size}: not trained by lightdiff")
    frames: list[torch.Tensor] = []
    handle = vae.decoder.register_forward_hook(lambda module, args, output: frames.append(output))
    single = vae_spec(vae).images_as_frames
    try:
        vae.decode(latents[:, :, None] if single else latents)
    finally:
        handle.remove()
    clip = torch.cat(frames, dim=2)
    return clip[:, :, 0] if single else _to_vae_layout(clip)


def vae_scale_factor(vae: Autoencoder) -> int:
    """Pixels per latent along each side: 2 ** (number of down-sampling levels), as diffusers' pipelines compute it
    (Wan's config says it: `scale_factor_spatial`)."""
    spec = vae_spec(vae)
    if spec.spatial_key is not None:
        return int(vae.config[spec.spatial_key])
    if spec.levels_key is not None:
        return 2 ** len(vae.config[spec.levels_key])
    return 2 ** (len(vae.config.block_out_channels) - 1) * math.isqrt(_patch_area(vae))


def latent_shift(vae: Autoencoder) -> float:
    """The VAE's `shift_factor` (the latents' mean, taken off before scaling); 0 for VAEs without one."""
    return float(vae.config.get("shift_factor") or 0.0)


def latent_shift_and_scale(vae: Autoencoder, channels_dim: int, ndim: int) -> tuple[torch.Tensor | float, ...]:
    """(shift, scale) with latents = (z - shift) * scale, broadcastable to a tensor of `ndim` dims with channels at
    `channels_dim`: the config's per-channel `latents_mean` and 1 / `latents_std` where it has them (WanPipeline's
    arithmetic), else the numbers `shift_factor` and `scaling_factor` (the same arithmetic as the image pipelines,
    so their decodes agree to the bit); FLUX.2's BatchNorm's running mean and 1 / sqrt(running variance + eps)."""
    if vae_spec(vae).batch_norm_patches:
        shape = [1] * ndim
        shape[channels_dim] = -1
        std = torch.sqrt(vae.bn.running_var + vae.config.batch_norm_eps)
        return vae.bn.running_mean.detach().view(shape), 1.0 / std.detach().view(shape)
    mean, std = vae.config.get("latents_mean"), vae.config.get("latents_std")
    if mean is None or std is None:
        return latent_shift(vae), vae.config.scaling_factor
    shape = [1] * ndim
    shape[channels_dim] = len(mean)
    return torch.tensor(mean).view(shape), 1.0 / torch.tensor(std).view(shape)


def frozen_vae_dtype(vae: Autoencoder, dtype: torch.dtype) -> torch.dtype:
    """The dtype a frozen VAE runs in when `dtype` is asked for: float16 overflows in SD's and SDXL's VAEs (their
    configs say `force_upcast`), so they stay float32 then, as diffusers' pipelines upcast them; bfloat16 has float32's
    range and is kept."""
    if dtype == torch.float16 and vae.config.get("force_upcast", False):
        return torch.float32
    return dtype


def posterior_moments(vae: Autoencoder, pixels: torch.Tensor) -> torch.Tensor:
    """The parameters (mean and log-variance) of q(z | x), one row per image or clip (what the latent cache stores and
    `encode_latents` takes back): images (B, 2C, h, w), a 3-D VAE's clips (B, 2C, F', h, w) in its own layout, a
    frame-wise VAE's clips (B, F, 2C, h, w)."""
    moments = posterior(vae, pixels).parameters
    return moments.unflatten(0, pixels.shape[:2]) if pixels.ndim == 5 and not is_video_vae(vae) else moments


def normalised_latents(vae: Autoencoder, z: torch.Tensor) -> torch.Tensor:
    """(z - shift) * scale of unscaled latents z in the VAE's layout (channels at dim 1): `latent_shift_and_scale`'s
    numbers, or per channel (Wan's first-frame condition, WanImageToVideoPipeline.prepare_latents)."""
    z = patchified(vae, z)
    shift, scale = latent_shift_and_scale(vae, 1, z.ndim)
    return (z - _on(shift, z)) * _on(scale, z)


@torch.no_grad()
def encode_latents(vae: Autoencoder, pixels: torch.Tensor | None, moments: torch.Tensor | None = None) -> torch.Tensor:
    """(z - shift_factor) * scaling_factor, z ~ q(z | x), as StableDiffusion3Pipeline and FluxPipeline's training
    scripts encode (CogVideoX's: z * scaling_factor, in (B, F, C, H, W)); from cached posterior `moments`
    (data.cache_latents, `posterior_moments`' layout) when given, so a fresh z is drawn every step either way."""
    if moments is None:  # the VAE may run in half precision (model.frozen_dtype); the latents are float32
        moments = posterior_moments(vae, pixels.to(vae.dtype))
    frame_wise = moments.ndim == 5 and not is_video_vae(vae)  # a frame-wise VAE's clips: the frames as a batch
    flat = moments.flatten(0, 1) if frame_wise else moments
    z = DiagonalGaussianDistribution(flat.float()).sample()  # the VAE's layout: channels at dim 1
    latents = normalised_latents(vae, z)
    if is_video_vae(vae):
        return _to_vae_layout(latents)
    return latents.unflatten(0, moments.shape[:2]) if frame_wise else latents


@torch.no_grad()
def decode_latents(vae: Autoencoder, latents: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] of scaled latents, in the VAE's dtype, as a pipeline decodes them: latents / scaling_factor
    + shift_factor (StableDiffusion3Pipeline, FluxPipeline); clips (B, F, 3, H, W) of video latents (B, F, C, h, w)
    (CogVideoXPipeline.decode_latents)."""
    shift, scale = latent_shift_and_scale(vae, latents.ndim - 3, latents.ndim)  # channels before (h, w)
    unscaled = (latents / _on(scale, latents) + _on(shift, latents)).to(vae.dtype)
    if is_video_vae(vae):
        return decode(vae, _to_vae_layout(unscaled))
    if latents.ndim == 5:  # a frame-wise VAE: the frames as a batch (SVD's decoder mixes a clip's frames: num_frames)
        frames = {"num_frames": latents.shape[1]} if vae_spec(vae).decodes_clips_together else {}
        return vae.decode(unscaled.flatten(0, 1), **frames).sample.unflatten(0, latents.shape[:2])
    return decode(vae, unpatchified(vae, unscaled))


def _on(value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor | float:
    """A statistic on `like`'s device and dtype (a plain number as it is)."""
    return value.to(like.device, like.dtype) if isinstance(value, torch.Tensor) else value
