"""Pixel-space diffusion: DDPM (Ho et al. 2020) with epsilon, v or x0 prediction, min-SNR weighting and offset noise,
or rectified flow matching (`objective=flow_matching`, Esser et al. 2024), with a UNet or a class-conditional DiT."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from diffusers import DiTTransformer2DModel, UNet2DModel

from lightdiff.config import ConfigError
from lightdiff.data import ImageDataModule
from lightdiff.diffusion import (
    DDPM,
    FlowMatching,
    LossWeighting,
    NoiseSchedule,
    Objective,
    PredictionType,
    check_objective,
    noisy_batch,
    objective_from_state,
    offset_noise,
    weighted_mse,
)
from lightdiff.methods.checkpoint_checks import check_checkpoint_fits
from lightdiff.methods.optimization import adamw_with_warmup, clip_and_measure_gradients
from lightdiff.methods.preview import Preview
from lightdiff.nets.denoiser import denoiser_output, num_classes, takes_text, zero_adaln_gates
from lightdiff.sampling import SchedulerFactory, generate, generators_for, make_scheduler
from lightdiff.speed import prepare_for_training

CHECKPOINT_FORMAT = 1  # bump when the "lightdiff" block of a checkpoint changes meaning


class PixelDiffusion(pl.LightningModule):
    """Learns to denoise x_t = alpha_t x_0 + sigma_t eps (or to follow the flow from x_0 to eps) with a diffusers
    UNet2DModel or DiTTransformer2DModel, directly on pixels."""

    def __init__(
        self,
        net: UNet2DModel | DiTTransformer2DModel,  # the denoiser; class-conditional when it embeds classes
        schedule: NoiseSchedule,  # the forward process of objective=ddpm (the `schedule` config group)
        objective: Objective = DDPM(),  # noqa: B008  ddpm | flow_matching (the `objective` group; frozen dataclass)
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
        compile: bool = False,  # torch.compile the denoiser (regional where diffusers defines repeated blocks)
        channels_last: bool = False,  # NHWC weights: faster convolutions on GPU (the yaml turns it on with CUDA)
        gradient_checkpointing: bool = False,  # recompute activations in backward: less memory, more time
        fused_adamw: bool = False,  # one fused AdamW kernel for all parameters (the yaml turns it on with CUDA)
    ) -> None:
        super().__init__()
        # Checked here, not at the first step, so a typo fails before any output is written.
        check_objective(prediction_type, loss_weighting, min_snr_gamma)
        check_flow_settings(objective, prediction_type, loss_weighting)
        if lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"model.lr_schedule={lr_schedule!r} is not one of ('constant', 'cosine')")
        if takes_text(net):
            raise ConfigError(f"net: {type(net).__name__} is text-conditioned; model=pixel has no text (model=latent)")
        self.net = zero_adaln_gates(net)  # a transformer's blocks start as the identity (DiT's adaLN-Zero)
        self.schedule = schedule
        self.objective = objective
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
        self.compile_net = compile  # not `self.compile`: that is nn.Module's method
        self.channels_last = channels_last
        self.gradient_checkpointing = gradient_checkpointing
        self.fused_adamw = fused_adamw
        self.class_names: list[str] | None = None  # label -> name, from the data set (attach_data)
        # float32 copy of alpha_bar; not persistent, it is a pure function of the schedule.
        self.register_buffer("alphas_cumprod", schedule.alphas_cumprod().float(), persistent=False)

    def attach_data(self, datamodule: ImageDataModule) -> None:
        """Check that the network fits the data (before anything is written) and keep the class names."""
        num_class_embeds = num_classes(self.net)
        key = "net.num_embeds_ada_norm" if isinstance(self.net, DiTTransformer2DModel) else "net.num_class_embeds"
        if num_class_embeds is not None and datamodule.num_classes == 0:
            raise ConfigError(f"{key} is set but the data set has no labels; set it to null (a DiT needs labels)")
        if num_class_embeds is not None and datamodule.num_classes > num_class_embeds:
            raise ConfigError(f"{key}={num_class_embeds} is below the data set's {datamodule.num_classes} classes")
        if self.net.config.sample_size != datamodule.resolution:
            raise ConfigError(
                f"net.sample_size={self.net.config.sample_size} differs from data.resolution={datamodule.resolution}"
            )
        if datamodule.cache_latents:
            raise ConfigError("data.cache_latents=true is for model=latent; a pixel model has no VAE")
        self.class_names = datamodule.class_names

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x0 = batch["pixel_values"]
        labels = batch["label"] if num_classes(self.net) is not None else None
        noise = offset_noise(torch.randn_like(x0), self.offset_noise)
        example = noisy_batch(
            self.objective,
            x0,
            noise,
            self.alphas_cumprod,
            self.prediction_type,
            self.loss_weighting,
            self.min_snr_gamma,
        )
        prediction = denoiser_output(self.net, example.x_t, example.timesteps, class_labels=labels)
        loss = weighted_mse(prediction, example.target, example.weight)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)  # the global batch's mean under DDP
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])  # the rate this step's update uses
        return loss

    def configure_model(self) -> None:
        # Lightning calls this once the trainer exists and before the module reaches its device.
        prepare_for_training(self.net, self.compile_net, self.channels_last, self.gradient_checkpointing)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        # The method owns its clipping (model.max_grad_norm): trainer.gradient_clip_val cannot serve GAN methods,
        # which Lightning runs under manual optimisation. The norm is logged before clipping, at its true size.
        norm = clip_and_measure_gradients(self, self.net.parameters(), self.max_grad_norm)
        if norm is not None:
            self.log("train/grad_norm", norm)

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
            fused=self.fused_adamw,
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
        scheduler = make_scheduler(sampler, self.schedule, self.prediction_type, self.objective)
        return generate(self.net, scheduler, steps, generators_for(seeds), class_labels=labels, eta=eta)

    def preview(self, seeds: Sequence[int], sampler: SchedulerFactory, steps: int) -> Preview:
        """Samples for the training-time grid; class-conditional models draw class seed % num_classes."""
        labels = None
        if num_classes(self.net) is not None:
            labels = torch.tensor(list(seeds)) % num_classes(self.net)
        return Preview(images=self.generate(seeds, sampler, steps, labels=labels), labels=labels)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_same_objective(self.objective, checkpoint)
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
            "objective": self.objective.state(),  # absent in older checkpoints: ddpm
            "class_names": self.class_names,
        }


def check_flow_settings(objective: Objective, prediction_type: str, loss_weighting: str) -> None:
    """The DDPM-only keys must keep their defaults under flow matching, whose network always predicts a velocity."""
    if isinstance(objective, FlowMatching) and (prediction_type != "epsilon" or loss_weighting != "none"):
        raise ConfigError(
            f"model.prediction_type={prediction_type!r} / model.loss_weighting={loss_weighting!r} belong to "
            "objective=ddpm; objective=flow_matching regresses the velocity, unweighted"
        )


def check_same_objective(objective: Objective, checkpoint: dict[str, Any]) -> None:
    """Resuming a run trained with another objective would silently re-purpose its weights: refuse it."""
    saved = objective_from_state((checkpoint.get("lightdiff") or {}).get("objective"))
    if type(saved) is not type(objective):
        raise ConfigError(
            f"the checkpoint was trained with objective={saved.state()['name']}, this config says "
            f"objective={objective.state()['name']}: pick another run_name"
        )
