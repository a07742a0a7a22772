#!/usr/bin/env bash
# What does FID during training cost? The default pixel run with metrics=fid every 1000 steps (1000 DDIM-50 samples
# per evaluation, offline features), timed; prints each evaluation's seconds and their share of the run.
# Usage: bash experiments/fid_cost/run.sh [extra train.py overrides]   (from the repository root)
set -euo pipefail
run_name=fid_cost_$(date +%Y%m%d_%H%M%S)
start=$(date +%s)
# the default run as it was measured: 3000 steps, uniform weighting (pixel DDPM's defaults became min-SNR, 2000 steps)
python train.py logger=csv run_name=$run_name metrics=fid metrics/features=random_conv metrics.every_n_steps=1000 \
    objective.loss_weighting=none trainer.max_steps=3000 "$@"
wall=$(($(date +%s) - start))
python - "$run_name" "$wall" <<'PY'
import csv, glob, sys
run_name, wall = sys.argv[1], float(sys.argv[2])
rows = [r for path in glob.glob(f"outputs/{run_name}/csv/version_*/metrics.csv") for r in csv.DictReader(open(path))]
evaluations = [(int(r["step"]), float(r["perf/fid_seconds"]), float(r["val/fid"])) for r in rows if r.get("perf/fid_seconds")]
fid_seconds = sum(seconds for _, seconds, _ in evaluations)
print("| step | FID (random_conv) | seconds |\n| --- | --- | --- |")
for step, seconds, fid in evaluations:
    print(f"| {step} | {fid:.3f} | {seconds:.1f} |")
print(f"\nrun wall time {wall:.0f} s, of which FID {fid_seconds:.0f} s: "
      f"{fid_seconds / wall:.1%} of the run, {fid_seconds / (wall - fid_seconds):.1%} on top of the rest")
PY
