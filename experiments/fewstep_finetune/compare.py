"""Few-step quality before and after teaching a distilled model a new class, judged in one process.

    python experiments/fewstep_finetune/compare.py NAME=CKPT [...] --new "a red triangle" [--steps 1,4]
        [--per-caption 30] [--seed-start 20000] [--out results.json]

The first NAME=CKPT is the reference (the few-step base before fine-tuning); every model samples as its checkpoint
says (its student's scheduler, unguided, EMA weights), at each of `--steps`. Per model and step count:
- old classes: the shapes captions without the new class's shape (those the base was trained on), `--per-caption`
  images each, caption k from seeds seed-start + k * per-caption ..: prompt adherence (right shape and colour),
  precision and recall on `ShapesFeatures` against as many data images of those classes (Kynkaanniemi et al. 2019,
  k = 3), FID on the same features, and the within-caption distance (mean pairwise RMS pixel distance);
- the new class: `--per-caption` x 2 images of `--new` (seeds after the old ones): adherence, within-caption distance;
- "kept": each old-class number as a share of the reference's at the same step count (FID: reference / model).
Choose settings on one `--seed-start`, report on another.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from lightdiff.data import ShapesDataset
from lightdiff.data.shapes import NUM_CLASSES, label_to_caption
from lightdiff.metrics import FrechetEvaluator, ShapesFeatures, shapes_metric
from lightdiff.metrics.diversity import precision_recall, within_group_distance
from lightdiff.sampling import for_latents, generate, reconfigured, to_uint8
from lightdiff.trained import REQUIRED_SAMPLERS, TrainedDenoiser, load_denoiser

RESOLUTION = 16


def few_step_images(model: TrainedDenoiser, steps: int, prompts: list[str], seeds: list[int]) -> torch.Tensor:
    """As sample.py draws a student: its required sampler or the objective's, its overrides, no guidance."""
    factory = REQUIRED_SAMPLERS[model.required_sampler] if model.required_sampler else model.objective.default_sampler
    scheduler = model.objective.scheduler(factory)
    scheduler = for_latents(scheduler) if model.vae is not None else scheduler
    scheduler = reconfigured(scheduler, model.scheduler_overrides or {})
    images = []
    with torch.inference_mode():
        for start in range(0, len(seeds), 240):
            part = slice(start, start + 240)
            inputs = {"label": None, "text": prompts[part]}
            images.append(generate(model.net, scheduler, steps, seeds[part], model.conditioning, inputs, vae=model.vae))
    return torch.cat(images)


def share(value: float, reference: float) -> float:
    return value / reference if reference else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="+", help="NAME=CHECKPOINT; the first is the reference (the base)")
    parser.add_argument("--new", required=True, help="the new class's caption, e.g. 'a red triangle'")
    parser.add_argument("--steps", default="1,4")
    parser.add_argument("--per-caption", type=int, default=30)
    parser.add_argument("--seed-start", type=int, default=20000)
    parser.add_argument("--feature-cache", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    new_shape = args.new.split()[-1]
    old = [label_to_caption(k) for k in range(NUM_CLASSES) if not label_to_caption(k).endswith(new_shape)]
    n = args.per_caption
    old_prompts = [caption for caption in old for _ in range(n)]
    old_groups = [k for k in range(len(old)) for _ in range(n)]
    old_seeds = [args.seed_start + i for i in range(len(old_prompts))]
    new_seeds = [old_seeds[-1] + 1 + i for i in range(2 * n)]

    features = ShapesFeatures(args.feature_cache)
    reference = ShapesDataset(size=len(old_prompts), resolution=RESOLUTION, seed=0, classes=old)
    evaluator = FrechetEvaluator(features, num_samples=len(old_prompts))
    evaluator.set_reference(reference, identity=f"old classes of {args.new}")
    reference_images = torch.stack([reference[i]["pixel_values"] for i in range(len(reference))]) / 2 + 0.5
    reference_features = features(reference_images.clamp(0, 1))
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(
        f"old classes: {len(old)} captions x {n} images (seeds {old_seeds[0]}..{old_seeds[-1]}); new class "
        f"{args.new!r}: {2 * n} images (seeds {new_seeds[0]}..{new_seeds[-1]}); ShapesFeatures "
        f"{features.weights_hash}\n"
    )
    header = (
        "| model | steps | old: adherence | kept | recall | kept | precision | FID (shapes features) | kept "
        "| within-caption distance | kept | new class: adherence | new: within-caption distance |"
    )
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    rows, reference_rows = [], {}
    for entry in args.models:
        name, path = entry.split("=", 1)
        model = load_denoiser(path)
        for steps in [int(s) for s in args.steps.split(",")]:
            images = few_step_images(model, steps, old_prompts, old_seeds)
            evaluator.update(images)
            generated = torch.cat([features(images[i : i + 256]) for i in range(0, len(images), 256)])
            new_images = few_step_images(model, steps, [args.new] * len(new_seeds), new_seeds)
            row = {
                "model": name,
                "checkpoint": path,
                "steps": steps,
                "old_adherence": shapes_metric(to_uint8(images), prompts=old_prompts)["both"],
                **precision_recall(reference_features, generated),
                "fid": evaluator.compute()["fid"],
                "within_caption_distance": within_group_distance(images, old_groups),
                "new_adherence": shapes_metric(to_uint8(new_images), prompts=[args.new] * len(new_seeds))["both"],
                "new_within_caption_distance": within_group_distance(new_images, [0] * len(new_seeds)),
            }
            base = reference_rows.setdefault(steps, row)
            row["kept"] = {
                "adherence": share(row["old_adherence"], base["old_adherence"]),
                "recall": share(row["recall"], base["recall"]),
                "fid": share(base["fid"], row["fid"]),
                "diversity": share(row["within_caption_distance"], base["within_caption_distance"]),
            }
            rows.append(row)
            kept = row["kept"]
            print(
                f"| {name} | {steps} | {row['old_adherence']:.1%} | {kept['adherence']:.2f}x | {row['recall']:.3f} "
                f"| {kept['recall']:.2f}x | {row['precision']:.3f} | {row['fid']:.1f} | {kept['fid']:.2f}x "
                f"| {row['within_caption_distance']:.3f} | {kept['diversity']:.2f}x | {row['new_adherence']:.1%} "
                f"| {row['new_within_caption_distance']:.3f} |",
                flush=True,
            )
    if args.out is not None:
        meta = {"new": args.new, "old": old, "per_caption": n, "seed_start": args.seed_start}
        meta["torch"] = torch.__version__
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
