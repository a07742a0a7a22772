"""Memory of LoRA on Wan 2.1 and Wan 2.2 A14B, counted on PyTorch's meta device (shapes, no weights, no download).

    python experiments/video_shapes/wan_memory.py [--rank 32] > experiments/video_shapes/wan_memory.md

The transformers are diffusers' `WanTransformer3DModel` at the published configurations (Wan-AI's transformer/
config.json of Wan2.1-T2V-1.3B, Wan2.1-T2V-14B, Wan2.1-I2V-14B and Wan2.2-T2V-A14B, whose two experts are each the
14B transformer), with the adapters `model.lora.rank` adds (lightdiff's preset for transformers: every attention
projection and the MLP of every block). The UMT5-XXL text encoder is `UMT5EncoderModel` at umt5-xxl's size.
Bytes: the frozen base in bf16 (`model.frozen_dtype`), what trains in fp32 with its gradient, AdamW's two moments and
an EMA (5 copies). Activations are not counted (they depend on the clip's length and on checkpointing, not on LoRA).
"""

from __future__ import annotations

import argparse

import torch
from diffusers import WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

from lightdiff.nets.families.wan import Expert, WanExperts
from lightdiff.nets.lora import LoraSettings, adapter_parameters, add_adapters, is_adapter_key, lora_config

COMMON = dict(patch_size=(1, 2, 2), attention_head_dim=128, freq_dim=256, text_dim=4096, cross_attn_norm=True)
T2V_1_3B = dict(COMMON, num_attention_heads=12, ffn_dim=8960, num_layers=30, in_channels=16, out_channels=16)
T2V_14B = dict(COMMON, num_attention_heads=40, ffn_dim=13824, num_layers=40, in_channels=16, out_channels=16)
I2V_14B = dict(T2V_14B, in_channels=36, image_dim=1280, added_kv_proj_dim=5120)  # Wan 2.1: CLIP image tokens
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)
# (name, transformer config, experts): Wan 2.2 A14B holds a high-noise and a low-noise 14B expert
NETWORKS = [
    ("Wan 2.1 T2V 1.3B", T2V_1_3B, 1),
    ("Wan 2.1 T2V 14B", T2V_14B, 1),
    ("Wan 2.1 I2V 14B", I2V_14B, 1),
    ("Wan 2.2 T2V A14B", T2V_14B, 2),
]
GIB = 2**30


def resident_bytes(config: dict, experts: int, train_expert: Expert, rank: int) -> tuple[int, int, int]:
    """(base parameters of one expert, adapter parameters, resident bytes) of lightdiff's net with LoRA at `rank`:
    the transformer, or Wan 2.2's `WanExperts` with `model.train_expert` (adapters on the experts that train only,
    the other expert resident in bf16 for previews and the export)."""
    with torch.device("meta"):
        net = WanTransformer3DModel(**config)
        if experts == 2:
            net = WanExperts(net, WanTransformer3DModel(**config), trains=train_expert)
        add_adapters(net, lora_config(net, LoraSettings(rank=rank)))
        base = sum(p.numel() for n, p in net.named_parameters() if not is_adapter_key(n))
        adapters = sum(p.numel() for p in adapter_parameters(net))
    return base // experts, adapters, 2 * base + 5 * 4 * adapters


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, default=32)
    args = parser.parse_args()
    with torch.device("meta"):
        text = sum(p.numel() for p in UMT5EncoderModel(UMT5Config(**UMT5_XXL)).parameters())
    print(f"LoRA rank {args.rank} on attention and MLPs; base bf16, what trains fp32 x 5 (weights, grads, Adam, EMA)\n")
    print(
        "| model | transformer parameters (each expert) | adapters (each expert) | full fine-tune of one expert | "
        "LoRA | LoRA on one expert, the other resident (model.train_expert) | LoRA on both experts in one run |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, config, experts in NETWORKS:
        base, adapters, one = resident_bytes(config, 1, "both", args.rank)
        full = 5 * 4 * base  # every weight trains in fp32
        pair = [f"{resident_bytes(config, 2, which, args.rank)[2] / GIB:.1f} GiB" for which in ("low_noise", "both")]
        pair = pair if experts == 2 else ["(one expert)", "(one expert)"]
        print(
            f"| {name} | {base / 1e9:.2f}B | {adapters / 1e6:.1f}M ({adapters / base:.2%}) | {full / GIB:.0f} GiB | "
            f"{one / GIB:.1f} GiB | {pair[0]} | {pair[1]} |"
        )
    print(
        f"\nUMT5-XXL text encoder: {text / 1e9:.2f}B parameters, {2 * text / GIB:.1f} GiB in bf16 "
        "(not resident when data.cache_latents stores the text states)."
    )


if __name__ == "__main__":
    main()
