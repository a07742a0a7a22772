"""Cut-off shapes and prompt adherence of SDXL-shaped shapes models (issue 17, experiment a) and of a turbo student
against its teacher (experiment b), all drawn in one process from the same seeds.

    python experiments/sdxl_shapes/compare.py NAME=CKPT[@STEPS][#H,W,TOP,LEFT] ... [--seeds 1000:1192] [--out F.json]

Image i of every model is drawn from seed i of `--seeds` (START:STOP, a multiple of 24 long) with caption
`seed % 24`, at 16 x 16 with SDXL's default size and crop ids (original size = target, crop (0, 0): "an uncropped
picture"), or with the original size H x W and crop (TOP, LEFT) given after `#` (e.g. the ids a centre crop of a 2:1
picture had in training: `#23,45,0,7`), DDIM at STEPS (default 25; a turbo student uses its trailing timesteps and no
guidance), guidance 4 for the others, EMA weights. Reported: the share of images whose shape is cut by the border
(lightdiff.metrics.shapes.cut_by_border: touching it and not a valid shapes image), the raw share touching it
(`touches_border`), the shapes metric's valid share and right shape and colour, the within-caption distance (the
mean pairwise RMS pixel distance of a caption's images, averaged over captions: 0 for a model that draws one image per
caption; lightdiff.metrics.diversity, issue 41) and the seconds per image.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from diffusers import DDIMScheduler

from lightdiff.data.shapes import NUM_CLASSES, label_to_caption
from lightdiff.metrics import shapes_metric, within_group_distance
from lightdiff.metrics.shapes import class_balanced_seeds, cut_by_border, touches_border
from lightdiff.nets.families import SIZE_AND_CROP, size_and_crop
from lightdiff.sampling import for_latents, generate, image_grid, reconfigured, to_uint8
from lightdiff.trained import load_denoiser


def draw(
    source: str, steps: int, seeds: list[int], guidance: float, ids: list[int] | None
) -> tuple[np.ndarray, list[str], float]:
    model = load_denoiser(source)
    scheduler = reconfigured(for_latents(model.objective.scheduler(DDIMScheduler)), model.scheduler_overrides or {})
    guidance = 1.0 if model.scheduler_overrides else guidance  # a turbo student samples unguided
    prompts = [label_to_caption(seed % NUM_CLASSES) for seed in seeds]
    images = []
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(prompts), 48):
            batch, batch_seeds = prompts[start : start + 48], seeds[start : start + 48]
            inputs: dict[str, object] = {"text": batch}
            if ids is not None:  # original size and crop as given; the target is the 16 x 16 drawn
                inputs[SIZE_AND_CROP] = size_and_crop(16, 16, len(batch), ids[:2], ids[2:])
            pixels = generate(
                model.net, scheduler, steps, batch_seeds, model.conditioning, inputs, guidance, vae=model.vae
            )
            images.append(to_uint8(pixels))
    return np.concatenate(images), prompts, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="+", help="name=checkpoint[@steps]")
    parser.add_argument("--seeds", type=class_balanced_seeds, default="1000:1192", help="START:STOP")
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--out", default=None)
    parser.add_argument("--grids", default=None, help="folder for one grid per model")
    args = parser.parse_args()
    results = {}
    for entry in args.models:
        name, source = entry.split("=", 1)
        source, _, ids_text = source.partition("#")
        source, _, steps = source.partition("@")
        ids = [int(value) for value in ids_text.split(",")] if ids_text else None
        images, prompts, seconds = draw(source, int(steps or 25), args.seeds, args.guidance, ids)
        metric = shapes_metric(images, prompts=prompts)
        results[name] = {
            "source": source,
            "steps": int(steps or 25),
            "original_size_and_crop": ids,
            "seeds": [args.seeds[0], args.seeds[-1] + 1],
            "images": len(images),
            "cut_by_border": float(cut_by_border(images).mean()),
            "touches_border": float(touches_border(images).mean()),
            "valid": metric["valid"],
            "right_shape_and_colour": metric["both"],
            "within_caption_distance": within_group_distance(
                torch.from_numpy(images).float() / 255, [seed % NUM_CLASSES for seed in args.seeds]
            ),
            "seconds_per_image": seconds / len(images),
        }
        if args.grids:  # the first image of each caption, in caption order
            first = [prompts.index(label_to_caption(label)) for label in range(NUM_CLASSES)]
            image_grid(images[first], columns=8, scale=4).save(f"{args.grids}/grid_{name}.png")
    per_caption, first, last = len(args.seeds) // NUM_CLASSES, args.seeds[0], args.seeds[-1]
    print(
        f"{per_caption} images per caption x 24 captions at 16 x 16 (seeds {first}..{last}), crop ids (0, 0) unless "
        f"given, guidance {args.guidance}\n"
    )
    print(
        "| model | steps | cut by the border | touches the border | valid | right shape and colour | "
        "within-caption distance | s / image |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, row in results.items():
        print(
            f"| {name} | {row['steps']} | {row['cut_by_border']:.1%} | {row['touches_border']:.1%} | "
            f"{row['valid']:.1%} | {row['right_shape_and_colour']:.1%} | {row['within_caption_distance']:.3f} | "
            f"{row['seconds_per_image']:.3f} |"
        )
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
