"""How every diffusers denoiser is called: the noisy input first, the timestep as `timestep=`, and the keyword
arguments its family's conditioning makes. What differs between families (FLUX's packed tokens and position ids,
CogVideoX's rotary embeddings, SVD's concatenated frame latent) is each family's `output`
(`lightdiff.nets.families`)."""

from __future__ import annotations

import torch

from lightdiff.nets.families import Condition, family_of


def network_output(
    net: torch.nn.Module,  # a denoiser of a registered family
    x_t: torch.Tensor,  # (B, C, H, W) noisy input; a clip's (B, F, C, H, W)
    timesteps: torch.Tensor,  # (B,) or a scalar: the network's timestep (DDPM: 0..T-1; flow matching: t * 1000)
    condition: Condition,  # the conditioning's keyword arguments for this batch
) -> torch.Tensor:
    """The network's prediction for x_t, shaped like x_t: the one place a denoiser is called.

    The timestep is expanded to one per sample, as the transformer pipelines pass it; a UNet expands a scalar the
    same way itself, so its output is the pipeline's to the bit."""
    if timesteps.ndim == 0:
        timesteps = timesteps.expand(x_t.shape[0])
    return family_of(net).output(net, x_t, timesteps, condition)


def image_tokens(net: torch.nn.Module, height: int, width: int) -> int:
    """Image tokens of latents `height` x `width` (the sequence length resolution-dependent timestep shifts are
    computed from, FluxPipeline's `image_seq_len`)."""
    patch = family_of(net).token_side(net)
    return (height // patch) * (width // patch)
