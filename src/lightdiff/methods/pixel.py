"""Pixel-space DDPM (Ho et al. 2020) with epsilon, v or x0 prediction, min-SNR weighting and offset noise."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from diffusers import UNet2DModel

from lightdiff.config import ConfigError
from lightdiff.data import ImageDataModule
from lightdiff.diffusion import (
    LossWeighting,
    NoiseSchedule,
    PredictionType,
    add_noise,
    check_objective,
    loss_weight,
    offset_noise,
    training_target,
    weighted_mse,
)
from lightdiff.methods.checkpoint_checks import check_checkpoint_fits
from lightdiff.methods.optimization import adamw_with_warmup, global_grad_norm
from lightdiff.methods.preview import Preview
from lightdiff.sampling import SchedulerFactory, generate, generators_for, make_scheduler

CHECKPOINT_FORMAT = 1  # bump when the "lightdiff" block of a checkpoint changes meaning


class PixelDiffusion(pl.LightningModule):
    """Learns to denoise x_t = alpha_t x_0 + sigma_t eps with a diffusers UNet2DModel, directly on pixels."""

    def __init__(
        self,
        net: UNet2DModel,  # the denoiser; class-conditional when net.config.num_class_embeds is set
        schedule: NoiseSchedule,  # the forward process (the `schedule` config group)
        prediction_type: PredictionType = "epsilon",  # network target: epsilon | v_prediction | sample
        loss_weighting: LossWeighting = "none",  # none | min_snr (Hang et al. 2023)
        min_snr_gamma: float = 5.0,  # gamma of min-SNR weighting
        offset_noise: float = 0.0,  # strength of per-channel offset noise (0 disables)
        lr: float = 1e-4,  # peak AdamW learning rate
        adam_betas: tuple[float, float] = (0.9, 0.999),  # AdamW (beta1, beta2)
        weight_decay: float = 0.0,  # AdamW decoupled weight decay
        adam_eps: float = 1e-8,  # AdamW epsilon
        lr_schedule: Literal["constant", "cosine"] = "constant",  # after warm-up: constant, or cosine to 0 at max_steps
        warmup_steps: int = 0,  # linear learning-rate warm-up from 0
        max_grad_norm: float | None = 1.0,  # clip the gradients' global L2 norm to this (None: no clipping)
    ) -> None:
        super().__init__()
        # Checked here, not at the first step, so a typo fails before any output is written.
        check_objective(prediction_type, loss_weighting, min_snr_gamma)
        if lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"model.lr_schedule={lr_schedule!r} is not one of ('constant', 'cosine')")
        self.net = net
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.loss_weighting = loss_weighting
        self.min_snr_gamma = min_snr_gamma
        self.offset_noise = offset_noise
        self.lr = lr
        self.adam_betas = tuple(adam_betas)
        self.weight_decay = weight_decay
        self.adam_eps = adam_eps
        self.lr_schedule = lr_schedule
        self.warmup_steps = warmup_steps
        self.max_grad_norm = max_grad_norm
        self.class_names: list[str] | None = None  # label -> name, from the data set (attach_data)
        # float32 copy of alpha_bar; not persistent, it is a pure function of the schedule.
        self.register_buffer("alphas_cumprod", schedule.alphas_cumprod().float(), persistent=False)

    def attach_data(self, datamodule: ImageDataModule) -> None:
        """Check that the network fits the data (before anything is written) and keep the class names."""
        num_class_embeds = self.net.config.num_class_embeds
        if num_class_embeds is not None and datamodule.num_classes == 0:
            raise ConfigError("net.num_class_embeds is set but the data set has no labels; set it to null")
        if num_class_embeds is not None and datamodule.num_classes > num_class_embeds:
            raise ConfigError(
                f"net.num_class_embeds={num_class_embeds} is below the data set's {datamodule.num_classes} classes"
            )
        if self.net.config.sample_size != datamodule.resolution:
            raise ConfigError(
                f"net.sample_size={self.net.config.sample_size} differs from data.resolution={datamodule.resolution}"
            )
        if datamodule.cache_latents:
            raise ConfigError("data.cache_latents=true is for model=latent; a pixel model has no VAE")
        self.class_names = datamodule.class_names

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x0 = batch["pixel_values"]
        labels = batch["label"] if self.net.config.num_class_embeds is not None else None
        noise = offset_noise(torch.randn_like(x0), self.offset_noise)
        timesteps = torch.randint(0, self.schedule.num_train_timesteps, (x0.shape[0],), device=x0.device)
        x_t = add_noise(x0, noise, self.alphas_cumprod, timesteps)
        prediction = self.net(x_t, timesteps, class_labels=labels).sample
        target = training_target(self.prediction_type, x0, noise, self.alphas_cumprod, timesteps)
        weight = loss_weight(
            self.loss_weighting, self.prediction_type, self.alphas_cumprod, timesteps, self.min_snr_gamma
        )
        loss = weighted_mse(prediction, target, weight)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)  # the global batch's mean under DDP
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])  # the rate this step's update uses
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        norm = global_grad_norm(self.net.parameters())  # before clipping, so a spike shows at its true size
        if norm is not None:
            self.log("train/grad_norm", norm)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        # The method owns its clipping (model.max_grad_norm): trainer.gradient_clip_val cannot serve GAN methods,
        # which Lightning runs under manual optimisation.
        if self.max_grad_norm is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")

    def configure_optimizers(self) -> dict[str, Any]:
        return adamw_with_warmup(
            self.net.parameters(),
            self.lr,
            self.adam_betas,
            self.weight_decay,
            self.lr_schedule,
            self.warmup_steps,
            self.trainer.max_steps,
            self.adam_eps,
        )

    @torch.no_grad()
    def generate(
        self,
        seeds: Sequence[int],
        sampler: SchedulerFactory,
        steps: int,
        labels: torch.Tensor | None = None,
        eta: float = 0.0,
    ) -> torch.Tensor:
        """Images in [0, 1], (B, 3, H, W), one per seed, with the current weights of `self.net`."""
        scheduler = make_scheduler(sampler, self.schedule, self.prediction_type)
        return generate(self.net, scheduler, steps, generators_for(seeds), class_labels=labels, eta=eta)

    def preview(self, seeds: Sequence[int], sampler: SchedulerFactory, steps: int) -> Preview:
        """Samples for the training-time grid; class-conditional models draw class seed % num_classes."""
        labels = None
        if self.net.config.num_class_embeds is not None:
            labels = torch.tensor(list(seeds)) % self.net.config.num_class_embeds
        return Preview(images=self.generate(seeds, sampler, steps, labels=labels), labels=labels)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_checkpoint_fits(self, checkpoint)  # a checkpoint of another net config: name the keys, not a torch error

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Plain data only: enough to rebuild the network and sampler without this class or its config.
        checkpoint["lightdiff"] = {
            "format": CHECKPOINT_FORMAT,
            "method": "pixel",
            "net_class": type(self.net).__name__,
            "net_config": {k: v for k, v in self.net.config.items() if not k.startswith("_")},
            "schedule": dict(vars(self.schedule)),
            "prediction_type": self.prediction_type,
            "class_names": self.class_names,
        }
