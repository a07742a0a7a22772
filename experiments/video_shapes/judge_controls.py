"""The video judge, judged: a draw of the moving-shapes data and the collapse control (each caption's first clip,
repeated for every clip of that caption) against the data's first clips, as `sample.py metrics=fid` judges a run.

    python experiments/video_shapes/judge_controls.py [--clips 256] [--out judge_controls.json]

The bar (`lightdiff.metrics.motion.VIDEO_BAR`, fixed before any run) must pass the data and fail the control.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lightdiff.data import MovingShapesDataset
from lightdiff.metrics import ShapesFeatures
from lightdiff.metrics.motion import VIDEO_BAR, video_judge
from lightdiff.sampling import to_uint8


def clips(seed: int, count: int) -> tuple[object, list[str]]:
    data = MovingShapesDataset(size=count, resolution=32, num_frames=9, seed=seed)
    items = [data[index] for index in range(count)]
    return to_uint8(torch.stack([item["pixel_values"] for item in items]) / 2 + 0.5), [item["text"] for item in items]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clips", type=int, default=256)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    features = ShapesFeatures()
    reference, reference_prompts = clips(0, args.clips)
    real, prompts = clips(1, args.clips)
    first_of_caption = {prompt: index for index, prompt in reversed(list(enumerate(prompts)))}
    rows = {
        "data (seed 1)": video_judge(reference, reference_prompts, real, prompts, features),
        "collapse control": video_judge(
            reference, reference_prompts, real[[first_of_caption[p] for p in prompts]], prompts, features
        ),
    }
    print(f"{args.clips} clips per row (32 px, 9 frames), reference: the data's first {args.clips} clips (seed 0)")
    print(f"ShapesFeatures {features.weights_hash}; bar {VIDEO_BAR}\n")
    print("| row | clips right | precision | recall | within-caption distance | vs reference | meets bar |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, row in rows.items():
        print(
            f"| {name} | {row['right']:.1%} | {row['precision']:.3f} | {row['recall']:.3f} | "
            f"{row['within_caption_distance']:.3f} | {row['diversity_vs_reference']:.2f}x | "
            f"{'yes' if row['meets_bar'] else 'no'} |"
        )
    if args.out is not None:
        meta = {"clips": args.clips, "bar": VIDEO_BAR, "shapes_features": features.weights_hash}
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
