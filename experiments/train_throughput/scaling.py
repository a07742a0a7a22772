"""How lightdiff's time per training step grows with batch size and resolution (issue 7, point 3).

    python experiments/train_throughput/scaling.py [--batches 16 32 64] [--resolutions 16 32] [--steps 25]
        [--warmup 5] [--device cpu|cuda] [overrides ...]

Each cell is `python train.py`'s defaults (lightdiff (defaults) of benchmark.py: the config's precision and speed
switches, the per-step callbacks) at `data.batch_size` x `data.resolution`, the median step of one run. Prints
ms/step and images/s; ideal scaling keeps images/s flat along a row once the device is busy.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from benchmark import lightdiff_step_times, make_config


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. net=unet_small")
    args = parser.parse_args()
    device = torch.device(args.device)
    base = ["trainer=cpu" if device.type == "cpu" else "trainer=gpu", *args.overrides]
    print("| resolution / batch | " + " | ".join(str(b) for b in args.batches) + " |")
    print("| --- |" + " --- |" * len(args.batches))
    for resolution in args.resolutions:
        cells = []
        for batch in args.batches:
            cfg = make_config([*base, f"data.resolution={resolution}", f"data.batch_size={batch}"])
            times = lightdiff_step_times(cfg, args.steps, args.warmup, device, "defaults")
            seconds = statistics.median(times)
            cells.append(f"{seconds * 1e3:.0f} ms, {batch / seconds:.0f} img/s")
        print(f"| {resolution} px | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
