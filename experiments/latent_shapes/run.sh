#!/usr/bin/env bash
# Reproduce experiments/latent_shapes: the out-of-the-box latent command, timed, then 50 guided samples per
# caption judged by the shapes metric (overall and per caption).
# Usage: bash experiments/latent_shapes/run.sh [extra train.py overrides]   (from the repository root)
set -euo pipefail
run_name=latent_shapes_$(date +%Y%m%d_%H%M%S)
out=outputs/$run_name
start=$(date +%s)
python train.py model=latent schedule=cosine logger=csv run_name=$run_name "$@"
end=$(date +%s)
echo "training wall time: $((end - start)) s"
python -c "from lightdiff.data.shapes import label_to_caption; print('\n'.join(label_to_caption(i) for i in range(24)))" \
    > $out/captions.txt
python sample.py ckpt=$out/checkpoints/last.ckpt out=$out/eval prompts_file=$out/captions.txt \
    num_images=1200 batch_size=240 guidance_scale=4 steps=50 seed=1000
echo "sampling wall time: $(($(date +%s) - end)) s"
python experiments/latent_shapes/score.py $out/eval $out/per_caption.json
