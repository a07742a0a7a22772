"""Prompt adherence of shapes models per caption: the new class ("a blue triangle") and the other 23.

    python experiments/lora_shapes/compare.py base=DIR_OR_CKPT lora=CKPT full=CKPT [--per-caption 20]
        [--seed-start 1000] [--out F.json]

Every model draws `--per-caption` images of each of the 24 captions from the same seeds (caption k: seeds
seed-start + k * per-caption ..; DDIM, `--steps`, guidance 4, EMA weights), judged by lightdiff's shapes metric (right
shape and colour); the table gives the new class, the mean over the other 23 (retention) and the worst of them. Choose
a setting on one `--seed-start` and report it on another.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from diffusers import DDIMScheduler

from lightdiff.data.shapes import NUM_CLASSES, label_to_caption
from lightdiff.metrics import shapes_metric
from lightdiff.sampling import for_latents, generate, to_uint8
from lightdiff.trained import load_denoiser

NEW_CLASS = "a blue triangle"


def adherence(source: str, per_caption: int, steps: int, guidance: float, seed_start: int) -> dict[str, float]:
    model = load_denoiser(source)
    scheduler = for_latents(model.objective.scheduler(DDIMScheduler))  # sample.py's sampler=ddim
    scores = {}
    for label in range(NUM_CLASSES):
        caption = label_to_caption(label)
        seeds = [seed_start + label * per_caption + i for i in range(per_caption)]
        with torch.inference_mode():
            images = generate(
                model.net,
                scheduler,
                steps,
                seeds,
                model.conditioning,
                {"text": [caption] * per_caption},
                guidance,
                vae=model.vae,
            )
        scores[caption] = shapes_metric(to_uint8(images), prompts=[caption] * per_caption)["both"]
    return scores


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="+", help="name=checkpoint_or_folder")
    parser.add_argument("--per-caption", type=int, default=20)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--seed-start", type=int, default=1000)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = {}
    for entry in args.models:
        name, source = entry.split("=", 1)
        started = time.perf_counter()
        scores = adherence(source, args.per_caption, args.steps, args.guidance, args.seed_start)
        others = [value for caption, value in scores.items() if caption != NEW_CLASS]
        results[name] = {
            "source": source,
            "seed_start": args.seed_start,
            "new_class": scores[NEW_CLASS],
            "others_mean": sum(others) / len(others),
            "others_worst": min(others),
            "per_caption": scores,
            "seconds": round(time.perf_counter() - started, 1),
        }
    print(
        f"{args.per_caption} images per caption (seeds from {args.seed_start}), DDIM {args.steps} steps, "
        f"guidance {args.guidance}\n"
    )
    print(f"| model | {NEW_CLASS!r} right shape and colour | other 23 classes (mean) | worst other class |")
    print("| --- | --- | --- | --- |")
    for name, row in results.items():
        worst = min((v, c) for c, v in row["per_caption"].items() if c != NEW_CLASS)
        print(f"| {name} | {row['new_class']:.1%} | {row['others_mean']:.1%} | {worst[0]:.1%} ({worst[1]}) |")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
