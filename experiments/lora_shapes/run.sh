#!/usr/bin/env bash
# Teaching a shapes model a class it never saw ("a blue triangle"), LoRA against a full fine-tune (issue 18, point 6),
# the full fine-tune at its own learning rates (issue 41).
# Usage: bash experiments/lora_shapes/run.sh [BASE.ckpt] [STEPS] [FULL_LRS]
#   BASE: a latent shapes model trained without the class; without it, one is trained first (2000 steps):
#     python train.py model=latent schedule=cosine logger=csv 'data.exclude=["a blue triangle"]' trainer.max_steps=2000
#   FULL_LRS: the full fine-tune's learning rates, one run each (default "1e-4 3e-5 1e-5"; the first table's was LoRA's
#     1e-3, which the full fine-tune did not survive)
# Both fine-tunes start from the base exported as a StableDiffusionPipeline (the recipe of experiment=lora_finetune,
# conf/experiment/lora_shapes.yaml: 48 images of the new class, batch 16, LoRA lr 1e-3 constant), one after the other
# on the same machine. compare.py then draws 20 images per caption from the base and every model twice: on seeds from
# 1000 (choosing: the full fine-tune's rate with the best mean of "new class" and "other 23") and on seeds from 20000
# (reporting: a range nothing was chosen on).
set -euo pipefail
stamp=$(date +%Y%m%d_%H%M%S)
base=${1:-}
steps=${2:-300}
full_lrs=${3:-"1e-4 3e-5 1e-5"}
if [ -z "$base" ]; then
    python train.py model=latent schedule=cosine logger=csv "run_name=lora_base_$stamp" \
        'data.exclude=["a blue triangle"]' trainer.max_steps=2000
    base="outputs/lora_base_$stamp/checkpoints/last.ckpt"
fi
pipeline="outputs/lora_base_pipeline_$stamp"
python sample.py "ckpt=$base" "export=$pipeline"
variants=(lora)
for lr in $full_lrs; do variants+=("full_lr$lr"); done
models=("base=$pipeline")
for variant in "${variants[@]}"; do
    extra=()
    [[ "$variant" = full_lr* ]] && extra=(model.lora.rank=null "model.lr=${variant#full_lr}")
    start=$(date +%s)
    python train.py experiment=lora_shapes logger=csv "run_name=lora_shapes_${variant}_$stamp" \
        "model.pretrained=$pipeline" "trainer.max_steps=$steps" "${extra[@]}"
    echo "$variant: $(( $(date +%s) - start )) s wall" | tee -a "outputs/lora_shapes_$stamp.times"
    models+=("$variant=outputs/lora_shapes_${variant}_$stamp/checkpoints/last.ckpt")
done
for seed_start in 1000 20000; do
    python experiments/lora_shapes/compare.py "${models[@]}" --seed-start "$seed_start" \
        --out "outputs/lora_shapes_${stamp}_seeds$seed_start.json" | tee "outputs/lora_shapes_${stamp}_seeds$seed_start.md"
done
