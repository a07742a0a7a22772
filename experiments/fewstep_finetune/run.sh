#!/usr/bin/env bash
# experiments/fewstep_finetune (issue 45 point 3): teach a few-step student a class its base never saw, with LoRA,
# plain and with model=few_step_finetune's remedies, and judge the few-step quality it keeps (compare.py).
#   bash experiments/fewstep_finetune/run.sh base        # the default latent text model without any triangle, 2000 steps
#   bash experiments/fewstep_finetune/run.sh students    # its ADD (PatchGAN) and DMD2 students, the distillation study's
#                                                        # settings (lr 1e-4, the steps those runs reached in 7 minutes)
#   bash experiments/fewstep_finetune/run.sh finetune [SEED] [STEPS]  # per student: plain LoRA, the remedies, each
#       alone, with self-consistency (VARIANTS="..." picks some), STEPS (300) each; and plain LoRA on the many-step base
#   bash experiments/fewstep_finetune/run.sh judge SEED_START [SEED]  # compare.py on every fine-tune of each student
set -euo pipefail
stages="base | students | finetune | judge"
stage=${1:?$stages}
no_triangle='data.exclude=["a red triangle","a green triangle","a blue triangle","a yellow triangle","a magenta triangle","a cyan triangle","a white triangle","a orange triangle"]'
base=outputs/fewstep_base_no_triangle/checkpoints/last.ckpt
case "$stage" in
base)
    python train.py model=latent schedule=cosine logger=csv run_name=fewstep_base_no_triangle "$no_triangle" \
        trainer.max_steps=2000
    ;;
students)
    common=(logger=csv "model.teacher=$base" "$no_triangle" model.lr=1e-4 callbacks.samples.every_n_steps=100
            callbacks.samples.steps=1)
    python train.py model=turbo discriminator=patchgan discriminator.backbone.in_channels=4 "${common[@]}" \
        run_name=fewstep_student_add trainer.max_steps=600
    # DMD2 as it was then (a 4-step student without DMD's pairs; model=dmd2's defaults are the 1-step recipe now)
    python train.py model=dmd2 model.student_steps=4 model.regression_weight=0 "${common[@]}" \
        run_name=fewstep_student_dmd2 trainer.max_steps=240
    ;;
finetune)
    seed=${2:-0}
    steps=${3:-300}
    for student in add dmd2; do
        student_ckpt=outputs/fewstep_student_$student/checkpoints/last.ckpt
        for variant in ${VARIANTS:-plain remedies preserve_only student_steps_only consistency}; do
            case $variant in
            plain) options=(model.preserve_weight=0 model.task_timesteps=all) ;;
            remedies) options=() ;;  # the method's defaults: preservation (lambda 1) + loss at the student's steps
            preserve_only) options=(model.task_timesteps=all) ;;
            student_steps_only) options=(model.preserve_weight=0) ;;
            consistency) options=(model.consistency_weight=1) ;;  # the defaults + self-consistency (mu 1)
            esac
            python train.py experiment=fewstep_lora_shapes "model.base=$student_ckpt" logger=csv seed="$seed" \
                "run_name=fewstep_${student}_${variant}_${steps}steps_seed$seed" trainer.max_steps="$steps" \
                callbacks.samples.every_n_steps=$((steps / 4)) "${options[@]}"
        done
    done
    # the control: plain LoRA on the many-step base itself (its pipeline), judged by its own final previews
    [ -d outputs/fewstep_base_no_triangle/pipeline ] || python sample.py ckpt=$base \
        export=outputs/fewstep_base_no_triangle/pipeline
    python train.py experiment=lora_shapes model.pretrained=outputs/fewstep_base_no_triangle/pipeline \
        'data.classes=["a red triangle"]' logger=csv seed="$seed" trainer.max_steps="$steps" \
        "run_name=fewstep_control_multistep_lora_${steps}steps_seed$seed" callbacks.samples.every_n_steps=$((steps / 4))
    ;;
judge)
    seed_start=${2:?the first sampling seed (choose on 20000, report on 30000)}
    seed=${3:-0}
    for student in add dmd2; do
        models=("base=outputs/fewstep_student_$student/checkpoints/last.ckpt")
        for run in outputs/fewstep_${student}_*steps_seed$seed; do
            name=${run#outputs/fewstep_${student}_}
            models+=("${name%_seed$seed}=$run/checkpoints/last.ckpt")
        done
        python experiments/fewstep_finetune/compare.py "${models[@]}" --new "a red triangle" --steps 1,4 \
            --seed-start "$seed_start" --out "outputs/fewstep_${student}_seed${seed}_judged_$seed_start.json" \
            | tee "outputs/fewstep_${student}_seed${seed}_judged_$seed_start.md"
    done
    ;;
*)
    echo "unknown stage $stage ($stages)" >&2
    exit 2
    ;;
esac
