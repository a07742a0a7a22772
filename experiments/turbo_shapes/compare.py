"""Teacher at 50 steps vs its turbo student at 1, 2 and 4 steps, side by side in one process.

    python experiments/turbo_shapes/compare.py TEACHER.ckpt STUDENT.ckpt [--num-images 1000]

Each model draws the same seeds (class labels cycling through the 24 classes for class-conditional models); the
table gives network evaluations per image, seconds (best of 2 timed passes after a warm-up), the shapes metric, and
FID / KID against the first `num-images` shapes training images with lightdiff's offline FID substitute
(RandomConvFeatures, its own scale). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from diffusers import DDIMScheduler

from lightdiff.data import ShapesDataset
from lightdiff.metrics import FrechetEvaluator, RandomConvFeatures, shapes_metric
from lightdiff.sampling import generate, reconfigured, to_uint8
from lightdiff.trained import load_denoiser


def sample(denoiser, steps: int, seeds: list[int], batch: int = 250) -> tuple[torch.Tensor, torch.Tensor | None]:
    scheduler = denoiser.objective.scheduler(DDIMScheduler)
    scheduler = reconfigured(scheduler, denoiser.scheduler_overrides or {})  # the student's trailing timesteps
    classes = denoiser.net.config.num_class_embeds
    labels = torch.tensor(seeds) % classes if classes else None
    images = []
    for start in range(0, len(seeds), batch):
        part = seeds[start : start + batch]
        inputs = {"label": labels[start : start + batch] if labels is not None else None}
        images.append(generate(denoiser.net, scheduler, steps, part, denoiser.conditioning, inputs))
    return torch.cat(images), labels


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("teacher")
    parser.add_argument("student")
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--teacher-steps", type=int, default=50)
    args = parser.parse_args()
    teacher, student = load_denoiser(args.teacher), load_denoiser(args.student)
    resolution = teacher.net.config.sample_size
    reference = ShapesDataset(size=args.num_images, resolution=resolution, seed=0)
    evaluator = FrechetEvaluator(RandomConvFeatures(seed=0), num_samples=args.num_images)
    evaluator.set_reference(reference, identity="")
    seeds = list(range(args.num_images))
    rows = [("teacher", teacher, args.teacher_steps)] + [("student", student, n) for n in (1, 2, 4)]
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{args.num_images} images per row, 16 px shapes, DDIM (student: trailing timesteps), EMA weights\n")
    print("| model | steps | seconds | images/s | valid | right class | FID (substitute) | KID |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    results = {}
    for name, denoiser, steps in rows:
        sample(denoiser, steps, seeds[:16])  # warm-up
        timings = []
        for _ in range(2):
            started = time.perf_counter()
            images, labels = sample(denoiser, steps, seeds)
            timings.append(time.perf_counter() - started)
        seconds = min(timings)
        shapes = shapes_metric(to_uint8(images), labels=labels.tolist() if labels is not None else None)
        evaluator.update(images)
        distances = evaluator.compute()
        results[(name, steps)] = (seconds, shapes)
        right = f"{shapes['both']:.1%}" if "both" in shapes else "-"
        print(
            f"| {name} | {steps} | {seconds:.1f} | {args.num_images / seconds:.0f} | {shapes['valid']:.1%} | {right} | "
            f"{distances['fid']:.3f} | {distances['kid']:.4f} |"
        )
    teacher_seconds, teacher_shapes = results[("teacher", args.teacher_steps)]
    one_seconds, one_shapes = results[("student", 1)]
    print(
        f"\nstudent at 1 step vs teacher at {args.teacher_steps}: {one_shapes['valid'] / teacher_shapes['valid']:.1%} "
        f"of its valid share, {args.teacher_steps}x fewer network evaluations, {teacher_seconds / one_seconds:.1f}x "
        "faster (measured above, same process)"
    )


if __name__ == "__main__":
    main()
