"""rFID / rKID and PSNR of the shipped shapes VAE, beside reference rows that give the numbers a scale.

    python experiments/autoencoder_shapes/rfid.py [--vae DIR] [--num-images 1000]

Real images: shapes at 16 px with data seed 1 (not the training seed 0). Features: lightdiff's offline FID
substitute (`RandomConvFeatures`, seed 0), so the numbers are on that network's scale, not Inception's. Rows:
a second, independent draw of real images (the floor: sampling noise alone); the VAE's reconstructions (posterior
mean); and two degraded copies of the real images (2x bilinear down-up blur, Gaussian noise sigma 0.1).
Prints a markdown table.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from lightdiff.config import asset
from lightdiff.data import ShapesDataset
from lightdiff.diffusion.adversarial import psnr
from lightdiff.metrics.features import RandomConvFeatures


def shapes(count: int, seed: int) -> torch.Tensor:
    dataset = ShapesDataset(size=count, resolution=16, seed=seed)
    return torch.stack([dataset[i]["pixel_values"] for i in range(count)])  # [-1, 1]


def distances(real: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """(FID, KID) of `other` against `real`, both in [-1, 1]."""
    features = RandomConvFeatures(seed=0)
    fid = FrechetInceptionDistance(feature=features, normalize=True)
    kid = KernelInceptionDistance(feature=features, normalize=True, subset_size=min(1000, len(real)))
    for metric in (fid, kid):
        metric.update((real / 2 + 0.5).clamp(0, 1), real=True)
        metric.update((other / 2 + 0.5).clamp(0, 1), real=False)
    return float(fid.compute()), float(kid.compute()[0])


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vae", default=asset("vae_shapes16"))
    parser.add_argument("--num-images", type=int, default=1000)
    args = parser.parse_args()
    real = shapes(args.num_images, seed=1)
    vae = AutoencoderKL.from_pretrained(args.vae).eval()
    reconstructions = torch.cat(
        [vae.decode(vae.encode(batch).latent_dist.mode()).sample.clamp(-1, 1) for batch in real.split(250)]
    )
    blurred = F.interpolate(F.interpolate(real, scale_factor=0.5, mode="bilinear"), scale_factor=2, mode="bilinear")
    noisy = (real + 0.2 * torch.randn(real.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    rows = {
        "real images, second draw (floor)": shapes(args.num_images, seed=2),
        f"shipped VAE reconstructions ({args.vae.rsplit('/', 1)[-1]})": reconstructions,
        "2x bilinear down-up blur": blurred,
        "Gaussian noise, sigma 0.1 (in [0, 1] units)": noisy,
    }
    print(f"{args.num_images} shapes images (16 px, data seed 1); features: RandomConvFeatures(seed=0)\n")
    print("| images | rFID | rKID | PSNR vs the real images |\n| --- | --- | --- | --- |")
    for name, images in rows.items():
        fid, kid = distances(real, images)
        paired = f"{psnr(images, real).mean():.1f} dB" if "second draw" not in name else "(other images)"
        print(f"| {name} | {fid:.3f} | {kid:.4f} | {paired} |")


if __name__ == "__main__":
    main()
