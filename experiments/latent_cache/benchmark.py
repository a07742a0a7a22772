"""Training speed of model=latent with latents encoded on the fly vs read from the latent cache, in one process.

    python experiments/latent_cache/benchmark.py [--steps 60] [--repeats 2]

Both variants train the same default latent model (`python train.py model=latent` minus callbacks and logging) on
the shapes data; runs alternate (fly, cache, fly, cache, ...) so drifts in machine load hit both. The one-off cost
of building the cache is reported separately. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from lightdiff.config import build

CONF = Path(__file__).resolve().parents[2] / "conf"


def train_seconds(cfg, cache_latents: bool, steps: int) -> tuple[float, float]:
    """(seconds for `steps` training steps, seconds spent preparing the data, the cache included)."""
    started = time.perf_counter()
    datamodule = build(cfg.data, cache_latents=cache_latents)
    model = build(cfg.model, data=datamodule)
    if cache_latents:
        datamodule.use_latent_cache(*model.latent_cache_encoders())
    prepared = time.perf_counter()
    trainer = pl.Trainer(
        max_steps=steps,
        logger=False,
        callbacks=[],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        precision="32-true",
    )
    begin = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    return time.perf_counter() - begin, prepared - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["model=latent", "schedule=cosine"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
        cfg.data.latent_cache_dir = tempfile.mkdtemp(prefix="latent_cache_bench_")
    batch = cfg.data.batch_size
    _, build_cache = train_seconds(cfg, True, 1)  # builds the cache (and warms up)
    _, _ = train_seconds(cfg, False, 1)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.repeats):
        for cached in (False, True):
            seconds, _ = train_seconds(cfg, cached, args.steps)
            times[cached].append(seconds)
    fly, cache = min(times[False]), min(times[True])
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}"
    )
    print(f"default latent model, batch {batch}, {args.steps} steps, best of {args.repeats}\n")
    print("| variant | seconds | images/s |\n| --- | --- | --- |")
    print(f"| encode on the fly | {fly:.1f} | {args.steps * batch / fly:.0f} |")
    print(f"| latent cache | {cache:.1f} | {args.steps * batch / cache:.0f} |")
    print(f"\nspeed-up: {fly / cache:.2f}x; building the cache of {cfg.data.size} images took {build_cache:.1f} s")


if __name__ == "__main__":
    main()
