#!/usr/bin/env bash
# Reproduce experiments/shapes_default: the default `python train.py` on a CPU, timed, then its samples judged.
# Usage: bash experiments/shapes_default/run.sh   (from the repository root; ~10 minutes on 2 cores)
set -euo pipefail
run_name=shapes_default_$(date +%Y%m%d_%H%M%S)
start=$(date +%s)
python train.py run_name=$run_name logger=csv "$@"
end=$(date +%s)
echo "wall time: $((end - start)) s"
cat outputs/$run_name/final_metrics.json
