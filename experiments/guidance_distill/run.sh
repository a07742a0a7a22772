#!/usr/bin/env bash
# Reproduce experiments/guidance_distill: a FLUX-tiny teacher (experiments/arch_shapes' arch_flux_latent run) distilled
# into a student that takes the guidance scale as an input (model=guidance_distill), then teacher (guided, two network
# calls per step) and student (one call, the scale as input) judged side by side in one process at equal steps.
# Usage: bash experiments/guidance_distill/run.sh [STEPS] [TEACHER_RUN]   (from the repository root)
set -euo pipefail
steps=${1:-500}
teacher=${2:-outputs/arch_flux_latent}
python train.py model=guidance_distill model.teacher="$teacher/checkpoints/last.ckpt" run_name=guidance_distill_flux \
    trainer.max_steps="$steps" logger=csv
for sampling_steps in 28 8; do
    python experiments/arch_shapes/compare.py "$teacher" outputs/guidance_distill_flux --steps "$sampling_steps" \
        --train-steps 10
done
