"""What LoRA saves, counted: trainable parameters, optimiser state and (turbo) the student's copy of the teacher.

    python experiments/lora_shapes/memory.py [--rank 8] [--shapes-teacher CKPT]

The networks are built on PyTorch's meta device (shapes, no memory) from the published UNet configurations
(`UNet2DConditionModel` arguments of SD 1.5, SD 2.1 and SDXL's unet/config.json) and lightdiff's shapes UNet, with the
same peft adapters `model.lora.rank` adds (the attention preset). Bytes are fp32 with AdamW (two moments per
trained parameter) and an EMA of what trains; activations are not counted (they do not depend on LoRA).
"""

from __future__ import annotations

import argparse

import torch
from diffusers import UNet2DConditionModel

from lightdiff.nets.lora import LoraSettings, adapter_parameters, add_adapters, lora_config

SD15 = dict(cross_attention_dim=768)  # UNet2DConditionModel's defaults are SD 1.x's UNet but for the text width
SD21 = dict(cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True)
SDXL = dict(
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[320, 640, 1280],
    transformer_layers_per_block=[1, 2, 10],
    cross_attention_dim=2048,
    attention_head_dim=[5, 10, 20],
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    sample_size=128,
)
SHAPES = dict(  # conf/net/unet_cond_tiny.yaml: the shapes teacher of experiments/latent_shapes
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=[64, 128],
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    layers_per_block=1,
    cross_attention_dim=64,
    attention_head_dim=8,
    norm_num_groups=16,
)
NETWORKS = {"shapes UNet (unet_cond_tiny)": SHAPES, "SD 1.5 UNet": SD15, "SD 2.1 UNet": SD21, "SDXL UNet": SDXL}
GIB = 2**30


def counts(config: dict, rank: int) -> tuple[int, int]:
    """(base parameters, adapter parameters) of the UNet with the attention preset at `rank`."""
    with torch.device("meta"):
        net = UNet2DConditionModel(**config)
        base = sum(p.numel() for p in net.parameters())
        add_adapters(net, lora_config(net, LoraSettings(rank=rank)))
    return base, sum(p.numel() for p in adapter_parameters(net))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    bytes_per = 4  # fp32
    print(f"LoRA rank {args.rank}, attention preset (to_q, to_k, to_v, to_out.0); fp32, AdamW, EMA of what trains\n")
    print(
        "| network | parameters | adapters | adapters / base | fine-tune: full (weights + grads + Adam + EMA) | "
        "LoRA (frozen base + adapters' 5 copies) | turbo: full student + teacher | LoRA student (one network) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, config in NETWORKS.items():
        base, adapters = counts(config, args.rank)
        full_finetune = 5 * base  # weights, gradients, 2 Adam moments, EMA
        lora_finetune = base + 5 * adapters
        full_turbo = base + 5 * base  # the frozen teacher + a student trained as above
        lora_turbo = base + 5 * adapters  # one network: adapters off = teacher, on = student
        print(
            f"| {name} | {base / 1e6:.1f}M | {adapters / 1e6:.2f}M | {adapters / base:.2%} | "
            f"{full_finetune * bytes_per / GIB:.2f} GiB | {lora_finetune * bytes_per / GIB:.2f} GiB | "
            f"{full_turbo * bytes_per / GIB:.2f} GiB | {lora_turbo * bytes_per / GIB:.2f} GiB "
            f"({lora_turbo / full_turbo:.0%}) |"
        )


if __name__ == "__main__":
    main()
