"""FID and KID of a method's images against the training data, every `every_n_steps` steps and at the end.

The images are the method's preview (`pl_module.preview(seeds, sampler, steps).images`, in [0, 1]): samples for a
diffusion model (text models prompted with the data set's captions, class models with its labels), reconstructions
for the autoencoder, whose numbers are logged as rFID / rKID (`val/rfid`). The feature network is config
(`metrics.features`): Inception for published-comparable FID, or any `nn.Module` that maps [0, 1] images to
features (lightdiff/metrics/features.py). The statistics, their cache and multi-process handling are
`lightdiff.metrics.fid.FrechetEvaluator`'s.

Multi-GPU: rank r generates seeds r, r + W, r + 2W, ... of the `num_samples` (no padding, so no image is counted
twice) and the statistics of all ranks are summed; the result equals the single-process one on the same images.
Every rank evaluates at the same steps, which the step-based schedule guarantees.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from lightdiff.callbacks.samples import method_previews
from lightdiff.data.shapes import ShapesDataset
from lightdiff.diffusion import SchedulerFactory
from lightdiff.metrics.fid import FrechetEvaluator
from lightdiff.metrics.shapes import ShapeJudgement, judge_image, summarise_judgements, wanted_classes
from lightdiff.sampling import seed_problem, to_uint8

log = logging.getLogger(__name__)


def all_ranks(items: list[Any]) -> list[Any]:
    """The concatenation of every rank's `items` (in rank order); `items` itself in a single process."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return items
    gathered: list[list[Any]] = [[] for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


class FrechetDistance(pl.Callback):
    """Logs `val/fid` and `val/kid` (`val/rfid`, `val/rkid` for methods whose images are reconstructions), and on
    shapes data the shapes metric of the same images (`val/shapes_valid`, `val/shapes_both`, ...)."""

    def __init__(
        self,
        features: nn.Module,  # maps float images in [0, 1] (B, 3, H, W) to features (B, D)
        sampler: SchedulerFactory,  # the diffusers scheduler that generates (the `sampler` config group)
        every_n_steps: int = 5000,  # optimiser steps between evaluations; 0: only at the end of training
        num_samples: int = 1000,  # generated images per evaluation, and real images in the reference set
        batch_size: int = 100,  # images generated at once
        steps: int | list[int] = 50,  # denoising steps per image; a list evaluates each, e.g. [1, 2, 4] for a student
        seed: int = 0,  # image i uses seed + i (the autoencoder reconstructs data set image seed + i)
        kid_subset_size: int = 1000,  # KID's subset size (at most num_samples)
        cache_dir: str | None = "outputs/fid_cache",  # reference statistics kept here; None: never cached
    ) -> None:
        if every_n_steps < 0:
            raise ValueError(f"metrics.every_n_steps={every_n_steps} must be >= 0")
        if problem := seed_problem(seed, num_samples, "metrics.seed"):
            raise ValueError(problem)
        self.evaluator = FrechetEvaluator(features, num_samples, batch_size, kid_subset_size, cache_dir, seed)
        self.sampler = sampler
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.steps = [steps] if isinstance(steps, int) else list(steps)
        if not self.steps or min(self.steps) < 1:
            raise ValueError(f"metrics.steps={steps} must be a positive step count or a list of them")
        self.seed = seed
        self._last_step = -1

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self._last_step:
            self._last_step = step
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step != self._last_step:
            self.evaluate(trainer, pl_module)

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Every rank generates its share; every rank gets the metrics; rank 0 logs them, and the seconds it took.

        Keys: `val/fid`, `val/kid` (`r` before `fid`/`kid` for reconstructions); with a list of step counts (the
        `steps` argument, or the method's own `metric_steps`, which wins) one pair per count, e.g. `val/fid_1step`.
        """
        started = time.perf_counter()
        evaluator = self.evaluator.to(pl_module.device)
        if not evaluator.has_reference:
            datamodule = trainer.datamodule
            evaluator.set_reference(datamodule.source_dataset, datamodule.reference_identity, trainer.global_rank)
        seeds = list(range(self.seed, self.seed + self.num_samples))[trainer.global_rank :: trainer.world_size]
        prefix = pl_module.distance_prefix  # "r": the images are reconstructions (lightdiff.contract.TrainingMethod)
        metrics: dict[str, float] = {}
        on_shapes = isinstance(trainer.datamodule.source_dataset, ShapesDataset)
        step_counts = pl_module.metric_steps or self.steps  # a turbo student: its 1, 2, 4 steps
        for steps in step_counts:
            judged: list[tuple[ShapeJudgement, tuple[str | None, str | None] | None]] = []
            for preview in method_previews(trainer, pl_module, seeds, self.sampler, steps, self.batch_size):
                evaluator.update(preview.images)
                if on_shapes:  # the same images, judged by the shapes metric
                    wanted = wanted_classes(len(preview.images), preview.labels) or [None] * len(preview.images)
                    judged += [(judge_image(image), w) for image, w in zip(to_uint8(preview.images), wanted)]
            suffix = "" if len(step_counts) == 1 else f"_{steps}step" + ("s" if steps > 1 else "")
            metrics.update({f"val/{prefix}{name}{suffix}": value for name, value in evaluator.compute().items()})
            if on_shapes:
                judged = all_ranks(judged)
                wanted = None if judged[0][1] is None else [w for _, w in judged]
                shapes = summarise_judgements([j for j, _ in judged], wanted)
                metrics.update({f"val/shapes_{name}{suffix}": value for name, value in shapes.items()})
        metrics["perf/fid_seconds"] = time.perf_counter() - started  # the cost of this evaluation, for its share
        if trainer.global_rank == 0:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
            log.info("step %d: %s over %d images", trainer.global_step, metrics, self.num_samples)
        return metrics
