"""Sampling latency and throughput of lightdiff (what `python sample.py` runs per batch) against diffusers' own
pipeline on the same network, scheduler, steps and seeds, in one process.

    python experiments/sampling_speed/benchmark.py [--ckpt PATH] [--steps 50] [--repeats 5] [--device cpu|cuda]
        [--speed-path] [overrides ...]

Rows, each at batch 1 (latency) and batch 16 (images/s):
- diffusers DDIMPipeline: `pipeline(batch_size, generator=[...], num_inference_steps, output_type="np")`, eager fp32;
- lightdiff eager: `lightdiff.sampling.generate` + `to_uint8`, the body of sample.py's batch loop, fp32;
- lightdiff speed path (--speed-path): sample.py's `speed` block: bfloat16 on a GPU (float32 on a CPU), channels_last
  on a GPU, and compile; its first (compiling) call is warm-up, not timed. On a GPU a second such row compiles with
  `speed.compile_mode=reduce-overhead` (CUDA graphs).
Goal (issue 7): lightdiff eager >= 1.0x the pipeline; with compile on GPU >= 2x. Both draw the same images: the
script checks that lightdiff eager and the pipeline agree to 1/255 before timing. Calls alternate between rows;
the median of `--repeats` calls is reported. The network is an unconditional checkpoint's (`--ckpt`), or the
config's `net` with random weights, which times the same but makes the speed path's difference meaningless.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import diffusers
import numpy as np
import torch
from diffusers import DDIMPipeline, DDIMScheduler
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

import lightdiff.config  # noqa: F401  (registers the config resolvers)
from lightdiff.config import build
from lightdiff.nets.families.labels import NoCondition
from lightdiff.sampling import generate, generators_for, to_uint8
from lightdiff.speed import SamplingSpeed
from lightdiff.trained import load_denoiser

ROOT = Path(__file__).resolve().parents[2]


def timed(call: Callable[[int], np.ndarray], batch: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    call(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--speed-path", action="store_true", help="add the compiled (and on GPU bf16) row")
    parser.add_argument("--ckpt", help="an unconditional pixel checkpoint (default: the config's net, random weights)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the train config, e.g. net=unet_small")
    args = parser.parse_args()
    device = torch.device(args.device)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=args.overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    if args.ckpt:
        # Trained weights: the numerical check of the speed path is only meaningful on a model that denoises
        # (a random network's 50-step trajectories are chaotic, so any rounding change moves the images).
        denoiser = load_denoiser(args.ckpt)
        if getattr(denoiser.net.config, "num_class_embeds", None) is not None:
            raise SystemExit(f"{args.ckpt}: DDIMPipeline passes no class labels; give an unconditional model")
        net, objective = denoiser.net.to(device).eval(), denoiser.objective
    else:
        torch.manual_seed(0)
        net, objective = build(cfg.net).to(device).eval(), build(cfg.objective)
    scheduler = objective.scheduler(DDIMScheduler)
    pipeline = DDIMPipeline(unet=net, scheduler=copy.deepcopy(scheduler)).to(device)
    pipeline.set_progress_bar_config(disable=True)

    def diffusers_call(batch: int) -> np.ndarray:
        images = pipeline(
            batch_size=batch, generator=generators_for(range(batch)), num_inference_steps=args.steps, output_type="np"
        ).images
        return (images * 255).round().astype(np.uint8)

    def lightdiff_call(model: torch.nn.Module, batch: int) -> np.ndarray:
        with torch.inference_mode():  # as sample.py's draw
            return to_uint8(generate(model, scheduler, args.steps, range(batch), NoCondition(), {}))

    reference, ours = diffusers_call(4), lightdiff_call(net, 4)
    mismatch = np.abs(reference.astype(int) - ours.astype(int)).max()
    if mismatch > 1:
        raise SystemExit(f"lightdiff and the pipeline draw different images (max |difference| {mismatch}/255)")
    rows: dict[str, Callable[[int], np.ndarray]] = {
        "diffusers DDIMPipeline": diffusers_call,
        "lightdiff eager": lambda batch: lightdiff_call(net, batch),
    }
    speed_description = ""
    if args.speed_path:
        on_gpu = device.type == "cuda"
        speed = SamplingSpeed(
            dtype="bfloat16" if on_gpu else "float32", channels_last=on_gpu, compile=True, check=False
        )
        variants = {"lightdiff speed path": speed}
        if on_gpu:  # the same with CUDA graphs: one launch per step, what a small net's GPU time is mostly spent on
            variants["lightdiff speed path, CUDA graphs"] = dataclasses.replace(speed, compile_mode="reduce-overhead")
        speed_description = (
            f"speed path: dtype {speed.dtype}, channels_last {speed.channels_last}, compile; mean |difference| from "
            f"eager fp32 (tolerance {speed.allowed_difference}):"
        )
        for name, variant in variants.items():  # compilation (per batch shape) happens in the warm-up below
            fast = variant.apply(copy.deepcopy(net))
            difference = np.abs(lightdiff_call(fast, 4).astype(float) - ours.astype(float)).mean() / 255
            speed_description += f" {name} {difference:.2e}"
            rows[name] = functools.partial(lightdiff_call, fast)
    seconds: dict[tuple[str, int], list[float]] = {(name, b): [] for name in rows for b in (1, 16)}
    for name in rows:  # warm-up of every row and batch
        for batch in (1, 16):
            rows[name](batch)
    for _ in range(args.repeats):
        for batch in (1, 16):
            for name, call in rows.items():
                seconds[(name, batch)].append(timed(call, batch, device))
    median = {key: statistics.median(values) for key, values in seconds.items()}
    # A copy without .git (a lent GPU machine) is told its commit: experiments/gpu_checks/run.sh
    commit = (
        os.environ.get("LIGHTDIFF_COMMIT")
        or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    )
    machine = platform.processor() or platform.machine()
    if device.type == "cuda":
        machine = f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    print(
        f"machine: {machine}, {torch.get_num_threads()} CPU threads; torch {torch.__version__}, diffusers "
        f"{diffusers.__version__}; commit {commit}"
    )
    print(
        f"net {type(net).__name__} {list(net.config.block_out_channels)} ({args.ckpt or 'random weights'}), "
        f"{net.config.sample_size} px, DDIM "
        f"{args.steps} steps, median of {args.repeats} calls; {speed_description}\n"
    )
    print("| row | batch 1 latency (s) | vs pipeline | batch 16 (s) | images/s at 16 | vs pipeline |")
    print("| --- | --- | --- | --- | --- | --- |")
    base1, base16 = median[("diffusers DDIMPipeline", 1)], median[("diffusers DDIMPipeline", 16)]
    for name in rows:
        one, sixteen = median[(name, 1)], median[(name, 16)]
        ratios = f"{base1 / one:.3f}x | {sixteen:.3f} | {16 / sixteen:.1f} | {base16 / sixteen:.3f}x"
        print(f"| {name} | {one:.3f} | {ratios} |")


if __name__ == "__main__":
    main()
