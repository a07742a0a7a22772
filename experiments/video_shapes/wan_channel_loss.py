"""Where a text-to-video checkpoint's flow-matching loss sits, latent channel by latent channel (a diagnosis of the
Wan rows of experiments/video_shapes): the per-channel mean squared velocity error at fixed noise levels on clips
of the latent cache, beside each channel's std in the VAE's raw latents (AutoencoderKLWan normalises every channel
to unit variance by its `latents_std`, so a channel of small raw spread weighs as much in the loss as a wide one).

    python experiments/video_shapes/wan_channel_loss.py CKPT LATENT_CACHE_FILE [--clips 128]
"""

from __future__ import annotations

import argparse
import json

import torch

from lightdiff.nets.denoiser import network_output
from lightdiff.nets.vae import encode_latents
from lightdiff.trained import load_denoiser

LEVELS = (0.1, 0.3, 0.5, 0.7, 0.9)  # flow times t (x_t = (1 - t) x0 + t noise)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("cache")
    parser.add_argument("--clips", type=int, default=128)
    args = parser.parse_args()
    trained = load_denoiser(args.checkpoint)
    cache = torch.load(args.cache, map_location="cpu", weights_only=False)
    moments = cache["moments"][: args.clips].float()
    texts = cache["texts"][: args.clips]
    torch.manual_seed(0)
    x0 = encode_latents(trained.vae, None, moments)  # as the training step draws them
    channel_axis = 2 if x0.ndim == 5 else 1  # a clip's latents are (B, F, C, H, W)
    condition = trained.conditioning({"text": texts})
    rows = {}
    for level in LEVELS:
        noise = torch.randn_like(x0)
        x_t = (1 - level) * x0 + level * noise
        output = network_output(trained.net, x_t, torch.full((len(x0),), level * 1000.0), condition)
        error = (output.float() - (noise - x0)).pow(2)
        rows[level] = error.transpose(0, channel_axis).flatten(1).mean(dim=1).tolist()
    raw_std = [float(s) for s in trained.vae.config.latents_std]
    result = {"checkpoint": args.checkpoint, "clips": len(x0), "raw_latent_std": raw_std, "mse_by_level": rows}
    mean = torch.tensor([rows[level] for level in LEVELS]).mean(dim=0)
    order = torch.tensor(raw_std).argsort()
    result["channels_by_raw_std"] = [
        {"channel": int(c), "raw_std": raw_std[c], "mse_mean_over_levels": float(mean[c])} for c in order
    ]
    share = mean / mean.sum()
    narrow = order[: len(order) // 2]
    result["loss_share_of_the_narrower_half"] = float(share[narrow].sum())
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
