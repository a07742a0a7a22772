#!/usr/bin/env bash
# Reproduce experiments/turbo_shapes: a class-conditional, v-prediction, zero-terminal-SNR shapes teacher, its turbo
# student, then both compared side by side (steps, time, shapes metric, FID substitute) in one process.
# Usage: bash experiments/turbo_shapes/run.sh   (from the repository root; ~45 minutes on 2 idle cores)
set -euo pipefail
teacher=outputs/teacher_class_v_ztsnr/checkpoints/last.ckpt
if [ ! -f "$teacher" ]; then
    python train.py experiment=shapes_class run_name=teacher_class_v_ztsnr logger=csv \
        objective.prediction_type=v_prediction schedule.rescale_betas_zero_snr=true \
        objective.loss_weighting=none trainer.max_steps=3000  # as measured (before pixel DDPM's min-SNR default)
fi
run_name=turbo_shapes_$(date +%Y%m%d_%H%M%S)
start=$(date +%s)
python train.py experiment=turbo_shapes model.teacher=$teacher run_name=$run_name logger=csv "$@"
echo "distillation wall time: $(($(date +%s) - start)) s"
python experiments/turbo_shapes/compare.py $teacher outputs/$run_name/checkpoints/last.ckpt
