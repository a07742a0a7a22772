"""What SDXL's memory options save on one GPU, counted: parameters of a real-size SDXL pipeline and the bytes each
training state takes with each option (issue 17, point 6).

    python experiments/sdxl_shapes/memory.py

The networks are built on PyTorch's meta device (shapes, no memory) from SDXL base 1.0's published configurations
(unet/, text_encoder/ CLIP ViT-L, text_encoder_2/ OpenCLIP ViT-bigG with projection, vae/). Activations are not
counted: they depend on the batch and resolution, and are what gradient checkpointing trades for recomputation.
No GPU was lent to this work, so peak memory of a real step is not measured here.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

GIB = 2**30
# Copied from experiments/lora_shapes/memory.py (SDXL): experiments are standalone scripts, so the published config
# is kept in each that counts it.
UNET = dict(
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
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, vocab_size=49408)
CLIP_G = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    vocab_size=49408,
    projection_dim=1280,
    hidden_act="gelu",
)
VAE = dict(
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    latent_channels=4,
    sample_size=1024,
)


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def main() -> None:
    with torch.device("meta"):
        unet = parameters(UNet2DConditionModel(**UNET))
        frozen = {
            "text_encoder (CLIP ViT-L)": parameters(CLIPTextModel(CLIPTextConfig(**CLIP_L))),
            "text_encoder_2 (OpenCLIP ViT-bigG)": parameters(CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G))),
            "vae": parameters(AutoencoderKL(**VAE)),
        }
    frozen_total = sum(frozen.values())
    print("| part | parameters | fp32 | bf16 |\n| --- | --- | --- | --- |")
    print(f"| unet (trains) | {unet / 1e6:.1f}M | {4 * unet / GIB:.2f} GiB | {2 * unet / GIB:.2f} GiB |")
    for name, count in frozen.items():
        print(f"| {name} (frozen) | {count / 1e6:.1f}M | {4 * count / GIB:.2f} GiB | {2 * count / GIB:.2f} GiB |")
    weights, gradients, adam, adam8, ema = 4 * unet, 4 * unet, 8 * unet, 2 * unet, 4 * unet
    frozen_bytes = 4 * frozen_total
    baseline = weights + gradients + adam + ema + frozen_bytes
    rows = [
        ("full fine-tune: fp32 AdamW, EMA on the GPU, frozen parts fp32", baseline),
        ("optimizer=adamw_8bit", baseline - adam + adam8),
        ("optimizer=adafactor (factored second moments: ~0)", baseline - adam),
        ("callbacks.ema.offload=true (or callbacks.ema=null)", baseline - ema),
        ("model.frozen_dtype=bfloat16", baseline - frozen_bytes // 2),
        (
            "all three: adamw_8bit, EMA offloaded, frozen parts bf16",
            baseline - adam + adam8 - ema - frozen_bytes // 2,
        ),
    ]
    print("\n| training state (no activations) | GiB | vs full |\n| --- | --- | --- |")
    for name, total in rows:
        print(f"| {name} | {total / GIB:.2f} | {total / baseline:.0%} |")
    print("\nGradient checkpointing saves activations (not counted here); peak GPU memory: not measured.")


if __name__ == "__main__":
    main()
