"""Fixed-seed sample grids during training (and the shapes metric beside them on the shapes data set); a video
method's clips as a grid of frames (a clip per row) and one mp4 of all clips playing side by side, judged by the
video judge on moving-shapes data."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_only

from lightdiff.callbacks.ema import find_ema
from lightdiff.callbacks.preemption import preemption_pending
from lightdiff.config import ConfigError
from lightdiff.contract import Preview
from lightdiff.data.moving_shapes import MovingShapesDataset
from lightdiff.data.shapes import ShapesDataset
from lightdiff.data.shapes_edit import ShapesEditDataset
from lightdiff.diffusion import SchedulerFactory
from lightdiff.files import write_text_atomically
from lightdiff.metrics import ShapesFeatures, shapes_metric
from lightdiff.metrics.diversity import caption_groups, grouped_image_variety, variety
from lightdiff.metrics.edits import edit_metrics
from lightdiff.metrics.motion import clip_features, first_frame_kept, motion_metric, unit_clips
from lightdiff.sampling import (
    frames_grid,
    grid_columns,
    grid_video,
    image_grid,
    seed_problem,
    to_uint8,
    write_video,
)

log = logging.getLogger(__name__)

VARIETY_NEIGHBOURS = 3  # k of the diagnostics' precision and recall (Kynkaanniemi et al. 2019's)


def method_previews(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    seeds: list[int],
    sampler: SchedulerFactory,
    steps: int,
    batch_size: int,
    prompts: list[str] | None = None,
) -> list[Preview]:
    """The method's previews of `seeds` (for `prompts`, when given), `batch_size` at a time, in eval mode and with EMA
    weights where the run averages a denoiser (`pl_module.net`)."""
    ema = find_ema(trainer)
    weights = ema.averaged_weights(pl_module.net) if ema is not None and ema.ema is not None else nullcontext()
    was_training = pl_module.training
    pl_module.eval()
    try:
        with weights:
            return [
                pl_module.preview(seeds[start : start + batch_size], sampler, steps, prompts=prompts)
                for start in range(0, len(seeds), batch_size)
            ]
    finally:
        pl_module.train(was_training)


def validation_prompts(prompts: list[str] | None, prompts_file: str | None) -> list[str] | None:
    """callbacks.samples.prompts, or the lines of prompts_file (blank lines and # comments left out); checked now,
    before the run writes anything."""
    if prompts is not None and prompts_file is not None:
        raise ConfigError("callbacks.samples.prompts and callbacks.samples.prompts_file are both set: give one")
    if prompts_file is not None:
        path = Path(prompts_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"callbacks.samples.prompts_file={prompts_file!r} is not a file")
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        prompts = [line for line in lines if line and not line.startswith("#")]
        if not prompts:
            raise ConfigError(f"callbacks.samples.prompts_file={prompts_file!r} holds no prompt")
    if prompts is not None:
        prompts = [str(prompt) for prompt in prompts]
        if not prompts or not all(prompt.strip() for prompt in prompts):
            raise ConfigError(f"callbacks.samples.prompts={prompts!r}: give non-empty prompts")
    return prompts


class SampleGrid(pl.Callback):
    """Every `every_n_steps` optimiser steps and at the end of training: the method's preview, with fixed seeds.

    The method decides what a preview is (`pl_module.preview(seeds, sampler, steps) -> Preview`): samples for a
    diffusion model, reconstructions for an autoencoder. The same seeds each time, so grids are comparable across
    steps and runs. EMA weights are used when the run averages a denoiser (`pl_module.net`).

    Validation prompts (`prompts`, or `prompts_file` with one a line): a text model also draws seed + i for prompt i
    at every grid and at the end, as samples/validation_stepN.png (and wandb `validation/grid`, captioned), so the
    prompts a researcher cares about are followed through training, not only the data's captions.
    """

    def __init__(
        self,
        sampler: SchedulerFactory,  # the diffusers scheduler to sample with (the `sampler` config group)
        every_n_steps: int = 500,  # optimiser steps between grids; 0 samples only at the end
        num_images: int = 64,  # images in the grid
        steps: int = 50,  # denoising steps per image
        seed: int = 0,  # image i uses seed + i
        final_num_images: int = 256,  # images judged by the shapes metric at the end of training; 0: no final round
        upscale: int = 4,  # nearest-neighbour upscaling of the saved grid, so small images stay visible
        prompts: list[str] | None = None,  # validation prompts of a text model, drawn at every grid
        prompts_file: str | None = None,  # or a text file of them, one a line (blank lines and # comments ignored)
    ) -> None:
        for key, value, least in (
            ("every_n_steps", every_n_steps, 0),
            ("num_images", num_images, 1),
            ("steps", steps, 1),
            ("final_num_images", final_num_images, 0),
            ("upscale", upscale, 1),
        ):
            if value < least:
                raise ConfigError(f"callbacks.samples.{key}={value} must be >= {least}")
        if problem := seed_problem(seed, max(num_images, final_num_images), "callbacks.samples.seed"):
            raise ConfigError(problem)
        self.prompts = validation_prompts(prompts, prompts_file)
        self.sampler = sampler
        self.every_n_steps = every_n_steps
        self.num_images = num_images
        self.steps = steps
        self.seed = seed
        self.final_num_images = final_num_images
        self.upscale = upscale
        self._last_sampled_step = -1  # under gradient accumulation several batches end on the same step
        self._last_validated_step = -1  # the final round may fall on a grid's step: drawn once
        self._features: ShapesFeatures | None = None  # the variety diagnostics' features, built on first use

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        reads = getattr(getattr(pl_module, "conditioning", None), "reads", ())
        if self.prompts and "text" not in reads:
            raise ConfigError(
                f"callbacks.samples.prompts: {type(pl_module).__name__} here reads no prompts (its conditioning reads "
                f"{sorted(reads) or 'nothing'}); validation prompts are for text models"
            )

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if preemption_pending(trainer):  # the preemption checkpoint comes first; the grid is not worth the wait
            return
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self._last_sampled_step:
            self._last_sampled_step = step
            self._sample_and_log(trainer, pl_module, self.num_images, "samples")
            self._validation_prompts(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.final_num_images == 0:
            return
        self._validation_prompts(trainer, pl_module)
        metrics = self._sample_and_log(trainer, pl_module, self.final_num_images, "final")
        if metrics and trainer.is_global_zero:
            path = Path(trainer.default_root_dir) / "final_metrics.json"
            # atomically: a preemption signal in this round stops it where it stands, never mid-file
            write_text_atomically(path, json.dumps({"step": trainer.global_step, **metrics}, indent=2) + "\n")
            log.info("final sample metrics at step %d: %s (written to %s)", trainer.global_step, metrics, path)

    def _validation_prompts(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.prompts and trainer.global_step != self._last_validated_step:
            self._last_validated_step = trainer.global_step
            self._sample_and_log(trainer, pl_module, len(self.prompts), "validation", self.prompts)

    @rank_zero_only
    def _sample_and_log(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        count: int,
        prefix: str,
        prompts: list[str] | None = None,
    ) -> dict[str, float]:
        seeds = list(range(self.seed, self.seed + count))
        # The grid's size bounds the batch's memory.
        previews = method_previews(trainer, pl_module, seeds, self.sampler, self.steps, self.num_images, prompts)
        if previews[0].videos is not None:
            return self._log_clips(trainer, previews, prefix)
        pixels = to_uint8(torch.cat([p.images for p in previews]))
        labels = torch.cat([p.labels for p in previews]) if previews[0].labels is not None else None
        grid_images = previews[0].grid_images if previews[0].grid_images is not None else previews[0].images
        step = trainer.global_step
        shown = min(len(grid_images), self.num_images)  # the final round samples more images than the grid shows
        grid = image_grid(to_uint8(grid_images[:shown]), scale=self.upscale)
        folder = Path(trainer.default_root_dir) / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        grid.save(folder / f"{prefix}_step{step:07d}.png")

        metrics = {f"{prefix}/{name}": value for name, value in previews[0].metrics.items()}
        datamodule = getattr(trainer, "datamodule", None)
        if isinstance(getattr(datamodule, "source_dataset", None), ShapesDataset):
            scores = shapes_metric(pixels, labels=labels.tolist() if labels is not None else None)
            metrics.update({f"{prefix}/shapes_{name}": value for name, value in scores.items()})
            found = self._variety(datamodule, pixels, labels.tolist() if labels is not None else None)
            metrics.update({f"{prefix}/{name}": value for name, value in found.items()})
        if (
            isinstance(getattr(datamodule, "source_dataset", None), ShapesEditDataset)
            and previews[0].sources is not None
        ):
            sources = to_uint8(torch.cat([p.sources for p in previews]))
            asked = [prompt for p in previews for prompt in (p.prompts or [])]
            metrics.update({f"{prefix}/{name}": value for name, value in edit_metrics(sources, pixels, asked).items()})
        for logger in trainer.loggers:
            if metrics:
                logger.log_metrics(metrics, step=step)
            if isinstance(logger, WandbLogger):
                if prompts:
                    caption = " | ".join(prompts[: grid_columns(shown)])
                    logger.log_image(key=f"{prefix}/grid", images=[grid], caption=[f"first row: {caption}"], step=step)
                elif labels is not None and pl_module.class_names:
                    caption = ", ".join(pl_module.class_names[int(label)] for label in labels[: grid_columns(shown)])
                    logger.log_image(key=f"{prefix}/grid", images=[grid], caption=[f"first row: {caption}"], step=step)
                else:
                    logger.log_image(key=f"{prefix}/grid", images=[grid], step=step)
        return metrics

    def _variety(self, datamodule: Any, generated: np.ndarray, groups: Sequence[object] | None) -> dict[str, float]:
        """The collapse diagnostics of a preview batch (uint8 images (N, H, W, 3) or clips (N, F, H, W, 3)) made for
        `groups` (classes or captions), against as many of the data's own items: recall and precision on
        `ShapesFeatures` (of three frames for clips), and the spread within a class or caption as a ratio to the
        data's ("diversity", where some are drawn twice), so that a sweep can select on variety beside adherence
        (`lightdiff.metrics.diversity.variety`). Nothing below k + 1 items."""
        dataset = datamodule.source_dataset
        count = min(len(generated), len(dataset))
        if count <= VARIETY_NEIGHBOURS:
            return {}
        if self._features is None:
            # building its network draws initial weights from the global generator before the shipped ones are read:
            # forked, so that the run's random stream (exact resume) never depends on when the first preview came
            with torch.random.fork_rng(devices=[]):
                self._features = ShapesFeatures()
        with torch.random.fork_rng(devices=[]):  # a random view (data.random_flip) must not move the run's stream
            items = [dataset[index] for index in range(count)]
        side = generated.shape[-3:-1]
        if any(tuple(item["pixel_values"].shape[-2:]) != side for item in items):
            return {}  # variable-aspect data (buckets): no like-for-like reference at the previews' square size
        real = torch.stack([item["pixel_values"] for item in items]).float().div(2).add(0.5).clamp(0, 1)
        our_keys = list(groups[:count]) if groups is not None else None
        if generated.ndim == 5:  # clips: grouped by caption, embedded by three of their frames
            ours = unit_clips(generated[:count])
            with torch.no_grad():
                real_features, our_features = (clip_features(x, self._features) for x in (real, ours))
            our_groups = caption_groups(our_keys) if our_keys is not None else None
            real_groups = caption_groups([item["text"] for item in items])
            found = variety(real_features, our_features, real, real_groups, ours, our_groups, k=VARIETY_NEIGHBOURS)
        else:
            labels = [item["label"] for item in items]
            found = grouped_image_variety(self._features, real, labels, generated[:count], our_keys, VARIETY_NEIGHBOURS)
        return {name: value for name, value in found.items() if name != "within_caption_distance"}

    def _log_clips(self, trainer: pl.Trainer, previews: list[Preview], prefix: str) -> dict[str, float]:
        """A video method's previews: samples/<prefix>_stepN.png (a clip per row: input above reconstruction for an
        autoencoder) and .mp4 (every clip side by side), logged to wandb as an image and a video; the video judge's
        fractions on moving-shapes data."""
        clips = to_uint8(torch.cat([p.videos for p in previews]))
        shown_clips = previews[0].grid_images if previews[0].grid_images is not None else previews[0].videos
        shown = to_uint8(shown_clips[: self.num_images])
        step = trainer.global_step
        folder = Path(trainer.default_root_dir) / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        grid = frames_grid(shown, scale=self.upscale)
        grid.save(folder / f"{prefix}_step{step:07d}.png")
        video = write_video(grid_video(shown, scale=self.upscale), folder / f"{prefix}_step{step:07d}.mp4", VIDEO_FPS)
        metrics = {f"{prefix}/{name}": value for name, value in previews[0].metrics.items()}
        prompts = [prompt for p in previews for prompt in (p.prompts or [])]
        datamodule = getattr(trainer, "datamodule", None)
        if isinstance(getattr(datamodule, "source_dataset", None), MovingShapesDataset):
            scores = motion_metric(clips, prompts if len(prompts) == len(clips) else None)
            found = self._variety(datamodule, clips, prompts if len(prompts) == len(clips) else None)
            metrics.update({f"{prefix}/{name}": value for name, value in found.items()})
            if previews[0].first_frames is not None:  # image-to-video: does each clip start from its frame
                given = to_uint8(torch.cat([p.first_frames for p in previews]))
                scores["first_frame_kept"] = first_frame_kept(clips, given)
            metrics.update({f"{prefix}/motion_{name}": value for name, value in scores.items()})
        for logger in trainer.loggers:
            if metrics:
                logger.log_metrics(metrics, step=step)
            if isinstance(logger, WandbLogger):
                caption = ", ".join(prompts[: len(shown)]) if prompts else None
                logger.log_image(key=f"{prefix}/grid", images=[grid], caption=[caption] if caption else None, step=step)
                logger.log_video(key=f"{prefix}/video", videos=[str(video)], step=step, format=["mp4"])
        return metrics


VIDEO_FPS = 4  # the preview videos' frame rate: a 9-frame clip plays in about two seconds
