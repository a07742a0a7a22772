"""UNet vs DiT vs MMDiT on shapes, side by side in one process: training speed, sampling speed and quality.

    python experiments/arch_shapes/compare.py RUN_DIR [RUN_DIR ...] [--num-images 1000] [--steps 28]
        [--train-steps 30] [--features random_conv|shapes]

For each run folder (outputs/<run_name>/, trained by run.sh): parameters of the denoiser, its forward FLOPs per
image (torch.utils.flop_counter), training images/s (the run's config, lightdiff's defaults, median step of
`--train-steps` steps measured here, one run after another, as in experiments/train_throughput), and `sample.py`
on its last checkpoint (EMA weights, flow_euler sampler, `--steps` steps, the same seeds, labels / captions cycling
through the 24 classes): images/s, the shapes metric (valid share, and right shape and colour for the class or
caption) and FID / KID against the shapes training images with lightdiff's offline FID substitute
(RandomConvFeatures, its own scale), or with `--features shapes` on `ShapesFeatures` (a network that sees shape,
colour, position and size), with precision, recall and the within-caption spread as a ratio to the data's (sample.py's
`variety`: what a collapsed model loses). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict
from torch.utils.flop_counter import FlopCounterMode

import lightdiff.config  # noqa: F401  (registers the config resolvers)
from lightdiff.nets.denoiser import network_output
from lightdiff.nets.families import family_of
from lightdiff.nets.vae import vae_scale_factor
from lightdiff.sample import run as sample_run
from lightdiff.trained import load_denoiser

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments" / "train_throughput"))
from benchmark import lightdiff_step_times  # noqa: E402


def forward_flops(run_dir: Path) -> tuple[str, int, int]:
    """(class, parameters, forward FLOPs per image) of the run's denoiser, counted on one image."""
    denoiser = load_denoiser(run_dir / "checkpoints" / "last.ckpt")
    net = denoiser.net.eval()
    factor = vae_scale_factor(denoiser.vae) if denoiser.vae is not None else 1
    height, width = (side // factor for side in denoiser.default_size())  # FLUX has no sample_size: the trained size
    x = torch.randn(1, family_of(net).latent_channels(net), height, width)
    t = torch.tensor([500])
    counter = FlopCounterMode(display=False)
    inputs = {"label": torch.tensor([0]), "text": ["a red circle"]}  # each family reads what it needs
    condition = denoiser.conditioning(inputs)
    with counter, torch.no_grad():
        network_output(net, x, t, condition)
    return type(net).__name__, sum(p.numel() for p in net.parameters()), counter.get_total_flops()


def training_step_seconds(run_dir: Path, steps: int) -> tuple[float, int]:
    """Median seconds per training step of the run's config (fresh weights) and its batch size."""
    config = OmegaConf.load(run_dir / "config.yaml")
    with open_dict(config):
        config.output_root = tempfile.mkdtemp(prefix="arch_")
        config.run_dir = str(Path(config.output_root) / "speed")
    times = lightdiff_step_times(config, steps, min(10, steps // 3), torch.device("cpu"), "defaults")
    return statistics.median(times), int(config.data.batch_size)


def sample_and_judge(run_dir: Path, num_images: int, steps: int, features: str) -> tuple[dict, float]:
    out = Path(tempfile.mkdtemp(prefix="arch_samples_")) / run_dir.name
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "sample",
            overrides=[
                f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}",
                f"out={out}",
                f"num_images={num_images}",
                "batch_size=250",
                "sampler=flow_euler",
                f"steps={steps}",
                "metrics=fid",
                f"metrics/features={features}",
                f"metrics.num_samples={num_images}",
                "metrics.cache_dir=null",
                "device=cpu",
            ],
            return_hydra_config=True,
        )
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    started = time.perf_counter()
    folder = sample_run(cfg)
    seconds = time.perf_counter() - started  # sampling, PNG writing and the metrics
    return json.loads((folder / "metrics.json").read_text()), seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--features", choices=["random_conv", "shapes"], default="random_conv")
    args = parser.parse_args()
    spatial = args.features == "shapes"
    rows = []
    for run_dir in args.runs:
        config = OmegaConf.load(run_dir / "config.yaml")
        net_class, parameters, flops = forward_flops(run_dir)  # a distilled student has no `net` group: its class
        step_seconds, batch = training_step_seconds(run_dir, args.train_steps)
        metrics, sample_seconds = sample_and_judge(run_dir, args.num_images, args.steps, args.features)
        shapes = metrics["shapes"]
        right = shapes.get("both", shapes.get("caption_both"))
        found = metrics.get("variety", {})
        variety = (
            f" {found['precision']:.3f} | {found['recall']:.3f} | {found.get('diversity', float('nan')):.2f}x |"
            if spatial
            else ""
        )
        rows.append(
            f"| {run_dir.name} | {config.model._target_.split('.')[-1]} | {net_class} | "
            f"{parameters / 1e6:.2f}M | {flops / 1e6:.1f} | {config.trainer.max_steps} | {batch / step_seconds:.0f} | "
            f"{args.num_images / sample_seconds:.1f} | {shapes['valid']:.1%} | "
            f"{'-' if right is None else f'{right:.1%}'} | {metrics['fid']:.3f} | {metrics['kid']:.4f} |{variety}"
        )
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(
        f"{args.num_images} images per row, flow_euler {args.steps} steps, EMA weights; training images/s: median of "
        f"{args.train_steps} steps measured here; sampling images/s include PNG writing and the metrics\n"
    )
    distance = (
        "FID (shapes features) | KID | precision | recall | within-caption spread vs data"
        if spatial
        else ("FID (substitute) | KID")
    )
    header = (
        "| run | method | net | parameters | forward MFLOP/image | trained steps | train images/s | sample images/s "
        f"| valid | right class / caption | {distance} |"
    )
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
