"""Probe: does diffusers' CogVideoXTransformer3DModel learn the shapes image task the MMDiT learns, in one plain
training loop outside lightdiff (no Lightning, no lightdiff objective or conditioning code)?

Task: 16 px shapes images (lightdiff.data.shapes) as one-frame clips on the shipped 16 px shapes VAE's latents
(8x8x4), rectified flow (x_t = (1 - t) x0 + t eps, v = eps - x0, logit-normal t, timestep = 1000 t), AdamW, a caption
as three fixed random word vectors (the same for both nets), 10% dropped to zeros for guidance. Judged: 256 images,
Euler 28 steps, guidance 4, by lightdiff's shapes metric. Run from the repository root:
    python experiments/video_shapes/probe_cogvideox.py --net mmdit --steps 1000
    python experiments/video_shapes/probe_cogvideox.py --net cogvideox --steps 1000 [--no-qk-norm]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLCogVideoX,
    CogVideoXDDIMScheduler,
    CogVideoXTransformer3DModel,
    SD3Transformer2DModel,
)

from lightdiff.data.moving_shapes import moving_shapes_clip
from lightdiff.data.shapes import shapes_sample
from lightdiff.metrics.motion import motion_metric
from lightdiff.metrics.shapes import shapes_metric
from lightdiff.nets.families import family_of

TEXT_DIM = 64
SHAPES_VAE, VIDEO_VAE = "src/lightdiff/assets/vae_shapes16", "src/lightdiff/assets/vae_moving_shapes"


def build(net: str, task: str, width: int, layers: int, qk_norm: bool) -> torch.nn.Module:
    heads = 4
    words = 3 if task == "shapes" else 5
    if net == "mmdit":
        model = SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=layers, num_attention_heads=heads,
            attention_head_dim=width // heads, caption_projection_dim=width, joint_attention_dim=TEXT_DIM,
            pooled_projection_dim=TEXT_DIM, pos_embed_max_size=8,
        )  # fmt: skip
    else:
        channels = 4 if task == "shapes" else 16
        model = CogVideoXTransformer3DModel(
            num_attention_heads=heads, attention_head_dim=width // heads, in_channels=channels,
            out_channels=channels, time_embed_dim=width, text_embed_dim=TEXT_DIM, num_layers=layers, sample_width=8,
            sample_height=8, sample_frames=1 if task == "shapes" else 9, patch_size=2,
            temporal_compression_ratio=1 if task == "shapes" else 4, max_text_seq_length=words,
        )  # fmt: skip
        if not qk_norm:  # diffusers has no switch: drop the per-head LayerNorms of q and k
            for block in model.transformer_blocks:
                block.attn1.norm_q = None
                block.attn1.norm_k = None
    return family_of(model).initialise(model)


def cogvideox_scheduler() -> CogVideoXDDIMScheduler:
    """THUDM/CogVideoX-2b's scheduler settings (its scheduler_config.json)."""
    return CogVideoXDDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True,
        snr_shift_scale=3.0, prediction_type="v_prediction", timestep_spacing="trailing", clip_sample=False,
        set_alpha_to_one=True, steps_offset=0,
    )  # fmt: skip


def predict(model: torch.nn.Module, x_t: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """The network's output for x_t (images (B, C, H, W) or clips (B, F, C, H, W)) at `timestep` (0..1000)."""
    if isinstance(model, SD3Transformer2DModel):
        return model(x_t, encoder_hidden_states=text, pooled_projections=text.mean(1), timestep=timestep).sample
    if x_t.ndim == 4:
        return model(x_t[:, None], encoder_hidden_states=text, timestep=timestep).sample[:, 0]
    return model(x_t, encoder_hidden_states=text, timestep=timestep).sample


@torch.no_grad()
def make_pool(task: str, size: int) -> tuple[torch.nn.Module, torch.Tensor, list[str]]:
    """(VAE, posterior parameters of `size` data items in the denoiser's layout, captions)."""
    if task == "shapes":
        vae = AutoencoderKL.from_pretrained(SHAPES_VAE).eval()
        samples = [shapes_sample(0, index, 16) for index in range(size)]
        pixels = torch.from_numpy(np.stack([np.asarray(image) for image, _, _ in samples])).permute(0, 3, 1, 2)
        pixels = pixels.float() / 127.5 - 1
        posterior = torch.cat([vae.encode(chunk).latent_dist.parameters for chunk in pixels.split(512)])
        return vae, posterior, [caption for _, _, caption in samples]
    vae = AutoencoderKLCogVideoX.from_pretrained(VIDEO_VAE).eval()
    clips = [moving_shapes_clip(0, index, 32, 9) for index in range(size)]
    pixels = torch.stack([frames for frames, _, _ in clips])  # (N, F, 3, H, W)
    parts = [vae.encode(chunk.transpose(1, 2)).latent_dist.parameters for chunk in pixels.split(64)]
    return vae, torch.cat(parts).transpose(1, 2), [caption for _, _, caption in clips]  # (N, F', 2C, h, w)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--net", choices=["mmdit", "cogvideox"], required=True)
    parser.add_argument("--task", choices=["shapes", "moving"], default="shapes")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=7)
    parser.add_argument("--pool", type=int, default=8192)
    parser.add_argument("--objective", choices=["flow", "cogvideox"], default="flow")
    parser.add_argument("--no-qk-norm", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.time()
    vae, posterior, captions = make_pool(args.task, args.pool)
    print(f"pool of {args.pool} encoded in {time.time() - start:.0f} s", flush=True)
    vocabulary = sorted({word for caption in captions for word in caption.split()})
    words = len(captions[0].split())
    word_vectors = torch.randn(len(vocabulary), TEXT_DIM, generator=torch.Generator().manual_seed(1))
    position_vectors = torch.randn(words, TEXT_DIM, generator=torch.Generator().manual_seed(2)) * 0.5

    def text_states(batch_captions: list[str]) -> torch.Tensor:
        rows = [torch.stack([word_vectors[vocabulary.index(w)] for w in c.split()]) for c in batch_captions]
        return torch.stack(rows) + position_vectors

    all_text = text_states(captions)
    model = build(args.net, args.task, args.width, args.layers, qk_norm=not args.no_qk_norm)
    parameters = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    scale = vae.config.scaling_factor
    scheduler = cogvideox_scheduler()
    channel_dim = posterior.ndim - 3
    losses, start = [], time.time()
    for step in range(args.steps):
        index = torch.randint(0, args.pool, (args.batch,))
        mean, logvar = posterior[index].chunk(2, dim=channel_dim)
        x0 = (mean + torch.randn_like(mean) * (0.5 * logvar).exp()) * scale
        text = all_text[index] * (torch.rand(args.batch, 1, 1) > 0.1)
        noise = torch.randn_like(x0)
        if args.objective == "flow":  # rectified flow, logit-normal t (SD3)
            t = torch.sigmoid(torch.randn(args.batch))
            t_b = t.view(-1, *[1] * (x0.ndim - 1))
            x_t = (1 - t_b) * x0 + t_b * noise
            loss = torch.nn.functional.mse_loss(predict(model, x_t, t * 1000, text), noise - x0)
        else:  # diffusers examples/cogvideo/train_cogvideox_lora.py: v-prediction as an x0 loss, weight 1 / (1 - abar)
            timesteps = torch.randint(0, 1000, (args.batch,))
            x_t = scheduler.add_noise(x0, noise, timesteps)
            predicted_x0 = scheduler.get_velocity(predict(model, x_t, timesteps, text), x_t, timesteps)
            weights = (1 / (1 - scheduler.alphas_cumprod[timesteps])).view(-1, *[1] * (x0.ndim - 1))
            loss = (weights * (predicted_x0 - x0) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            print(f"step {step + 1} loss {np.mean(losses[-100:]):.4f} ({time.time() - start:.0f} s)", flush=True)
    train_seconds = time.time() - start
    model.eval()
    classes = sorted(set(captions))
    judged = [classes[i % len(classes)] for i in range(256)]
    x = torch.randn(256, *posterior.shape[1:channel_dim], mean.shape[channel_dim], *posterior.shape[-2:],
                    generator=torch.Generator().manual_seed(3))  # fmt: skip
    text = text_states(judged)
    grid = torch.linspace(1, 0, 29)
    scheduler.set_timesteps(50)
    with torch.no_grad():
        if args.objective == "flow":  # Euler, 28 steps
            for t_now, t_next in zip(grid[:-1], grid[1:], strict=True):
                timestep = (t_now * 1000).expand(256)
                conditional = predict(model, x, timestep, text)
                unconditional = predict(model, x, timestep, torch.zeros_like(text))
                x = x + (t_next - t_now) * (unconditional + 4 * (conditional - unconditional))
        else:  # CogVideoXPipeline's DDIM, 50 trailing steps
            for timestep in scheduler.timesteps:
                conditional = predict(model, x, timestep.expand(256), text)
                unconditional = predict(model, x, timestep.expand(256), torch.zeros_like(text))
                x = scheduler.step(unconditional + 4 * (conditional - unconditional), timestep, x).prev_sample
        if args.task == "shapes":
            images = vae.decode(x / scale).sample.clamp(-1, 1)
            uint8 = ((images + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
            metrics = shapes_metric(uint8, prompts=judged)
        else:
            clips = torch.cat([vae.decode(chunk.transpose(1, 2) / scale).sample for chunk in x.split(32)])
            uint8 = ((clips.transpose(1, 2).clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 1, 3, 4, 2).numpy()
            metrics = motion_metric(uint8, prompts=judged)
    result = {
        **vars(args), "parameters": parameters, "final_loss": float(np.mean(losses[-100:])),
        "train_seconds": train_seconds, **metrics,
    }  # fmt: skip
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
