"""A text teacher at 50 guided steps vs its distilled students at 1, 2 and 4 steps, side by side in one process.

    python experiments/distillation/compare.py TEACHER.ckpt NAME=STUDENT.ckpt [NAME=STUDENT.ckpt ...] \
        [--images-per-caption 50] [--out results.json]

Every model draws the same seeds; image i is prompted with shapes caption i % 24 (so each caption gets the same
number of images). Each student samples as its checkpoint says (turbo: DDIM at trailing timesteps; lcm: LCMScheduler
with its guidance-scale input at the trained default; dmd2: LCMScheduler on its grid), unguided; the teacher with
DDIM and guidance 4, as experiments/latent_shapes judged it. Columns:
- prompt adherence: the share right in shape and colour (the shapes metric, as experiments/latent_shapes);
- FID / KID substitute against as many shapes training images (RandomConvFeatures: offline, its own scale);
- diversity: coverage (share of the 24 classes among valid images) and, within each caption, the mean pairwise
  RMS pixel distance between its images (a student that draws one image per prompt scores 0);
- seconds and images/s: the best of 2 timed passes after a warm-up, same process, same threads.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from diffusers import DDIMScheduler

from lightdiff.data import ShapesDataset
from lightdiff.data.shapes import label_to_caption
from lightdiff.metrics import FrechetEvaluator, RandomConvFeatures, shapes_metric
from lightdiff.nets.families.sd import GuidanceEmbedded
from lightdiff.sampling import for_latents, generate, reconfigured, to_uint8
from lightdiff.trained import REQUIRED_SAMPLERS, TrainedDenoiser, load_denoiser

CAPTIONS = [label_to_caption(label) for label in range(24)]
TEACHER_GUIDANCE = 4.0


def sample(model: TrainedDenoiser, steps: int, seeds: list[int], batch: int = 240) -> torch.Tensor:
    factory = REQUIRED_SAMPLERS[model.required_sampler] if model.required_sampler else DDIMScheduler
    scheduler = model.objective.scheduler(factory)
    scheduler = for_latents(scheduler) if model.vae is not None else scheduler
    scheduler = reconfigured(scheduler, model.scheduler_overrides or {})
    is_student = model.scheduler_overrides is not None
    guidance = 1.0 if is_student or isinstance(model.conditioning, GuidanceEmbedded) else TEACHER_GUIDANCE
    images = []
    for start in range(0, len(seeds), batch):
        part = seeds[start : start + batch]
        inputs = {"text": [CAPTIONS[seed % len(CAPTIONS)] for seed in part]}
        images.append(generate(model.net, scheduler, steps, part, model.conditioning, inputs, guidance, vae=model.vae))
    return torch.cat(images)


def within_caption_distance(images: torch.Tensor, seeds: list[int]) -> float:
    """Mean over captions of the mean pairwise RMS distance between the caption's images (pixels in [0, 1])."""
    distances = []
    for caption in range(len(CAPTIONS)):
        group = images[[i for i, seed in enumerate(seeds) if seed % len(CAPTIONS) == caption]].flatten(1)
        pairwise = torch.cdist(group, group) / group.shape[1] ** 0.5
        count = len(group)
        distances.append((pairwise.sum() / (count * (count - 1))).item())
    return sum(distances) / len(distances)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("teacher")
    parser.add_argument("students", nargs="+", help="NAME=CHECKPOINT")
    parser.add_argument("--images-per-caption", type=int, default=50)
    parser.add_argument("--teacher-steps", type=int, default=50)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    count = args.images_per_caption * len(CAPTIONS)
    teacher = load_denoiser(args.teacher)
    students = [(name, load_denoiser(path)) for name, path in (entry.split("=", 1) for entry in args.students)]
    reference = ShapesDataset(size=count, resolution=16, seed=0)
    evaluator = FrechetEvaluator(RandomConvFeatures(seed=0), num_samples=count)
    evaluator.set_reference(reference, identity="")
    seeds = list(range(count))
    rows = [("teacher", teacher, args.teacher_steps)]
    rows += [(name, model, steps) for name, model in students for steps in (1, 2, 4)]
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{count} images per row ({args.images_per_caption} per caption), 16 px shapes, EMA weights\n")
    print(
        "| model | steps | seconds | images/s | prompt adherence | vs teacher | FID (substitute) | vs teacher | KID |"
        " coverage | within-caption distance |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    results = []
    for name, model, steps in rows:
        sample(model, steps, seeds[:24])  # warm-up
        timings = []
        for _ in range(2):
            started = time.perf_counter()
            images = sample(model, steps, seeds)
            timings.append(time.perf_counter() - started)
        seconds = min(timings)
        prompts = [CAPTIONS[seed % len(CAPTIONS)] for seed in seeds]
        shapes = shapes_metric(to_uint8(images), prompts=prompts)
        evaluator.update(images)
        distances = evaluator.compute()
        row = {
            "model": name,
            "steps": steps,
            "seconds": seconds,
            "images_per_second": count / seconds,
            "prompt_adherence": shapes["both"],
            "valid": shapes["valid"],
            "coverage": shapes["coverage"],
            "fid": distances["fid"],
            "kid": distances["kid"],
            "within_caption_distance": within_caption_distance(images, seeds),
        }
        results.append(row)
        base = results[0]
        ratio = {key: row[key] / base[key] if base[key] else float("nan") for key in ("prompt_adherence", "fid")}
        print(
            f"| {name} | {steps} | {seconds:.1f} | {row['images_per_second']:.0f} | {row['prompt_adherence']:.1%} | "
            f"{ratio['prompt_adherence']:.1%} | {row['fid']:.3f} | "
            f"{ratio['fid']:.2f}x | {row['kid']:.4f} | {row['coverage']:.0%} | "
            f"{row['within_caption_distance']:.3f} |",
            flush=True,
        )
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
