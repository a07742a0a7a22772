"""What the rest of lightdiff may rely on from a training method: declared here, so no callback guesses.

A method is a `pl.LightningModule` (one file per method under `methods/`, no base class of lightdiff's own) that
also has the members of `TrainingMethod`; `tests/test_contract.py` checks every method against it. The callbacks
(sample grids, FID, EMA), `train.py` and the FSDP strategy use nothing else of it. `sample.py` and the exporter use
no method at all: they read checkpoints (`lightdiff.export.load_trained`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from diffusers import AutoencoderKL


@dataclass
class Preview:
    """What a method shows of itself during training: images for the grid, and what the metrics need to judge them."""

    images: torch.Tensor  # (B, 3, H, W) in [0, 1]: what the shapes metric and FID judge (a video's: every frame)
    labels: torch.Tensor | None = None  # shapes class label each image should show, if known
    grid_images: torch.Tensor | None = None  # what the grid shows, if not `images` (e.g. input | reconstruction)
    metrics: dict[str, float] = field(default_factory=dict)  # method-specific numbers (e.g. PSNR), logged as is
    videos: torch.Tensor | None = None  # (B, F, 3, H, W) in [0, 1]: a video method's clips (the video judge's input)
    prompts: list[str] | None = None  # what each clip (or edit) was asked for ("a red circle moving left"), if known
    sources: torch.Tensor | None = None  # (B, 3, H, W) in [0, 1]: an editing model's source images (the edit judge's)
    first_frames: torch.Tensor | None = None  # (B, 3, H, W) in [0, 1]: an image-to-video model's given frames


@runtime_checkable
class TrainingMethod(Protocol):
    net: torch.nn.Module | None  # the trained denoiser: EMA averages it, sample grids use its averaged weights
    # (None: the method trains no denoiser, e.g. the autoencoder stage)
    class_names: list[str] | None  # label -> name of the data's classes (grid captions, shapes metric)
    metric_steps: list[int] | None  # sampling step counts FID is measured at; None: the metrics callback's own
    distance_prefix: str  # "" for samples; "r" where previews are reconstructions (val/rfid)

    def preview(
        self, seeds: Sequence[int], sampler: Callable[..., Any], steps: int, prompts: Sequence[str] | None = None
    ) -> Preview:
        """Images for the grids and metrics, one per seed, drawn with the current weights; a text model draws seed i
        for prompts[i % len(prompts)] when prompts are given (callbacks.samples.prompts), else for the data's."""
        ...


@runtime_checkable
class LatentCaching(Protocol):
    """A method that can train from latents encoded once (`data.cache_latents=true`; train.py asks it)."""

    def latent_cache_encoders(
        self,
    ) -> tuple[AutoencoderKL, str | None, Callable[[list[str]], torch.Tensor] | None]:
        """The VAE, and where the text states can be cached too, the text encoder's fingerprint and prompt encoding
        (None, None otherwise)."""
        ...


@runtime_checkable
class FinishesTraining(Protocol):
    """A method with state to compute once training ends that belongs in the final checkpoint (the autoencoder's
    latent scaling factor): `callbacks.FinalCheckpoint` calls it just before it writes last.ckpt, and before any
    callback's end-of-run work, which may fail."""

    def finish_training(self) -> None: ...


@runtime_checkable
class NamesPartSources(Protocol):
    """A method that loads some of its networks from elsewhere (a pipeline, a VAE folder): train.log's networks table
    shows where each came from (`part_sources`: a component name or name prefix -> its source)."""

    part_sources: dict[str, str]
