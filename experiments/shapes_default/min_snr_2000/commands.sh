#!/usr/bin/env bash
# The two runs of "Min-SNR weighting and 2000 steps" (experiments/shapes_default/README.md), as they were run on the
# code of commit 98fbf66 (the defaults then: uniform weighting, 3000 steps), one after the other on an idle machine.
# After that commit these are `python train.py trainer.max_steps=2000 objective.loss_weighting=none` and the new
# default `python train.py`.
set -euo pipefail
python train.py run_name=steps2000 logger=csv resume=false trainer.max_steps=2000
python train.py run_name=steps2000_minsnr logger=csv resume=false trainer.max_steps=2000 objective.loss_weighting=min_snr
