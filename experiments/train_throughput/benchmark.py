"""Training throughput of lightdiff against a plain PyTorch loop and a diffusers-example-style loop, in one process.

    python experiments/train_throughput/benchmark.py [--steps 60] [--warmup 10] [--repeats 3] [overrides ...]

All variants train the same network (`net=` of the config, by default the shapes `unet_tiny`), on the same data
loader (lightdiff's shapes data module), batch, precision (fp32 on CPU) and objective (epsilon MSE, linear schedule):
- plain: the shortest correct loop (noise, timesteps, forward, MSE, backward, AdamW step);
- diffusers example: plus what diffusers' train_unconditional.py does by default (cosine LR schedule with warm-up,
  gradient clipping at 1.0, EMA of the weights);
- lightdiff (bare): `model=pixel` in a Lightning Trainer without callbacks, logger or progress bar (the framework);
- lightdiff (defaults): plus the default callbacks that cost time every step (EMA, non-finite guard, RNG states,
  preemption, images/s; grids, checkpoints and the progress bar off, as their cost is I/O the user chooses).
Runs alternate (A B C D A B C D ...) so drifts in machine load hit all; each is timed from the end of warm-up step
`--warmup` to the end of the last step; the best of `--repeats` is reported. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import platform
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
from diffusers.training_utils import EMAModel
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import lightdiff.config  # noqa: F401  (registers the config resolvers)
from lightdiff.config import build
from lightdiff.diffusion import NoiseSchedule, add_noise

ROOT = Path(__file__).resolve().parents[2]


class StepClock(pl.Callback):
    """Seconds from the end of step `warmup` to the end of the last step."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.started: float | None = None
        self.seconds = 0.0

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.warmup:
            self.started = time.perf_counter()
        elif trainer.global_step == trainer.max_steps and self.started is not None:
            self.seconds = time.perf_counter() - self.started


def make_config(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["trainer=cpu", *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
        cfg.output_root = tempfile.mkdtemp(prefix="throughput_")
    return cfg


def loop_seconds(cfg: DictConfig, steps: int, warmup: int, example_extras: bool) -> float:
    """A hand-written loop; with `example_extras`, diffusers' train_unconditional.py defaults on top."""
    torch.manual_seed(cfg.seed)
    datamodule = build(cfg.data)
    net = build(cfg.net)
    schedule: NoiseSchedule = build(cfg.schedule)
    alphas_cumprod = schedule.alphas_cumprod().float()
    model_cfg = cfg.model
    optimizer = torch.optim.AdamW(
        net.parameters(), lr=model_cfg.lr, betas=tuple(model_cfg.adam_betas), weight_decay=model_cfg.weight_decay,
        eps=model_cfg.adam_eps,
    )  # fmt: skip
    lr_scheduler = ema = None
    if example_extras:
        lr_scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=500, num_training_steps=steps)
        ema = EMAModel(net.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4)
    net.train()
    started = 0.0
    for step, batch in enumerate(datamodule.train_dataloader(), start=1):
        x0 = batch["pixel_values"]
        noise = torch.randn_like(x0)
        timesteps = torch.randint(0, schedule.num_train_timesteps, (x0.shape[0],))
        prediction = net(add_noise(x0, noise, alphas_cumprod, timesteps), timesteps).sample
        loss = torch.nn.functional.mse_loss(prediction, noise)
        loss.backward()
        if example_extras:
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        if lr_scheduler is not None and ema is not None:
            lr_scheduler.step()
            ema.step(net.parameters())
        optimizer.zero_grad(set_to_none=True)
        if step == warmup:
            started = time.perf_counter()
        if step == steps:
            return time.perf_counter() - started
    raise RuntimeError("the data loader ended early")


def lightdiff_seconds(cfg: DictConfig, steps: int, warmup: int, default_callbacks: bool) -> float:
    pl.seed_everything(cfg.seed, verbose=False)
    datamodule = build(cfg.data)
    model = build(cfg.model)
    model.attach_data(datamodule)
    clock = StepClock(warmup)
    callbacks = [clock]
    if default_callbacks:
        kept = ("ema", "nonfinite", "random_state", "preemption", "images_per_sec")
        callbacks += [build(node) for key, node in cfg.callbacks.items() if key in kept]
    trainer = pl.Trainer(
        accelerator="cpu",
        precision="32-true",
        max_steps=steps,
        logger=False,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(model, datamodule=datamodule)
    return clock.seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data.batch_size=32")
    args = parser.parse_args()
    cfg = make_config(args.overrides)
    variants: dict[str, Callable[[], float]] = {
        "plain PyTorch loop": lambda: loop_seconds(cfg, args.steps, args.warmup, example_extras=False),
        "diffusers example loop": lambda: loop_seconds(cfg, args.steps, args.warmup, example_extras=True),
        "lightdiff (bare)": lambda: lightdiff_seconds(cfg, args.steps, args.warmup, default_callbacks=False),
        "lightdiff (defaults)": lambda: lightdiff_seconds(cfg, args.steps, args.warmup, default_callbacks=True),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, measure in variants.items():
            times[name].append(measure())
    timed_images = (args.steps - args.warmup) * cfg.data.batch_size
    best = {name: min(values) for name, values in times.items()}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; torch "
        f"{torch.__version__}, lightning {pl.__version__}, diffusers {diffusers.__version__}; commit "
        f"{commit.stdout.strip()}"
    )
    print(
        f"net {cfg.net._target_.split('.')[-1]} {list(cfg.net.block_out_channels)}, {cfg.data.resolution} px, batch "
        f"{cfg.data.batch_size}, fp32; {args.steps - args.warmup} timed steps after {args.warmup}, best of "
        f"{args.repeats}\n"
    )
    print("| variant | seconds | images/s | vs plain loop | vs diffusers example | all runs (s) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, seconds in best.items():
        runs = ", ".join(f"{value:.2f}" for value in times[name])
        print(
            f"| {name} | {seconds:.2f} | {timed_images / seconds:.0f} | {best['plain PyTorch loop'] / seconds:.3f}x | "
            f"{best['diffusers example loop'] / seconds:.3f}x | {runs} |"
        )


if __name__ == "__main__":
    main()
