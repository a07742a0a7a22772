"""Judge an image-to-video checkpoint on first frames it never trained on: clips `--first` .. `--first + --clips - 1`
of the moving-shapes data (a run with data.size=8192 trained on clips 0..8191), each generated from its clip's first
frame and caption with seed 256 + i, as sample.py draws (the checkpoint's scheduler, EMA weights), and judged by the
video judge (shape, colour, direction, steadiness) and by whether it starts from its frame (`first_frame_kept`).

    python experiments/video_shapes/judge_i2v.py CKPT [--first 8192] [--clips 256] [--guidance 1.5] [--out FILE]

The training run's own final previews start from clips 0..255, which it trained on; this is the held-out row.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from lightdiff.data import MovingShapesDataset
from lightdiff.drawing import scheduler_for
from lightdiff.metrics.motion import first_frame_kept, motion_metric
from lightdiff.sampling import generate, to_uint8
from lightdiff.trained import load_denoiser

CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--first", type=int, default=8192, help="the first data clip judged (past the training set)")
    parser.add_argument("--clips", type=int, default=256)
    parser.add_argument("--guidance", type=float, default=1.5)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    trained = load_denoiser(args.checkpoint)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("sample", overrides=[f"ckpt={args.checkpoint}", f"steps={args.steps}"])
    scheduler, _ = scheduler_for(cfg, trained)  # sample.py's for this checkpoint
    data = MovingShapesDataset(size=args.first + args.clips, resolution=32, num_frames=9)
    items = [data[index] for index in range(args.first, args.first + args.clips)]
    frames = torch.stack([item["pixel_values"][0] for item in items])
    prompts = [str(item["text"]) for item in items]
    started, clips = time.perf_counter(), []
    for start in range(0, args.clips, args.batch):
        part = slice(start, start + args.batch)
        seeds = list(range(256 + start, 256 + min(start + args.batch, args.clips)))
        inputs = {"text": prompts[part], "image": frames[part]}
        clips.append(
            generate(
                trained.net,
                scheduler,
                args.steps,
                seeds,
                trained.conditioning,
                inputs,
                args.guidance,
                vae=trained.vae,
                size=(32, 32),
                num_frames=9,
            )
        )
    seconds = time.perf_counter() - started
    generated = to_uint8(torch.cat(clips))
    result = {
        **motion_metric(generated, prompts),
        "first_frame_kept": first_frame_kept(generated, to_uint8(frames / 2 + 0.5)),
        "clips": args.clips,
        "first_data_clip": args.first,
        "guidance_scale": args.guidance,
        "steps": args.steps,
        "clips_per_second": args.clips / seconds,
        "checkpoint": str(args.checkpoint),
    }
    print(json.dumps(result, indent=1))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
