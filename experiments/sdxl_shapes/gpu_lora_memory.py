"""Peak GPU memory and time of one LoRA training step on a real-size SDXL UNet (random weights) with its frozen base
at full precision and in each low-precision store (issue 47: `model.base_quantization`, `model.base_storage`): a
stage of experiments/gpu_checks/run.sh for a lent GPU.

    python experiments/sdxl_shapes/gpu_lora_memory.py [--resolution 1024] [--batch 1] [--rank 32] [--smoke]

Each option in a fresh state of the same process: the UNet (SDXL base 1.0's config, experiments/sdxl_shapes/
memory.py) in bf16, LoRA at `--rank` on lightdiff's preset (nets/lora.adapt: attention projections), the base then
stored as the option says by lightdiff's own code (nets/low_precision.store_frozen_base), AdamW on the adapters, bf16
autocast; one warm-up step and one measured step on random latents and text states, torch.cuda.max_memory_allocated
over the measured step (the weights included). --smoke runs the same code on a CPU with a tiny UNet (no memory
figure): the plumbing only.
"""

from __future__ import annotations

import argparse
import gc

import torch
from diffusers import UNet2DConditionModel
from gpu_memory import TINY, peak_and_time, sdxl_inputs  # this folder's (the script's folder is on sys.path)
from memory import UNET

from lightdiff.nets.lora import LoraSettings, adapt, adapter_parameters
from lightdiff.nets.low_precision import check_base_precision, store_frozen_base

OPTIONS = {  # name: (model.base_quantization, model.base_storage)
    "bf16 base": ("none", "none"),
    "int8": ("int8", "none"),
    "nf4": ("nf4", "none"),
    "fp8 storage": ("none", "fp8"),
}


def step_memory(option: str, device: torch.device, resolution: int, batch: int, rank: int, smoke: bool) -> str:
    quantization, storage = OPTIONS[option]
    try:
        check_base_precision(quantization, storage, base_trains=False)
    except Exception as error:  # noqa: BLE001 - a missing package: the row says why
        return f"not measured ({error})"
    config = TINY if smoke else UNET
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    unet = UNet2DConditionModel(**config).to(device, dtype)
    adapt(unet, LoraSettings(rank=rank), base_source="random weights")
    for parameter in adapter_parameters(unet):  # the adapters train in fp32 (as the methods keep them)
        parameter.data = parameter.data.float()
    store_frozen_base(unet, quantization, storage)
    optimizer = torch.optim.AdamW(adapter_parameters(unet), lr=1e-4)
    latents, states, added = sdxl_inputs(config, resolution, batch, device, dtype)

    def one_step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = unet(latents, torch.full((batch,), 500, device=device), states, added_cond_kwargs=added).sample
        out.float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return peak_and_time(one_step, device)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    resolution = 64 if args.smoke else args.resolution
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"SDXL UNet LoRA step (rank {args.rank}), {resolution} px, batch {args.batch}, on {name}\n")
    print("| frozen base | peak memory, time |\n| --- | --- |")
    for option in OPTIONS:
        figure = step_memory(option, device, resolution, args.batch, args.rank, args.smoke)
        print(f"| {option} | {figure} |", flush=True)
        gc.collect()  # the option's networks and states are gone before the next one's peak is measured
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
