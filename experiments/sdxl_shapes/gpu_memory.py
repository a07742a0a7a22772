"""Peak GPU memory of one training step of a real-size SDXL UNet (random weights) with each memory option
(issue 17, point 6): a stage of experiments/gpu_checks/run.sh for a lent GPU.

    python experiments/sdxl_shapes/gpu_memory.py [--resolution 1024] [--batch 1] [--smoke]

Each option is measured in a fresh state of the same process: the UNet (SDXL base 1.0's config, experiments/
sdxl_shapes/memory.py) in fp32 with bf16 autocast as trainer=gpu trains, AdamW (or the option's optimiser), one
warm-up step and one measured step on random latents and text states; torch.cuda.max_memory_allocated over the
measured step. The frozen encoders and the VAE are not in this step (their savings are counted in memory.md).
--smoke runs the same code on a CPU with a tiny UNet (no memory figure): the plumbing only.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import time
from collections.abc import Callable

import torch
from diffusers import UNet2DConditionModel
from diffusers.training_utils import EMAModel
from memory import UNET  # this folder's memory.py (the script's folder is on sys.path)

TINY = dict(
    UNET,
    block_out_channels=[32, 64, 64],
    transformer_layers_per_block=[1, 1, 1],
    attention_head_dim=[2, 4, 4],
    cross_attention_dim=64,
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=80,
    norm_num_groups=16,
)
OPTIONS = ("adamw", "gradient_checkpointing", "adamw_8bit", "adafactor", "ema_on_gpu", "ema_offloaded")


def step_memory(option: str, device: torch.device, resolution: int, batch: int, smoke: bool) -> str:
    config = TINY if smoke else UNET
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).to(device).train()
    if option == "gradient_checkpointing":
        unet.enable_gradient_checkpointing()
    parameters = list(unet.parameters())
    if option == "adamw_8bit":
        if importlib.util.find_spec("bitsandbytes") is None or device.type != "cuda":
            return "not measured (bitsandbytes with CUDA not installed)"
        import bitsandbytes

        optimizer = bitsandbytes.optim.AdamW8bit(parameters, lr=1e-5)
    elif option == "adafactor":
        optimizer = torch.optim.Adafactor(parameters, lr=1e-5)
    else:
        optimizer = torch.optim.AdamW(parameters, lr=1e-5)
    ema = EMAModel(parameters, foreach=True) if option.startswith("ema") else None
    if ema is not None:
        ema.to(device="cpu" if option == "ema_offloaded" else device)
    latents, states, added = sdxl_inputs(config, resolution, batch, device, torch.float32)

    def one_step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = unet(latents, torch.full((batch,), 500, device=device), states, added_cond_kwargs=added).sample
        out.float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            if option == "ema_offloaded":
                ema.to(device=device)
            ema.step(parameters)
            if option == "ema_offloaded":
                ema.to(device="cpu")

    return peak_and_time(one_step, device)


def sdxl_inputs(
    config: dict, resolution: int, batch: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Random latents, text states and SDXL's added conditions (pooled text, size / crop ids) for `config`'s UNet."""
    side = resolution // 8
    latents = torch.randn(batch, 4, side, side, device=device, dtype=dtype)
    states = torch.randn(batch, 77, config["cross_attention_dim"], device=device, dtype=dtype)
    pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    added = {
        "text_embeds": torch.randn(batch, pooled, device=device, dtype=dtype),
        "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch, device=device),
    }
    return latents, states, added


def peak_and_time(one_step: Callable[[], None], device: torch.device) -> str:
    """One warm-up step (the optimiser's state exists after it), then the measured one: CUDA's peak memory over it
    and its wall time."""
    one_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    one_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        figure = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB peak"
    else:
        figure = "no CUDA: plumbing only"
    return f"{figure}, {time.perf_counter() - started:.2f} s/step"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    resolution = 64 if args.smoke else args.resolution
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"SDXL UNet training step, {resolution} px, batch {args.batch}, bf16 autocast, fp32 weights, on {name}\n")
    print("| option | peak memory, time |\n| --- | --- |")
    for option in OPTIONS:
        print(f"| {option} | {step_memory(option, device, resolution, args.batch, args.smoke)} |", flush=True)
        gc.collect()  # the option's networks and states are gone before the next one's peak is measured
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
