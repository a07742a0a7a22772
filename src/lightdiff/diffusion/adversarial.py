"""Adversarial loss terms shared by the autoencoder stage and adversarial distillation. Pure tensor functions."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """1/2 (E[relu(1 - D(x))] + E[relu(1 + D(G(z)))]) (Lim & Ye 2017; the latent-diffusion autoencoder's form)."""
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())


def hinge_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """-E[D(G(z))], the generator's side of the hinge game."""
    return -logits_fake.mean()


def adaptive_weight(
    reconstruction_loss: torch.Tensor,
    generator_loss: torch.Tensor,
    last_layer: torch.Tensor,
    max_weight: float = 1e4,
) -> torch.Tensor:
    """lambda = ||grad_{G_L} L_rec|| / (||grad_{G_L} L_GAN|| + 1e-4) (Esser et al. 2021, "VQGAN", Equation 7).

    Balances the two losses at the decoder's last layer G_L; clamped to [0, max_weight] and detached.
    """
    rec_grad = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(generator_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (gan_grad.norm() + 1e-4)
    return torch.clamp(weight, 0.0, max_weight).detach()


def psnr(images: torch.Tensor, reference: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, per image, for images in [-1, 1] (data_range 2)."""
    mse = (images.float() - reference.float()).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(data_range**2 / mse.clamp_min(1e-12))


def r1_penalty(logits: torch.Tensor, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """E[||grad_x D(x)||^2] on real inputs (Mescheder et al. 2018, "Which training methods for GANs do actually
    converge?", Equation 9, without the gamma / 2, which is the caller's weight); the squared norm is summed over all
    `inputs` (e.g. the feature maps entering each head). Each input must require grad; the graph is kept so the
    penalty itself can be back-propagated."""
    gradients = torch.autograd.grad(logits.sum(), list(inputs), create_graph=True)
    return sum(g.pow(2).flatten(1).sum(dim=1) for g in gradients).mean()
