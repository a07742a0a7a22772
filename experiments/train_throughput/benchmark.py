"""Training throughput of lightdiff against a plain PyTorch loop and a diffusers-example-style loop, in one process.

    python experiments/train_throughput/benchmark.py [--steps 60] [--warmup 10] [--repeats 3] [--speed-path]
        [--device cpu|cuda] [overrides ...]

All variants train the same network (`net=` of the config, by default the shapes `unet_tiny`) on the same data
loader (lightdiff's shapes data module), batch and objective (epsilon MSE, linear schedule):
- plain loop: the same training math as the lightdiff config, by hand: noise, timesteps, forward, MSE, backward,
  gradient clipping at `model.max_grad_norm` (if set), AdamW, the config's LR schedule; fp32. What lightdiff (bare)
  costs on top of it is the framework's cost (goal: lightdiff (bare) >= 0.97x the plain loop on CPU);
- diffusers example: train_unconditional.py's defaults: fp32 (`--mixed_precision no`), no EMA (`--use_ema` off),
  clipping at 1.0, cosine LR with 500 warm-up steps, `loss.item()` and a log dict every step;
- lightdiff (bare): `model=pixel` in a Lightning Trainer, fp32, speed switches off, no callbacks, logger or bar;
- lightdiff (defaults): what `python train.py` runs: the config's precision and speed switches (bf16-mixed,
  channels_last, fused AdamW and cuDNN autotuning on a GPU; fp32 and off on a CPU) and the default callbacks that
  work every step (EMA, non-finite guard, RNG states, preemption, images/s); grids, checkpoints and the bar off (I/O
  the user picks);
- lightdiff (speed path), with --speed-path: the defaults plus `model.compile=true` (the goal on GPU: >= 1.5x the
  diffusers example).
Runs alternate (A B C D A B C D ...) so drifts in machine load hit all. Every step after `--warmup` is timed on its
own (on GPU after a synchronise); a variant's time per step is the median over its runs' steps, which a burst of
load on this shared machine moves less than a total would. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import diffusers
import pytorch_lightning as pl
import torch
from diffusers.optimization import get_scheduler
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

import lightdiff.config  # noqa: F401  (registers the config resolvers)
from lightdiff.config import build
from lightdiff.diffusion import NoiseSchedule, add_noise

ROOT = Path(__file__).resolve().parents[2]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimes(pl.Callback):
    """Seconds of each training step after step `warmup`."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.last: float | None = None
        self.times: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        synchronize(pl_module.device)
        now = time.perf_counter()
        if trainer.global_step > self.warmup and self.last is not None:
            self.times.append(now - self.last)
        self.last = now


def make_config(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
        cfg.output_root = tempfile.mkdtemp(prefix="throughput_")
    return cfg


def loop_step_times(cfg: DictConfig, steps: int, warmup: int, device: torch.device, example: bool) -> list[float]:
    """A hand-written loop: the config's math (`example=False`) or train_unconditional.py's defaults."""
    torch.backends.cudnn.benchmark = False  # PyTorch's default, which neither loop changes (a lightdiff row may have)
    torch.manual_seed(cfg.seed)
    datamodule = build(cfg.data)
    net = build(cfg.net).to(device)
    schedule: NoiseSchedule = build(cfg.schedule)
    alphas_cumprod = schedule.alphas_cumprod().float().to(device)
    model_cfg, optimizer_cfg = cfg.model, cfg.optimizer
    optimizer = torch.optim.AdamW(
        net.parameters(), lr=model_cfg.lr, betas=tuple(optimizer_cfg.betas), weight_decay=optimizer_cfg.weight_decay,
        eps=optimizer_cfg.eps,
    )  # fmt: skip
    if example:
        max_grad_norm: float | None = 1.0
        lr_scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=500, num_training_steps=steps)
    else:
        max_grad_norm = model_cfg.max_grad_norm
        name = "cosine" if model_cfg.lr_schedule == "cosine" else "constant_with_warmup"
        lr_scheduler = get_scheduler(name, optimizer, num_warmup_steps=model_cfg.warmup_steps, num_training_steps=steps)
    net.train()
    times: list[float] = []
    last = time.perf_counter()
    for step, batch in enumerate(datamodule.train_dataloader(), start=1):
        x0 = batch["pixel_values"].to(device, non_blocking=True)
        noise = torch.randn_like(x0)
        timesteps = torch.randint(0, schedule.num_train_timesteps, (x0.shape[0],), device=device)
        prediction = net(add_noise(x0, noise, alphas_cumprod, timesteps), timesteps).sample
        loss = torch.nn.functional.mse_loss(prediction, noise)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if example:  # the example's per-step log (a host synchronisation on GPU)
            logs = {"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0], "step": step}
            del logs
        synchronize(device)
        now = time.perf_counter()
        if step > warmup:
            times.append(now - last)
        last = now
        if step == steps:
            return times
    raise RuntimeError("the data loader ended early")


def lightdiff_step_times(cfg: DictConfig, steps: int, warmup: int, device: torch.device, variant: str) -> list[float]:
    """variant: bare | defaults | speed path (`cfg` is a composed config, or a run's resolved config.yaml)."""
    cfg = copy.deepcopy(cfg)
    changes = {
        "bare": {"model.channels_last": False, "optimizer.fused": False, "trainer.precision": "32-true"},
        "defaults": {},
        "speed path": {"model.compile": True},
    }[variant]
    for key, value in changes.items():
        OmegaConf.update(cfg, key, value)
    pl.seed_everything(cfg.seed, verbose=False)
    datamodule = build(cfg.data)
    model = build(cfg.model, data=datamodule)
    clock = StepTimes(warmup)
    callbacks: list[pl.Callback] = [clock]
    if variant != "bare":
        kept = ("ema", "nonfinite", "random_state", "preemption", "images_per_sec")
        callbacks += [build(node) for key, node in cfg.callbacks.items() if key in kept]
    trainer = pl.Trainer(
        accelerator=device.type,
        devices=1,
        precision=cfg.trainer.precision,
        max_steps=steps,
        logger=False,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        benchmark=False if variant == "bare" else cfg.trainer.benchmark,  # cuDNN autotuning: on with CUDA
    )
    trainer.fit(model, datamodule=datamodule)
    return clock.times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--speed-path", action="store_true", help="add the lightdiff speed-path row (compiles)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data.batch_size=32")
    args = parser.parse_args()
    device = torch.device(args.device)
    cfg = make_config(["trainer=cpu" if device.type == "cpu" else "trainer=gpu", *args.overrides])
    variants: dict[str, Callable[[], list[float]]] = {
        "plain PyTorch loop": lambda: loop_step_times(cfg, args.steps, args.warmup, device, example=False),
        "diffusers example loop": lambda: loop_step_times(cfg, args.steps, args.warmup, device, example=True),
        "lightdiff (bare)": lambda: lightdiff_step_times(cfg, args.steps, args.warmup, device, "bare"),
        "lightdiff (defaults)": lambda: lightdiff_step_times(cfg, args.steps, args.warmup, device, "defaults"),
    }
    if args.speed_path:
        variants["lightdiff (speed path)"] = lambda: lightdiff_step_times(
            cfg, args.steps, args.warmup, device, "speed path"
        )
    times: dict[str, list[list[float]]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, measure in variants.items():
            times[name].append(measure())
    median = {name: statistics.median(t for run in runs for t in run) for name, runs in times.items()}
    batch = cfg.data.batch_size
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
        f"machine: {machine}, {torch.get_num_threads()} CPU threads; torch {torch.__version__}, lightning "
        f"{pl.__version__}, diffusers {diffusers.__version__}; commit {commit}"
    )
    print(
        f"net {cfg.net._target_.split('.')[-1]} {list(cfg.net.block_out_channels)}, {cfg.data.resolution} px, batch "
        f"{batch}, max_grad_norm {cfg.model.max_grad_norm}; lightdiff defaults: precision {cfg.trainer.precision}, "
        f"channels_last {cfg.model.channels_last}, fused AdamW {cfg.optimizer.fused}; {args.steps - args.warmup} "
        f"timed steps after {args.warmup}, {args.repeats} runs each, median step\n"
    )
    print("| variant | ms/step (median) | images/s | vs plain loop | vs diffusers example | runs' medians (ms) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, seconds in median.items():
        runs = ", ".join(f"{statistics.median(run) * 1e3:.1f}" for run in times[name])
        print(
            f"| {name} | {seconds * 1e3:.1f} | {batch / seconds:.0f} | {median['plain PyTorch loop'] / seconds:.3f}x "
            f"| {median['diffusers example loop'] / seconds:.3f}x | {runs} |"
        )


if __name__ == "__main__":
    main()
