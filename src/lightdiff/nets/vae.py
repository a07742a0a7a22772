"""The latent space of a frozen diffusers `AutoencoderKL`, as its pipelines use it (Rombach et al. 2022, Section 3).

Latents are (z - shift_factor) * scaling_factor: SD 1.x / 2.x / SDXL VAEs have no shift (None), SD3's and FLUX's
16-channel VAEs do (their pipelines encode and decode with both), so a latent model sees zero-mean, unit-variance
latents either way."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution


def vae_scale_factor(vae: AutoencoderKL) -> int:
    """Pixels per latent along each side: 2 ** (number of down-sampling levels), as diffusers' pipelines compute it."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latent_shift(vae: AutoencoderKL) -> float:
    """The VAE's `shift_factor` (the latents' mean, taken off before scaling); 0 for VAEs without one."""
    return float(vae.config.get("shift_factor") or 0.0)


def frozen_vae_dtype(vae: AutoencoderKL, dtype: torch.dtype) -> torch.dtype:
    """The dtype a frozen VAE runs in when `dtype` is asked for: float16 overflows in SD's and SDXL's VAEs (their
    configs say `force_upcast`), so they stay float32 then, as diffusers' pipelines upcast them; bfloat16 has float32's
    range and is kept."""
    if dtype == torch.float16 and vae.config.get("force_upcast", False):
        return torch.float32
    return dtype


@torch.no_grad()
def encode_latents(
    vae: AutoencoderKL, pixels: torch.Tensor | None, moments: torch.Tensor | None = None
) -> torch.Tensor:
    """(z - shift_factor) * scaling_factor, z ~ q(z | x), as StableDiffusion3Pipeline and FluxPipeline's training
    scripts encode; from cached posterior `moments` (data.cache_latents) when given, so a fresh z is drawn every step
    either way."""
    if moments is None:  # the VAE may run in half precision (model.frozen_dtype); the latents are float32
        moments = vae.encode(pixels.to(vae.dtype)).latent_dist.parameters.float()
    latents = DiagonalGaussianDistribution(moments.float()).sample()
    return (latents - latent_shift(vae)) * vae.config.scaling_factor


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] of scaled latents, in the VAE's dtype, as a pipeline decodes them: latents / scaling_factor
    + shift_factor (StableDiffusion3Pipeline, FluxPipeline)."""
    return vae.decode((latents / vae.config.scaling_factor + latent_shift(vae)).to(vae.dtype)).sample
