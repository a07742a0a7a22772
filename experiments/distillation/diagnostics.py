"""The discriminator's accuracy and mean logits on real and fake over a distillation run, in windows of steps.

    python experiments/distillation/diagnostics.py outputs/RUN [--windows 8]

Reads the run's CSV log (logger=csv): `train/d_accuracy`, `train/logits_real`, `train/logits_fake` (turbo; dmd2 logs
its classifier's under the same names). A discriminator that learns leaves 50% early; one in balance with its
generator settles back near it, with real logits above fake ones.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

KEYS = ("train/d_accuracy", "train/logits_real", "train/logits_fake")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run", type=Path)
    parser.add_argument("--windows", type=int, default=8)
    args = parser.parse_args()
    rows = []
    for path in sorted((args.run / "csv").glob("version_*/metrics.csv")):
        with path.open() as handle:
            rows += [row for row in csv.DictReader(handle) if row.get(KEYS[0])]
    if not rows:
        raise SystemExit(f"{args.run} has no logged {KEYS[0]} (was it trained with logger=csv?)")
    size = max(1, len(rows) // args.windows)
    print("| steps | d_accuracy | logits_real | logits_fake |")
    print("| --- | --- | --- | --- |")
    for start in range(0, len(rows), size):
        window = rows[start : start + size]
        means = [sum(float(row[key]) for row in window) / len(window) for key in KEYS]
        print(f"| {window[0]['step']}-{window[-1]['step']} | {means[0]:.3f} | {means[1]:+.3f} | {means[2]:+.3f} |")


if __name__ == "__main__":
    main()
