"""Model FLOPs utilisation (MFU) of a training step of a Stable-Diffusion-size UNet2DConditionModel at 256 px
(32x32 latents), from cached latents and text states (no VAE or text encoder in the step, as with
`data.cache_latents=true`).

    python experiments/mfu/benchmark.py [--batch 32] [--steps 30] [--warmup 10] [--peak-tflops auto]
        [--no-compile] [--count-only]

FLOPs of one step (forward + backward) are counted by `torch.utils.flop_counter.FlopCounterMode` (matmuls and
convolutions; a multiply-add counts 2) on the meta device, so the count runs anywhere. The step is lightdiff's speed
path: bf16 autocast with fp32 weights (Lightning's bf16-mixed), channels_last, cuDNN autotuning, fused AdamW,
`torch.compile` (regional: the UNet's transformer blocks, lightdiff.speed.compile_denoiser), SDPA attention.
MFU = FLOPs per step / seconds per step / the GPU's dense bf16 peak (H100 SXM 989 TFLOPS, H100 PCIe 756,
A100 312). Published anchor: MosaicML's SD2 training reached about 28% of A100 peak; our goal on H100 is >= 40%.
`--count-only` (or no GPU) prints the FLOP count and no MFU: a CPU has no comparable bf16 peak.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

from lightdiff.speed import prepare_for_training

# Stable Diffusion 2 (base) UNet: 865M parameters; 4 latent channels, OpenCLIP-H text states of width 1024.
SD2_UNET = {
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "layers_per_block": 2,
    "attention_head_dim": (5, 10, 20, 20),
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
}
TEXT_TOKENS = 77
PEAK_TFLOPS = {"H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 PCIe": 756.0, "H200": 989.4, "A100": 312.0}


def step_inputs(batch: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    latents = torch.randn(batch, 4, 32, 32, device=device)
    timesteps = torch.randint(0, 1000, (batch,), device=device)
    text_states = torch.randn(batch, TEXT_TOKENS, 1024, device=device)
    return latents, timesteps, text_states


def flops_per_step(batch: int) -> int:
    with torch.device("meta"):
        net = UNet2DConditionModel(**SD2_UNET)
        latents, timesteps, text_states = step_inputs(batch, "meta")
    counter = FlopCounterMode(display=False)
    with counter:
        net(latents, timesteps, encoder_hidden_states=text_states).sample.square().mean().backward()
    return counter.get_total_flops()


def peak_for(name: str, given: str) -> float:
    if given != "auto":
        return float(given)
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    raise SystemExit(f"no bf16 peak known for {name!r}: pass --peak-tflops")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--peak-tflops", default="auto")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--count-only", action="store_true")
    args = parser.parse_args()
    flops = flops_per_step(args.batch)
    with torch.device("meta"):
        parameters = sum(p.numel() for p in UNet2DConditionModel(**SD2_UNET).parameters())
    print(f"SD2-size UNet2DConditionModel: {parameters / 1e6:.0f}M parameters, 32x32 latents, {TEXT_TOKENS} tokens")
    per_image = flops / args.batch / 1e9
    print(f"FLOPs per training step at batch {args.batch}: {flops / 1e12:.2f} TFLOP ({per_image:.0f} GFLOP/image)")
    if args.count_only or not torch.cuda.is_available():
        print("MFU: not measured (no GPU)")
        return
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    peak = peak_for(name, args.peak_tflops)
    torch.backends.cudnn.benchmark = True  # as lightdiff's trainer.benchmark on CUDA
    torch.manual_seed(0)
    net = UNet2DConditionModel(**SD2_UNET).to(device).train()
    prepare_for_training(net, compile=not args.no_compile, channels_last=True, gradient_checkpointing=False)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
    latents, timesteps, text_states = step_inputs(args.batch, device)
    times = []
    for step in range(args.warmup + args.steps):
        torch.cuda.synchronize(device)
        started = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            prediction = net(latents, timesteps, encoder_hidden_states=text_states).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), latents)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - started)
    seconds = statistics.median(times)
    achieved = flops / seconds / 1e12
    print(
        f"{name}, torch {torch.__version__}, CUDA {torch.version.cuda}, compile {not args.no_compile}: "
        f"{seconds * 1e3:.1f} ms/step, {args.batch / seconds:.1f} images/s, {achieved:.1f} TFLOP/s = "
        f"{100 * achieved / peak:.1f}% of {peak} TFLOPS bf16 peak; peak memory "
        f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
    )


if __name__ == "__main__":
    main()
