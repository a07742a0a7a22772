#!/usr/bin/env bash
# The distillation comparison: one text teacher, four students (LADD, ADD, LCM, DMD2), each trained from two training
# seeds for the same wall-clock time, one after another on an otherwise idle machine (equal training compute), then
# one table on held-out sampling seeds (compare.py --seeds 10000:10480: no setting was ever chosen on them).
# Usage: [METHODS="..."] [SEEDS="0 1"] bash experiments/distillation/run.sh TEACHER.ckpt [MINUTES_PER_RUN] [overrides...]
#   TEACHER: the default latent model, `python train.py model=latent schedule=cosine` (experiments/latent_shapes).
#   METHODS (default "ladd add lcm dmd2"), among: ladd, add, lcm, dmd2 (DMD2 as published: 4-step grid, no
#   regression pairs), and the 1-step recipes of issue 46: dmd2_reg (model=dmd2's defaults: the 1-step grid [999]
#   with DMD's regression pairs, lambda_reg 0.25), ladd_w0 (LADD without the distillation term, its paper's lambda 0).
# Every method runs with its defaults except the learning rates, set to 1e-4 for all (ADD's 1e-5 / 2e-6 are for
# SD-sized networks and runs of thousands of steps; the tiny shapes UNet and these short runs need more; 1e-4 is
# model=dmd2's default).
# ADD's DINOv2 discriminator needs weights this machine cannot download: its row uses ADD's recipe (distillation
# weight 2.5 on the squared norm, hinge, R1) with a PatchGAN from scratch on the latents instead.
set -euo pipefail
teacher=$1
minutes=${2:-6}
shift $(( $# >= 2 ? 2 : 1 ))
stamp=$(date +%Y%m%d_%H%M%S)
budget=$(printf "00:00:%02d:00" "$minutes")
common=(logger=csv "model.teacher=$teacher" model.lr=1e-4 trainer.max_steps=1000000 "+trainer.max_time=$budget"
        callbacks.samples.every_n_steps=100 callbacks.samples.steps=1 trainer.log_every_n_steps=10)
students=()
train() {
    local name=$1 seed=$2
    shift 2
    local start
    start=$(date +%s)
    python train.py "run_name=distil_${name}_seed${seed}_$stamp" "seed=$seed" "${common[@]}" "$@"
    echo "$name seed $seed: $(( $(date +%s) - start )) s wall" | tee -a "outputs/distil_$stamp.times"
    students+=("$name/seed$seed=outputs/distil_${name}_seed${seed}_$stamp/checkpoints/last.ckpt")
}
for seed in ${SEEDS:-0 1}; do
    for method in ${METHODS:-ladd add lcm dmd2}; do
        case $method in
        ladd) train ladd "$seed" model=turbo "$@" ;;
        ladd_w0) train ladd_w0 "$seed" model=turbo model.distill_weight=0 "$@" ;;
        add) train add "$seed" model=turbo discriminator=patchgan discriminator.backbone.in_channels=4 "$@" ;;
        lcm) train lcm "$seed" model=lcm "$@" ;;
        dmd2) train dmd2 "$seed" model=dmd2 model.student_steps=4 model.regression_weight=0 "$@" ;;
        dmd2_reg) train dmd2_reg "$seed" model=dmd2 "$@" ;;
        *) echo "unknown method $method" >&2; exit 2 ;;
        esac
    done
done
python experiments/distillation/compare.py "$teacher" "${students[@]}" --seeds 10000:10480 \
    --out "outputs/distil_$stamp.json" | tee "outputs/distil_$stamp.md"
