#!/usr/bin/env bash
# Reproduce experiments/edit_shapes (from the repository root): the FLUX.1 Kontext editor and its control (the same
# network trained text-to-image on the shapes data at the same compute), one thread each side by side, then both
# judged on 256 held-out triples (judge.py).
set -euo pipefail
OMP_NUM_THREADS=1 python train.py experiment=kontext_edit_shapes logger=csv &
OMP_NUM_THREADS=1 python train.py experiment=kontext_edit_shapes_control logger=csv &
wait
python experiments/edit_shapes/judge.py outputs/kontext_edit_shapes/checkpoints/last.ckpt \
    outputs/kontext_edit_shapes_control/checkpoints/last.ckpt --out experiments/edit_shapes/results
