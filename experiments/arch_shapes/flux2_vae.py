"""The shipped 16 px shapes VAE as FLUX.2's VAE class (`AutoencoderKLFlux2`), for net=flux2_tiny on shapes.

    python experiments/arch_shapes/flux2_vae.py [--images 4096]   # writes src/lightdiff/assets/vae_shapes16_flux2

FLUX.2's VAE is a KL autoencoder (diffusers' same Encoder / Decoder) whose latents its pipelines cut into 2x2 patches
and normalise per patch channel by the running statistics of a BatchNorm (`bn`, no affine part) kept in the VAE. This
takes the shapes VAE's weights unchanged and estimates those statistics as FLUX.2's were: the mean and variance of the
patchified posterior samples z of training images (shapes data, seed 0, the first `--images`). Prints the resulting
latents' overall mean and standard deviation (about 0 and 1 by construction) and the spread of the channels'.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import AutoencoderKL, AutoencoderKLFlux2

from lightdiff.data import ShapesDataset
from lightdiff.nets.vae import encode_latents, patchified, posterior

ASSETS = Path(__file__).resolve().parents[2] / "src" / "lightdiff" / "assets"
ARCHITECTURE = (
    *("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels"),
    *("layers_per_block", "act_fn", "latent_channels", "norm_num_groups", "sample_size"),
    *("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"),
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=ASSETS / "vae_shapes16_flux2")
    args = parser.parse_args()
    torch.manual_seed(0)
    source = AutoencoderKL.from_pretrained(ASSETS / "vae_shapes16").eval()
    vae = AutoencoderKLFlux2(**{key: source.config[key] for key in ARCHITECTURE}).eval()
    missing, unexpected = vae.load_state_dict(source.state_dict(), strict=False)
    assert set(missing) == {"bn.running_mean", "bn.running_var"} and not unexpected, (missing, unexpected)
    dataset = ShapesDataset(size=args.images, resolution=int(source.config.sample_size), seed=0)
    patches = []
    with torch.no_grad():
        for start in range(0, args.images, 256):
            pixels = torch.stack([dataset[i]["pixel_values"] for i in range(start, min(start + 256, args.images))])
            patches.append(patchified(vae, posterior(vae, pixels).sample()))
    z = torch.cat(patches).transpose(0, 1).flatten(1)  # (channels, samples x positions)
    vae.bn.running_mean.copy_(z.mean(dim=1))
    vae.bn.running_var.copy_(z.var(dim=1))
    vae.save_pretrained(args.out)
    check = AutoencoderKLFlux2.from_pretrained(args.out).eval()
    with torch.no_grad():
        latents = encode_latents(check, torch.stack([dataset[i]["pixel_values"] for i in range(256)]))
    per_channel = latents.transpose(0, 1).flatten(1).std(dim=1)
    print(f"wrote {args.out}: {vae.bn.running_mean.numel()} patch channels from {args.images} images")
    print(
        f"latents of 256 images: mean {latents.mean():.3f}, std {latents.std():.3f}, per-channel std "
        f"{per_channel.min():.3f}..{per_channel.max():.3f}"
    )


if __name__ == "__main__":
    main()
