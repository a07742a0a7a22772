"""The autoencoder stage of latent diffusion (Rombach et al. 2022, Section 3 and Appendix G): a KL-regularised
`AutoencoderKL` trained with a pixel reconstruction loss, a small KL weight, and a PatchGAN hinge loss that is
switched on after `disc_start` steps and balanced against the reconstruction by the adaptive weight of VQGAN.

On a video data set (`data=moving_shapes`) it trains `video_vae` instead, CogVideoX's `AutoencoderKLCogVideoX` or
Wan's `AutoencoderKLWan` (causal 3-D convolutions, 4x in time; `conf/video_vae/`): the same losses, each clip's frames
judged by the PatchGAN as images.

Two optimisers under manual optimisation. Lightning counts each optimiser step in `global_step`, so once the
discriminator is on, one batch advances `trainer.max_steps` by two; `disc_start` counts autoencoder updates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from diffusers import AutoencoderKL, AutoencoderKLCogVideoX, AutoencoderKLWan

from lightdiff.checkpointing import check_checkpoint_fits, plain_config
from lightdiff.config import ConfigError, NonNegativeFloat, PositiveFloat
from lightdiff.contract import Preview
from lightdiff.data import ImageDataModule
from lightdiff.diffusion import SchedulerFactory
from lightdiff.diffusion.adversarial import adaptive_weight, hinge_discriminator_loss, hinge_generator_loss, psnr
from lightdiff.methods.optimization import OptimizerFactory, clip_and_measure_gradients
from lightdiff.nets.discriminator import PatchDiscriminator
from lightdiff.nets.vae import (
    Autoencoder,
    decode,
    decode_for_training,
    frame_count_problem,
    posterior,
    vae_scale_factor,
    vae_spec,
)

CHECKPOINT_FORMAT = 1


class AutoencoderTraining(pl.LightningModule):
    """Trains `vae` to reconstruct images through a KL-regularised latent, with a PatchGAN critic."""

    distance_prefix = "r"  # its previews are reconstructions: metrics=fid logs rFID / rKID (val/rfid, val/rkid)
    metric_steps = None
    net = None  # no denoiser: EMA has nothing to average

    def __init__(
        self,
        data: ImageDataModule,  # given by train.py: the resolution is checked against the VAE
        vae: AutoencoderKL,  # the autoencoder being trained on images (diffusers)
        discriminator: PatchDiscriminator,  # the PatchGAN critic (of a clip's frames, on video)
        reconstruction_loss: Literal["l1", "l2"] = "l1",  # pixel loss: l1 (latent-diffusion's choice) or l2
        kl_weight: NonNegativeFloat = 1e-6,  # weight of KL(q(z|x) || N(0, I)), summed over latent elements
        disc_weight: NonNegativeFloat = 0.5,  # scale of the adaptive adversarial weight
        disc_start: int = 1000,  # autoencoder updates before the adversarial loss switches on
        optimizer: OptimizerFactory = torch.optim.Adam,  # (parameters, lr) -> optimiser, for both networks
        lr: PositiveFloat = 4.5e-6,  # autoencoder learning rate
        disc_lr: PositiveFloat = 4.5e-6,  # discriminator learning rate
        scaling_batches: int = 8,  # batches encoded at the end to set the latent scaling factor
        shift_latents: bool = False,  # also set the VAE's shift_factor to the latents' mean (SD3's and FLUX's VAEs)
        max_grad_norm: float | None = 1.0,  # clip the autoencoder's gradient norm (None: no clipping)
        perceptual_loss: torch.nn.Module | None = None,  # (reconstructions, images) in [-1, 1] -> distance, e.g. LPIPS
        perceptual_weight: NonNegativeFloat = 1.0,  # perceptual distance's weight, added to each pixel's loss (LDM)
        # the autoencoder trained on a video data set instead of `vae`
        video_vae: AutoencoderKLCogVideoX | AutoencoderKLWan | None = None,
    ) -> None:
        super().__init__()
        if reconstruction_loss not in ("l1", "l2"):
            raise ConfigError(f"model.reconstruction_loss={reconstruction_loss!r} is not one of ('l1', 'l2')")
        if disc_start < 0:
            raise ConfigError(f"model.disc_start={disc_start} must be >= 0")
        self.automatic_optimization = False
        self.shift_latents = shift_latents
        if data.num_frames is not None:
            if video_vae is None:
                raise ConfigError("model.video_vae: the data set serves clips (data.num_frames); give a video VAE")
            problem = frame_count_problem(video_vae, data.num_frames)
            if problem is not None:
                raise ConfigError(f"data.num_frames={data.num_frames}: {problem}")
            vae = video_vae
        self.vae: Autoencoder = vae
        self.discriminator = discriminator
        self.reconstruction_loss = reconstruction_loss
        self.kl_weight = kl_weight
        self.disc_weight = disc_weight
        self.disc_start = disc_start
        self.optimizer_factory, self.lr, self.disc_lr = optimizer, lr, disc_lr
        self.scaling_batches = scaling_batches
        self.max_grad_norm = max_grad_norm
        self.perceptual_loss = perceptual_loss.requires_grad_(False) if perceptual_loss is not None else None  # frozen
        self.perceptual_weight = perceptual_weight
        if vae.config.in_channels != 3 or vae.config.out_channels != 3:
            raise ConfigError("model.vae must map RGB images to RGB images (in_channels = out_channels = 3)")
        factor = vae_scale_factor(vae)
        if data.resolution % factor:
            raise ConfigError(f"data.resolution={data.resolution} is not divisible by the VAE's down-sampling {factor}")
        if data.cache_latents:
            raise ConfigError("data.cache_latents=true is for model=latent; the autoencoder trains on pixels")
        self.class_names = data.class_names

    def autoencoder_updates(self) -> int:
        """How many times the autoencoder's optimiser has stepped (restored with the optimiser state on resume)."""
        optimizer = self.optimizers()[0].optimizer
        state = optimizer.state.get(optimizer.param_groups[0]["params"][0], {})
        return int(state.get("step", 0))

    def _pixel_loss(self, images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
        difference = images - reconstructions
        per_pixel = difference.abs() if self.reconstruction_loss == "l1" else difference.pow(2)
        if self.perceptual_loss is not None:  # added to each pixel's loss, as LDM's LPIPSWithDiscriminator does
            distance = self.perceptual_loss.eval()(_frames(reconstructions), _frames(images))
            per_pixel = per_pixel + self.perceptual_weight * distance.reshape(*per_pixel.shape[:-3], 1, 1, 1)
        return per_pixel.flatten(1).sum(dim=1).mean()  # summed per image (clip), as latent-diffusion's nll_loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        optimizer_vae, optimizer_disc = self.optimizers()
        images = batch["pixel_values"]
        adversarial = self.autoencoder_updates() >= self.disc_start

        # Autoencoder update: reconstruction + KL (+ adaptive-weighted generator loss once the critic is on).
        latents = posterior(self.vae, images)
        reconstructions = decode_for_training(self.vae, latents.sample())  # unclamped: Wan's decode clamps
        rec_loss = self._pixel_loss(images, reconstructions)
        kl_loss = latents.kl().mean()
        loss = rec_loss + self.kl_weight * kl_loss
        if adversarial:
            self.discriminator.requires_grad_(False)  # the generator's loss must not train the critic
            gen_loss = hinge_generator_loss(self.discriminator(_frames(reconstructions)))
            weight = self.disc_weight * adaptive_weight(rec_loss, gen_loss, self._last_decoder_weight())
            loss = loss + weight * gen_loss
            self.discriminator.requires_grad_(True)
            self.log_dict({"train/g_loss": gen_loss, "train/d_weight": weight})
        optimizer_vae.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        clip_and_measure_gradients(self, self.vae.parameters(), self.max_grad_norm)
        optimizer_vae.step()

        # Critic update on real images and detached reconstructions.
        if adversarial:
            logits_real = self.discriminator(_frames(images))
            logits_fake = self.discriminator(_frames(reconstructions.detach()))
            disc_loss = hinge_discriminator_loss(logits_real, logits_fake)
            optimizer_disc.zero_grad(set_to_none=True)
            self.manual_backward(disc_loss)
            optimizer_disc.step()
            accuracy = 0.5 * ((logits_real > 0).float().mean() + (logits_fake < 0).float().mean())
            self.log_dict(
                {
                    "train/d_loss": disc_loss,
                    "train/d_accuracy": accuracy,
                    "train/logits_real": logits_real.mean(),
                    "train/logits_fake": logits_fake.mean(),
                }
            )
        self.log_dict(
            {
                "train/loss": loss,
                "train/rec_loss": rec_loss,
                "train/kl": kl_loss,
                "train/psnr": psnr(reconstructions.detach(), images).mean(),
                "train/lr": optimizer_vae.param_groups[0]["lr"],
            },
            prog_bar=False,
        )

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [
            self.optimizer_factory(self.vae.parameters(), lr=self.lr),
            self.optimizer_factory(self.discriminator.parameters(), lr=self.disc_lr),
        ]

    def _last_decoder_weight(self) -> torch.Tensor:
        """The decoder's output convolution: VQGAN's adaptive weight balances the gradients there."""
        conv_out = self.vae.decoder.conv_out
        return getattr(conv_out, "conv", conv_out).weight  # CogVideoX's is a causal wrapper around the convolution

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstruction through the posterior mean."""
        return decode(self.vae, posterior(self.vae, images).mode())

    @torch.no_grad()
    def preview(
        self, seeds: Sequence[int], sampler: SchedulerFactory, steps: int, prompts: Sequence[str] | None = None
    ) -> Preview:
        """Reconstructions of data set images seed % len(data): the grid pairs each input with its output (an
        autoencoder reads no prompts: callbacks.samples.prompts is refused for it at the start)."""
        dataset = self.trainer.datamodule.source_dataset
        items = [dataset[int(seed) % len(dataset)] for seed in seeds]
        images = torch.stack([item["pixel_values"] for item in items]).to(self.device)
        reconstructions = self.reconstruct(images).clamp(-1, 1)
        labels = torch.tensor([int(item["label"]) for item in items])
        pairs = torch.stack([images, reconstructions], dim=1).flatten(0, 1)  # input, output, input, output, ...
        metrics = {"psnr": psnr(reconstructions, images).mean().item()}
        if images.ndim == 5:  # clips: the grid shows each clip's frames in a row, input above reconstruction
            return Preview(
                images=_frames(reconstructions).float() / 2 + 0.5,
                grid_images=pairs.float() / 2 + 0.5,
                metrics=metrics,
                videos=reconstructions.float() / 2 + 0.5,
                prompts=[str(item["text"]) for item in items],
            )
        return Preview(
            images=reconstructions.float() / 2 + 0.5,
            labels=labels if bool((labels >= 0).all()) else None,
            grid_images=pairs.float() / 2 + 0.5,
            metrics=metrics,
        )

    @torch.no_grad()
    def finish_training(self) -> None:
        """Set the latent scaling factor to 1 / std(z) on training data (Rombach et al. 2022, Section 4.3.2), and with
        `shift_latents` the shift factor to mean(z) first, so (z - shift) * scale has zero mean and unit variance, as
        SD3's and FLUX's VAEs are configured; a VAE normalised per channel (Wan's) gets each channel's mean and std
        (`latents_mean` / `latents_std`) instead. Called by callbacks.FinalCheckpoint right before the final checkpoint
        is written (contract.FinishesTraining)."""
        loader = self.trainer.datamodule.train_dataloader()
        latents = []
        cuda_devices = [self.device] if self.device.type == "cuda" else []
        # In a forked random stream: a run continued later with a larger max_steps stays identical to one never stopped.
        with torch.random.fork_rng(devices=cuda_devices):
            for index, batch in enumerate(loader):
                if index >= self.scaling_batches:
                    break
                latents.append(posterior(self.vae, batch["pixel_values"].to(self.device)).sample().float())
        latents = torch.cat(latents)  # channels at dim 1 in both layouts: (N, C, h, w), a 3-D VAE's (N, C, F, h, w)
        if vae_spec(self.vae).per_channel_statistics:
            channels = latents.transpose(0, 1).flatten(1)
            self.vae.register_to_config(latents_mean=channels.mean(1).tolist(), latents_std=channels.std(1).tolist())
            return
        shift = latents.mean().item() if self.shift_latents else None
        factor = 1.0 / (latents - (shift or 0.0)).std().item()
        self.vae.register_to_config(scaling_factor=factor, shift_factor=shift)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_checkpoint_fits(self, checkpoint)  # a checkpoint of another net config: name the keys, not a torch error

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["lightdiff"] = {
            "format": CHECKPOINT_FORMAT,
            "method": "autoencoder",
            "vae_class": type(self.vae).__name__,
            "vae_config": plain_config(self.vae.config),
        }


def _frames(pixels: torch.Tensor) -> torch.Tensor:
    """Images as they are; clips (B, F, 3, H, W) as their frames (B * F, 3, H, W), for image critics and LPIPS."""
    return pixels.flatten(0, 1) if pixels.ndim == 5 else pixels
