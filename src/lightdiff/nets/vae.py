"""The latent space of a frozen diffusers `AutoencoderKL`, as its pipelines use it (Rombach et al. 2022, Section 3)."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution


def vae_scale_factor(vae: AutoencoderKL) -> int:
    """Pixels per latent along each side: 2 ** (number of down-sampling levels), as diffusers' pipelines compute it."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def encode_latents(
    vae: AutoencoderKL, pixels: torch.Tensor | None, moments: torch.Tensor | None = None
) -> torch.Tensor:
    """z ~ q(z | x), scaled by the VAE's scaling factor; from cached posterior `moments` (data.cache_latents) when
    given, so a fresh z is drawn every step either way."""
    posterior = DiagonalGaussianDistribution(moments) if moments is not None else vae.encode(pixels).latent_dist
    return posterior.sample() * vae.config.scaling_factor


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] of scaled latents, in the VAE's dtype (as a pipeline decodes them)."""
    return vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample
