#!/usr/bin/env bash
# Issue 17's experiments on variable-aspect shapes, one run after the other on the same machine:
#  (a) an SDXL-shaped model trained on centre crops against one trained in aspect-ratio buckets (equal steps), judged
#      on the share of samples whose shape is cut by the border;
#  (b) the bucketed model as a turbo teacher and its 1-step student (experiments/turbo_shapes' scoring).
# Usage: bash experiments/sdxl_shapes/run.sh [STEPS] [STUDENT_STEPS]
set -euo pipefail
stamp=$(date +%Y%m%d_%H%M%S)
steps=${1:-1500}
student_steps=${2:-600}
log="outputs/sdxl_shapes_$stamp.times"
for arm in centre_crop buckets; do
    extra=()
    [ "$arm" = buckets ] && extra=("data.buckets={step: 4}")
    start=$(date +%s)
    python train.py experiment=sdxl_shapes logger=csv "run_name=sdxl_shapes_${arm}_$stamp" \
        "trainer.max_steps=$steps" "${extra[@]}"
    echo "$arm: $(( $(date +%s) - start )) s wall" | tee -a "$log"
done
teacher="outputs/sdxl_shapes_buckets_$stamp/checkpoints/last.ckpt"
start=$(date +%s)
python train.py experiment=sdxl_turbo_shapes logger=csv "run_name=sdxl_turbo_shapes_$stamp" \
    "model.teacher=$teacher" "trainer.max_steps=$student_steps"
echo "student: $(( $(date +%s) - start )) s wall" | tee -a "$log"
mkdir -p "outputs/sdxl_shapes_$stamp"
python experiments/sdxl_shapes/compare.py \
    "centre_crop=outputs/sdxl_shapes_centre_crop_$stamp/checkpoints/last.ckpt" \
    "buckets=$teacher" \
    "teacher_50=$teacher@50" \
    "student_1=outputs/sdxl_turbo_shapes_$stamp/checkpoints/last.ckpt@1" \
    "student_4=outputs/sdxl_turbo_shapes_$stamp/checkpoints/last.ckpt@4" \
    --grids "outputs/sdxl_shapes_$stamp" --out "outputs/sdxl_shapes_$stamp.json" | tee "outputs/sdxl_shapes_$stamp.md"
# control: both models asked for the size and crop ids a centre crop of a 2:1 picture had in training
python experiments/sdxl_shapes/compare.py \
    "centre_crop_cropped_ids=outputs/sdxl_shapes_centre_crop_$stamp/checkpoints/last.ckpt#23,45,0,7" \
    "buckets_cropped_ids=$teacher#23,45,0,7" \
    --grids "outputs/sdxl_shapes_$stamp" --out "outputs/sdxl_shapes_${stamp}_control.json" \
    | tee "outputs/sdxl_shapes_${stamp}_control.md"
