#!/usr/bin/env bash
# Reproduce experiments/arch_shapes: UNet vs DiT (class-conditional pixels) and UNet vs MMDiT (text-conditioned
# latents) at similar parameter counts, all trained with flow matching for the same steps, batch and learning rate,
# then judged side by side in one process (compare.py).
# Usage: bash experiments/arch_shapes/run.sh [STEPS]   (from the repository root)
set -euo pipefail
steps=${1:-2000}
common="objective=flow_matching trainer.max_steps=$steps logger=csv"
# Two runs at a time, one thread each, on a 2-core machine.
OMP_NUM_THREADS=1 python train.py experiment=shapes_class run_name=arch_unet_pixel $common &
OMP_NUM_THREADS=1 python train.py net=dit run_name=arch_dit_pixel $common &
wait
OMP_NUM_THREADS=1 python train.py model=latent run_name=arch_unet_latent $common &
OMP_NUM_THREADS=1 python train.py model=latent net=mmdit_tiny run_name=arch_mmdit_latent $common &
wait
# FLUX-tiny (issue 19): FluxTransformer2DModel with a CLIP pooled vector and T5 states, at the MMDiT's FLOPs
python train.py model=latent net=flux_tiny run_name=arch_flux_latent $common
# Z-Image and FLUX.2 [klein] (issue 45), at flux_tiny's FLOPs, their Qwen3 encoders built from the captions. The
# FLUX.2 VAE is the shapes VAE as FLUX.2's class (experiments/arch_shapes/flux2_vae.py); its Qwen3 has 4 layers, so
# that the three layers it reads (out_layers: 1, 2, 3) differ; 16 text rows as flux_tiny's T5.
OMP_NUM_THREADS=1 python train.py model=latent net=zimage_tiny run_name=arch_zimage_latent $common &
OMP_NUM_THREADS=1 python train.py model=latent net=flux2_tiny run_name=arch_flux2_latent $common \
    model.vae='${lightdiff.asset:vae_shapes16_flux2}' model.text_layers=4 model.max_sequence_length=16 &
wait
# ... then both resumed to 4000 steps (the cosine stretched): where they pass 95% (README)
OMP_NUM_THREADS=1 python train.py model=latent net=zimage_tiny run_name=arch_zimage_latent objective=flow_matching \
    trainer.max_steps=4000 logger=csv &
OMP_NUM_THREADS=1 python train.py model=latent net=flux2_tiny run_name=arch_flux2_latent objective=flow_matching \
    trainer.max_steps=4000 logger=csv model.vae='${lightdiff.asset:vae_shapes16_flux2}' model.text_layers=4 \
    model.max_sequence_length=16 &
wait
python experiments/arch_shapes/compare.py outputs/arch_unet_pixel outputs/arch_dit_pixel outputs/arch_unet_latent \
    outputs/arch_mmdit_latent outputs/arch_flux_latent outputs/arch_zimage_latent outputs/arch_flux2_latent
