#!/usr/bin/env bash
# Teaching a shapes model a class it never saw ("a blue triangle"), LoRA against a full fine-tune (issue 18, point 6).
# Usage: bash experiments/lora_shapes/run.sh [BASE.ckpt] [STEPS]
#   BASE: a latent shapes model trained without the class; without it, one is trained first (2000 steps):
#     python train.py model=latent schedule=cosine logger=csv 'data.exclude=["a blue triangle"]' trainer.max_steps=2000
# Both fine-tunes start from the base exported as a StableDiffusionPipeline (the recipe of experiment=lora_finetune,
# conf/experiment/lora_shapes.yaml: 48 images of the new class, batch 16, lr 1e-3 constant), one after the other on
# the same machine, then compare.py draws 20 images per caption from the base and both models.
set -euo pipefail
stamp=$(date +%Y%m%d_%H%M%S)
base=${1:-}
steps=${2:-300}
if [ -z "$base" ]; then
    python train.py model=latent schedule=cosine logger=csv "run_name=lora_base_$stamp" \
        'data.exclude=["a blue triangle"]' trainer.max_steps=2000
    base="outputs/lora_base_$stamp/checkpoints/last.ckpt"
fi
pipeline="outputs/lora_base_pipeline_$stamp"
python sample.py "ckpt=$base" "export=$pipeline"
for variant in lora full; do
    extra=()
    [ "$variant" = full ] && extra=(model.lora.rank=null)
    start=$(date +%s)
    python train.py experiment=lora_shapes logger=csv "run_name=lora_shapes_${variant}_$stamp" \
        "model.pretrained=$pipeline" "trainer.max_steps=$steps" "${extra[@]}"
    echo "$variant: $(( $(date +%s) - start )) s wall" | tee -a "outputs/lora_shapes_$stamp.times"
done
python experiments/lora_shapes/compare.py "base=$pipeline" \
    "lora=outputs/lora_shapes_lora_$stamp/checkpoints/last.ckpt" \
    "full=outputs/lora_shapes_full_$stamp/checkpoints/last.ckpt" \
    --out "outputs/lora_shapes_$stamp.json" | tee "outputs/lora_shapes_$stamp.md"
