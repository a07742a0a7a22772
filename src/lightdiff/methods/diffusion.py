"""Diffusion training (`model=pixel`, `model=latent`): a denoiser learns the `objective` (DDPM with eps / v / x0
prediction, Ho et al. 2020; or rectified flow, Esser et al. 2024) on pixels, or on the latents of a frozen
`AutoencoderKL` (latent diffusion, Rombach et al. 2022), conditioned by the family its network takes
(`lightdiff.nets.families`): nothing, class labels, or CLIP text with classifier-free guidance (Ho & Salimans
2022: conditions are dropped with probability `cond_drop_prob` while training).

The config presets differ only in their defaults: `model=pixel` has no VAE and a UNet2DModel / DiT,
`model=latent` the shapes VAE and a text-conditioned UNet2DConditionModel / MMDiT / PixArt, `model=video` the
moving-shapes video VAE, a CogVideoX transformer and T5 text on clips (B, F, 3, H, W): the same training step, the
clip layout handled by `lightdiff.nets.vae` and the network call.

Text side, two ways: `pretrained=ID_OR_DIR` loads the tokenizer and text encoder of a diffusers pipeline (frozen
unless `train_text_encoder`); without it, a tokenizer is built from the data set's captions and a small
`CLIPTextModel` is trained from scratch with the denoiser.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from diffusers import SchedulerMixin

from lightdiff.checkpointing import adapter_weights, check_adapter_checkpoint, check_checkpoint_fits, denoiser_metadata
from lightdiff.config import ConfigError, PositiveFloat
from lightdiff.contract import Preview
from lightdiff.data import ImageDataModule
from lightdiff.diffusion import Objective, SchedulerFactory, offset_noise, timesteps_within, weighted_mse
from lightdiff.methods.optimization import (
    OptimisesItsNetwork,
    OptimizerFactory,
    check_lr_schedule,
)
from lightdiff.nets.denoiser import network_output
from lightdiff.nets.families import (
    Conditioning,
    ConditioningSettings,
    Denoiser,
    FirstFrameSettings,
    drop_conditions,
    family_of,
    load_denoiser,
)
from lightdiff.nets.families.base import (
    CacheableText,
    CachesFirstFrames,
    EncodesWithVae,
    FirstFrameEncoding,
    TextEncoders,
)
from lightdiff.nets.families.wan import Expert, one_expert
from lightdiff.nets.lora import LoraSettings, adapt
from lightdiff.nets.low_precision import BaseQuantization, BaseStorage, check_base_precision, store_frozen_base
from lightdiff.nets.pretrained import as_pipeline_folder, load_vae, pipeline_parts
from lightdiff.nets.vae import (
    Autoencoder,
    encode_latents,
    frame_count_problem,
    frozen_vae_dtype,
    is_video_vae,
    latent_channels,
    vae_scale_factor,
)
from lightdiff.sampling import for_latents, generate, preview_inputs

VALIDATION_LEVELS = 8  # fixed noise levels of val/loss
VALIDATION_SEED = 20_240_601  # seeds val/loss's noise (plus the batch index), apart from the run's seed


def conditioning_for(
    net: Denoiser, settings: ConditioningSettings, data: ImageDataModule, pretrained: str | None
) -> Conditioning:
    """The conditioning `net`'s family takes: its encoders read from the pipeline `pretrained`, or built for the data
    (a tokenizer from its captions, encoders that train with the denoiser)."""
    family = family_of(net)
    family.check_settings(net, settings)
    if pretrained is None:
        return family.new_conditioning(net, settings, data)
    if settings.t5:
        raise ConfigError("model.t5=true builds a T5 from the captions; model.pretrained brings its own encoders")
    return family.pretrained_conditioning(pretrained, net, settings, "model.pretrained")


class DiffusionTraining(OptimisesItsNetwork, pl.LightningModule):
    """Learns to denoise (or to follow the flow of) data or VAE latents with a diffusers denoiser."""

    metric_steps = None  # FID at the metrics callback's step counts
    distance_prefix = ""

    def __init__(
        self,
        data: ImageDataModule,  # given by train.py: the networks are sized, checked and (text) built for it
        net: Denoiser,  # the denoiser (the `net` group); its class decides the conditioning family
        objective: Objective,  # ddpm | flow_matching (the `objective` group)
        conditioning: Conditioning | None = None,  # a conditioning family (a plug-in); None: the one `net` takes
        vae: str | None = None,  # frozen VAE folder or hub id (AutoencoderKL, a video VAE); None: pixel space
        pretrained: str | None = None,  # pipeline folder or hub id: its tokenizer and text encoder (and VAE) are used
        pretrained_config: str | None = None,  # `pretrained` a single .safetensors / .ckpt file: its pipeline's configs
        load_pretrained_unet: bool = False,  # with `pretrained`: start from its UNet instead of `net`
        # with a pretrained UNet: widen its input to this many channels, the added ones zero (a Wan image-to-video
        # transformer from a text-to-video one: its first frame's mask and latents); None: as the pipeline has it
        input_channels: int | None = None,
        allow_other_vae: bool = False,  # with a pretrained UNet: accept `vae` though the UNet learnt the pipeline's
        train_text_encoder: bool = False,  # unfreeze a pretrained text encoder (one from scratch always trains)
        text_hidden_size: int | None = None,  # width of a from-scratch text encoder; None: the width the net takes
        text_layers: int = 2,  # layers of a from-scratch text encoder
        text_heads: int = 4,  # attention heads of a from-scratch text encoder
        max_prompt_tokens: int = 16,  # a from-scratch tokenizer's length limit (start and end tokens included)
        max_sequence_length: int | None = None,  # T5 tokens per prompt; None: the pipeline's (FLUX 512, SD3 256), 16
        t5: bool = False,  # add a T5 encoder built from the captions to an SD3 transformer's CLIP (SD3's third)
        embedded_guidance_scale: float = 3.5,  # a guidance-embedding FLUX transformer's `guidance` input in training
        cond_drop_prob: float = 0.0,  # probability of training a sample unconditionally (classifier-free guidance)
        guidance_scale: float = 1.0,  # guidance of the training-time previews (1: none)
        offset_noise: float = 0.0,  # strength of per-channel offset noise (0 disables)
        optimizer: OptimizerFactory = torch.optim.AdamW,  # (parameters, lr) -> optimiser (the `optimizer` group)
        lr: PositiveFloat = 1e-4,  # peak learning rate
        lr_schedule: Literal["constant", "cosine"] = "constant",  # after warm-up: constant, or cosine to 0 at max_steps
        warmup_steps: int = 0,  # linear learning-rate warm-up from 0
        max_grad_norm: float | None = 1.0,  # clip the gradients' global L2 norm to this (None: no clipping)
        compile: bool = False,  # torch.compile the denoiser (regional where diffusers defines repeated blocks)
        channels_last: bool = False,  # NHWC weights: faster convolutions on GPU (the yaml turns it on with CUDA)
        gradient_checkpointing: bool = False,  # recompute activations in backward: less memory, more time
        lora: LoraSettings | None = None,  # adapters on the net (`model.lora.rank`); only they train (nets/lora.py)
        base_quantization: BaseQuantization = "none",  # int8 | fp8 | nf4: the frozen base under LoRA quantised
        base_storage: BaseStorage = "none",  # fp8: the frozen base under LoRA stored in fp8, computed in its dtype
        frozen_dtype: Literal["float32", "bfloat16", "float16"] = "float32",  # the frozen VAE and text encoders' dtype
        first_frame: FirstFrameSettings | None = None,  # an SVD UNet's conditioning (model=video_i2v); None: defaults
        # train on network timesteps in [low, high] only, drawn from the objective's own density restricted there
        # (one Wan 2.2 expert's side of the boundary); None: the whole range (a Wan expert: its side)
        timestep_range: tuple[float, float] | None = None,
        # a Wan 2.2 A14B pair (model.pretrained with transformer_2): train both, or one with the other frozen
        train_expert: Expert = "both",
        edit: bool = False,  # an editing model: the net's family's editing conditioning (FLUX.1 Kontext), on pairs
    ) -> None:
        super().__init__()
        if not 0 <= cond_drop_prob < 1:
            raise ConfigError(f"model.cond_drop_prob={cond_drop_prob} must lie in [0, 1)")
        check_lr_schedule(lr_schedule, warmup_steps)
        if pretrained is not None:  # a single-file checkpoint becomes a diffusers folder here (nets/pretrained.py)
            pretrained = as_pipeline_folder(pretrained, pretrained_config)
        elif pretrained_config is not None:
            raise ConfigError(f"model.pretrained_config={pretrained_config!r} without model.pretrained (a single file)")
        if input_channels is not None and (pretrained is None or not load_pretrained_unet):
            raise ConfigError(
                f"model.input_channels={input_channels} widens a pretrained network's input: set model.pretrained="
                "PIPELINE_DIR_OR_HUB_ID and model.load_pretrained_unet=true (a new net: set net.in_channels instead)"
            )
        if pretrained is not None and load_pretrained_unet:
            net = load_denoiser(pretrained)
            if input_channels is not None:
                net = family_of(net).widened_input(net, input_channels)
        else:
            net = family_of(net).initialise(net)  # a transformer's blocks start as the identity (DiT's adaLN-Zero)
        accepted = family_of(net).objectives
        if accepted is not None and objective.name not in accepted:  # its export could not sample what it learnt
            raise ConfigError(
                f"objective={objective.name}: a {type(net).__name__} ({family_of(net).name}) is trained with "
                f"objective={' or '.join(accepted)}, which its pipeline samples (set objective={accepted[0]})"
            )
        if train_expert != "both":  # the other expert frozen; its timesteps (the default range) its own side
            net, timestep_range = one_expert(net, train_expert, timestep_range)
        self.timestep_range = check_timestep_range(timestep_range, objective)
        self.lora_base: dict[str, Any] | None = None  # what the adapters belong to, recorded in every checkpoint
        check_base_precision(base_quantization, base_storage, base_trains=lora is None or not lora.enabled)
        if lora is not None and lora.enabled:
            if pretrained is None or not load_pretrained_unet:
                raise ConfigError(
                    f"model.lora.rank={lora.rank}: LoRA adapts a trained network; set model.pretrained=PIPELINE_DIR"
                    "_OR_HUB_ID and model.load_pretrained_unet=true (a lightdiff checkpoint: export it first)"
                )
            if train_text_encoder:
                raise ConfigError("model.lora trains adapters on the denoiser only: set model.train_text_encoder=false")
            if vae is not None:  # its checkpoints hold the adapters alone: every other part must come from the base
                raise ConfigError(f"model.lora uses model.pretrained's VAE: set model.vae=null (it is {vae!r})")
        self.net = net
        self.objective = objective
        pipeline_vae = pretrained is not None and "vae" in pipeline_parts(pretrained)  # a DDPM pipeline has none
        if vae and pipeline_vae and load_pretrained_unet and not allow_other_vae:
            # The UNet learnt the latents of the pipeline's VAE; another VAE's latents ruin the run without an error.
            raise ConfigError(
                f"model.vae={vae!r} under model.pretrained={pretrained!r}'s own UNet, which was trained on that "
                "pipeline's VAE: drop model.vae (the pipeline's VAE is the default with model.pretrained), or set "
                "model.allow_other_vae=true if another VAE is what you mean"
            )
        self.vae = load_vae(pretrained, vae).requires_grad_(False).eval() if (vae or pipeline_vae) else None
        # Where each network came from: train.log's networks table (contract.NamesPartSources).
        pipeline = f"model.pretrained={pretrained}"
        self.part_sources = {
            "net": (pipeline if pretrained is not None and load_pretrained_unet else "model.net, new weights")
            + (f", input widened to {input_channels} channels (the new ones zero)" if input_channels else ""),
            "vae": f"model.vae={vae}" if vae else pipeline,
            "conditioning": pipeline if pretrained is not None else "new, for the data",
        }
        settings = ConditioningSettings(
            train_text_encoder=train_text_encoder,
            text_hidden_size=text_hidden_size,
            text_layers=text_layers,
            text_heads=text_heads,
            max_prompt_tokens=max_prompt_tokens,
            max_sequence_length=max_sequence_length,
            t5=t5,
            embedded_guidance_scale=embedded_guidance_scale,
            first_frame=first_frame or FirstFrameSettings(),
            edit=edit,
        )
        self.conditioning: Conditioning = conditioning or conditioning_for(net, settings, data, pretrained)
        if isinstance(self.conditioning, EncodesWithVae):  # SVD's conditioning frame goes through this VAE
            self.conditioning.attach_vae(self.vae)
        if lora is not None and lora.enabled:
            # The pipeline's text encoder too with lora.text_encoder (the method then trains its adapters alone).
            encoders = self.conditioning.text_encoders() if isinstance(self.conditioning, TextEncoders) else {}
            if lora.text_encoder and not encoders:
                raise ConfigError(f"model.lora.text_encoder=true: {type(net).__name__} takes no text")
            if lora.text_encoder and len(encoders) > 1:
                count = {2: "two", 3: "three"}.get(len(encoders), str(len(encoders)))
                raise ConfigError(
                    f"model.lora.text_encoder=true: this model has {count} text encoders ({', '.join(encoders)}) "
                    "and lightdiff adapts one only; set model.lora.text_encoder=false"
                )
            text_encoder = encoders["text_encoder"] if lora.text_encoder else None
            self.lora_base = adapt(net, lora, base_source=pretrained, text_encoder=text_encoder)
            store_frozen_base(net, base_quantization, base_storage)  # after adapt took the full-precision fingerprint
            if text_encoder is not None:
                self.conditioning.trainable = True  # its adapters train (and its states are never cached)
            self.strict_loading = False  # checkpoints hold the adapters alone
        check_fits(net, self.vae, self.conditioning, data)
        if frozen_dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"model.frozen_dtype={frozen_dtype!r} is not one of float32, bfloat16, float16")
        # Memory for large pipelines (SDXL): the parts that never train, in half precision; the denoiser stays fp32.
        dtype = getattr(torch, frozen_dtype)
        if self.vae is not None and frozen_vae_dtype(self.vae, dtype) != self.vae.dtype:
            self.vae.to(frozen_vae_dtype(self.vae, dtype))
        if not self.conditioning.trainable_parameters():
            self.conditioning.to(dtype)
        if cond_drop_prob > 0 and not self.conditioning.has_unconditional:
            raise ConfigError(f"model.cond_drop_prob={cond_drop_prob}: {type(net).__name__} has no unconditional input")
        self.cond_drop_prob = cond_drop_prob
        self.guidance_scale = guidance_scale
        self.offset_noise = offset_noise
        self.optimizer_factory, self.lr = optimizer, lr
        self.lr_schedule, self.warmup_steps, self.max_grad_norm = lr_schedule, warmup_steps, max_grad_norm
        self.compile_net = compile  # not `self.compile`: that is nn.Module's method
        self.channels_last = channels_last
        self.gradient_checkpointing = gradient_checkpointing
        self.class_names = data.class_names

    def latent_cache_encoders(self) -> tuple[Autoencoder, str | None, Any, FirstFrameEncoding | None]:
        """For `data.cache_latents`: the VAE, a frozen text encoder's fingerprint and prompt encoding, and an
        image-to-video conditioning's first-frame encoding (Wan's, a function of the frame and the VAE alone)."""
        if self.vae is None:
            raise ConfigError("data.cache_latents=true is for model=latent: a pixel model has no VAE (model.vae)")
        first_frames = None
        if "image" in self.conditioning.reads:
            if isinstance(self.conditioning, CachesFirstFrames):
                first_frames = self.conditioning.first_frame_encoding()
            if first_frames is None:
                raise ConfigError(
                    f"data.cache_latents=true: {type(self.conditioning).__name__} reads each clip's first frame in "
                    "pixels (SVD's, Wan 2.1's CLIP image encoder), so this model encodes its clips on the fly: set "
                    "data.cache_latents=false"
                )
        if "source_pixel_values" in self.conditioning.reads and "source_latent_moments" not in self.conditioning.reads:
            raise ConfigError(
                f"data.cache_latents=true stores editing sources at the data's size, and "
                f"{type(self.conditioning).__name__} resizes each source as its pipeline does (Qwen-Image-Edit: to "
                "about 1024 x 1024): set data.cache_latents=false"
            )
        if isinstance(self.conditioning, CacheableText) and self.conditioning.cacheable:
            return self.vae, self.conditioning.cache_fingerprint(), self.conditioning.encode, first_frames
        return self.vae, None, None, first_frames

    # ----- training ---------------------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if self.vae is None:
            x0 = batch["pixel_values"]
        else:  # data.cache_latents: q(z | x) was encoded once; a fresh z is drawn from it either way
            x0 = encode_latents(self.vae, batch.get("pixel_values"), batch.get("latent_moments"))
        inputs, dropped = drop_conditions(self.conditioning, batch, self.cond_drop_prob, len(x0))
        condition = self.conditioning(inputs)
        noise = offset_noise(torch.randn_like(x0), self.offset_noise)
        if self.timestep_range is None:
            example = self.objective.training_example(x0, noise)
        else:
            example = self.objective.example_at(x0, noise, timesteps_within(self.objective, *self.timestep_range, x0))
        prediction = network_output(self.net, example.x_t, example.timesteps, condition)
        loss = weighted_mse(prediction, example.target, example.weight)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)  # the global batch's mean under DDP
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])  # the rate this step's update uses
        if self.cond_drop_prob > 0:
            self.log("train/cond_dropped", dropped.float().mean())
        return loss

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """`val/loss`: the training loss on a held-out batch (data.val_*), averaged over VALIDATION_LEVELS fixed noise
        levels (the quantiles (k + 1/2) / K of training's own noise-level distribution, so levels weigh as in
        training), its noise (and latent draw) seeded by VALIDATION_SEED + the batch index in a forked random state:
        the same numbers for the same weights, so the curve shows the model and not the draw, and the run's own
        random streams are left untouched (training is bit-identical with or without validation)."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(VALIDATION_SEED + batch_idx)
            if self.vae is None:
                x0 = batch["pixel_values"]
            else:
                x0 = encode_latents(self.vae, batch.get("pixel_values"), batch.get("latent_moments"))
            condition = self.conditioning(batch)
            noise = torch.randn_like(x0)
            levels = (torch.arange(VALIDATION_LEVELS, dtype=torch.float64) + 0.5) / VALIDATION_LEVELS
            losses = []
            for timestep in self.objective.quantile_timesteps(levels, x0):
                example = self.objective.example_at(x0, noise, timestep.expand(len(x0)))
                prediction = network_output(self.net, example.x_t, example.timesteps, condition)
                losses.append(weighted_mse(prediction, example.target, example.weight))
        self.log("val/loss", torch.stack(losses).mean(), sync_dist=True, batch_size=len(x0))

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The net's (its adapters alone with LoRA) and a trainable text encoder's."""
        return [p for p in self.net.parameters() if p.requires_grad] + self.conditioning.trainable_parameters()

    # ----- sampling ---------------------------------------------------------------------------------------------

    def scheduler(self, sampler: SchedulerFactory) -> SchedulerMixin:
        """`sampler` configured for the objective, as the exported pipeline runs it."""
        scheduler = self.objective.scheduler(sampler)
        return for_latents(scheduler) if self.vae is not None else scheduler

    @torch.no_grad()
    def preview(
        self, seeds: Sequence[int], sampler: SchedulerFactory, steps: int, prompts: Sequence[str] | None = None
    ) -> Preview:
        """Samples for the grid: the given prompts, or class seed % classes (labels, or their names as prompts), or
        the data's captions."""
        data = self.trainer.datamodule
        inputs, labels = preview_inputs(
            seeds, self.conditioning, self.class_names, data.captions(), prompts, data.num_classes, data.kept_labels
        )
        if "image" in self.conditioning.reads:  # image-to-video: the first frames of the data's clips seed % size
            dataset = self.trainer.datamodule.source_dataset
            clips = [dataset[int(seed) % len(dataset)] for seed in seeds]
            inputs["image"] = torch.stack([clip["pixel_values"][0] for clip in clips]).to(self.device)
            # what the judge holds each clip to: its caption where the model reads it (Wan's image-to-video), else the
            # frame's shape and colour, moving steadily (any way: one frame does not say where to)
            captions = [str(clip["text"]) for clip in clips]
            reads_text = "text" in self.conditioning.reads
            inputs["text"] = captions if reads_text else [caption.split(" moving ")[0] for caption in captions]
        sources = None
        if "source_pixel_values" in self.conditioning.reads:  # an editing model: the data's pairs seed % size
            dataset = self.trainer.datamodule.source_dataset
            pairs = [dataset[int(seed) % len(dataset)] for seed in seeds]
            sources = torch.stack([pair["source_pixel_values"] for pair in pairs]).to(self.device)
            inputs["source_pixel_values"] = sources
            inputs["text"] = [str(pair["text"]) for pair in pairs]  # each source's own instruction
        scheduler = self.scheduler(sampler)
        side = self.trainer.datamodule.resolution  # the net's own size, or a FLUX transformer's (it has none)
        frames = self.trainer.datamodule.num_frames
        images = generate(
            self.net,
            scheduler,
            steps,
            seeds,
            self.conditioning,
            inputs,
            self.guidance_scale,
            vae=self.vae,
            size=(side, side),
            num_frames=frames,
        )
        if sources is not None:  # the grid: each source beside its edit
            shown = (sources.float() / 2 + 0.5).clamp(0, 1)
            grid = torch.stack([shown, images], dim=1).flatten(0, 1)
            return Preview(images=images, grid_images=grid, sources=shown, prompts=inputs["text"])
        if frames is None:
            return Preview(images=images, labels=labels)
        given = (inputs["image"].float() / 2 + 0.5).clamp(0, 1) if "image" in inputs else None
        return Preview(images=images.flatten(0, 1), videos=images, prompts=inputs["text"], first_frames=given)

    # ----- checkpoints ------------------------------------------------------------------------------------------

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = (checkpoint.get("lightdiff") or {}).get("objective") or {"name": "ddpm"}
        if saved["name"] != self.objective.name:  # resuming would silently re-purpose the weights
            raise ConfigError(
                f"the checkpoint was trained with objective={saved['name']}, this config says "
                f"objective={self.objective.name}: pick another run_name"
            )
        # a Wan pair's trained expert: the optimiser's moments belong to it (the other expert has the same shapes)
        saved_expert = ((checkpoint.get("lightdiff") or {}).get("net_config") or {}).get("trains")
        if saved_expert != self.net.config.get("trains"):
            raise ConfigError(
                f"the checkpoint trained model.train_expert={saved_expert}, this config says model.train_expert="
                f"{self.net.config.get('trains')}: resume with the same expert, or pick another run_name"
            )
        if self.lora_base is not None:  # adapters only: they must belong to this base
            check_adapter_checkpoint(self, checkpoint, self.lora_base)
        else:
            # a checkpoint of another net config: name the keys, not a torch error
            check_checkpoint_fits(self, checkpoint)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Plain data only: enough to rebuild the networks and the sampler without this class or its config.
        checkpoint["lightdiff"] = denoiser_metadata(
            "diffusion",
            self.net,
            self.objective,
            self.conditioning,
            self.vae,
            self.class_names,
            self.lora_base,
            self.trainer.datamodule.resolution,
            self.trainer.datamodule.num_frames,
        )
        if self.lora_base is not None:  # the frozen base is reloaded from its source, not saved
            checkpoint["state_dict"] = adapter_weights(checkpoint["state_dict"])


def check_timestep_range(timestep_range: Sequence[float] | None, objective: Objective) -> tuple[float, float] | None:
    """`model.timestep_range` as (low, high) network timesteps within [0, num_train_timesteps]."""
    if timestep_range is None:
        return None
    if len(timestep_range) != 2:
        raise ConfigError(f"model.timestep_range={list(timestep_range)} must be [low, high]")
    low, high = (float(end) for end in timestep_range)
    if not 0 <= low < high <= objective.num_train_timesteps:
        raise ConfigError(
            f"model.timestep_range=[{low:g}, {high:g}] must satisfy 0 <= low < high <= "
            f"{objective.num_train_timesteps} (the objective's network timesteps)"
        )
    return low, high


def check_video_fits(net: Denoiser, vae: Autoencoder | None, data: ImageDataModule) -> None:
    """Clips need a video net behind the VAE its family takes, and a frame count the VAE's time compression
    divides."""
    family, frames = family_of(net), data.num_frames
    if family.video != (frames is not None):
        what = "clips (data.num_frames)" if frames is not None else "images"
        raise ConfigError(f"net: {type(net).__name__} does not denoise {what}; model=video trains on clips")
    if not family.video:
        if vae is not None and is_video_vae(vae):
            raise ConfigError(f"model.vae: {type(vae).__name__} encodes clips; this model trains on images")
        return
    if vae is None:
        raise ConfigError(f"model.vae: a {type(net).__name__} denoises video latents; give a VAE")
    if family.vae_encodes_clips != is_video_vae(vae):
        wanted = (
            "a 3-D VAE that encodes whole clips (AutoencoderKLCogVideoX, AutoencoderKLWan)"
            if family.vae_encodes_clips
            else "a frame-wise VAE (AutoencoderKL, AutoencoderKLTemporalDecoder)"
        )
        raise ConfigError(f"model.vae: a {type(net).__name__} takes {wanted}, not a {type(vae).__name__}")
    problem = frame_count_problem(vae, frames)
    if problem is not None:
        raise ConfigError(f"data.num_frames={frames}: {problem}")


def check_fits(net: Denoiser, vae: Autoencoder | None, conditioning: Conditioning, data: ImageDataModule) -> None:
    """The networks must agree with each other and with the data; say which key does not."""
    check_video_fits(net, vae, data)
    family = family_of(net)
    family.check(net, vae, data.num_frames)
    channels = latent_channels(vae) if vae is not None else 3
    factor = vae_scale_factor(vae) if vae is not None else 1
    what = "the VAE's latent_channels" if vae is not None else "RGB"
    out_channels = net.config.get("out_channels") or net.config.in_channels  # FLUX's None: in_channels
    # FLUX outputs packed tokens (in_channels wide); every other net the latents it denoises (SVD's: half its input)
    if family.latent_channels(net) != channels or out_channels != family.output_channels(net):
        packed = family.latent_channels(net) != net.config.in_channels
        how = f" ({family.name} takes {net.config.in_channels // family.latent_channels(net)} x the latent channels)"
        raise ConfigError(
            f"net.in_channels={net.config.in_channels} / net.out_channels={out_channels} do not match "
            f"{what}={channels}{how if packed else ''}"
        )
    multiple = family.side_multiple(net)
    if data.resolution % (factor * multiple):
        why = f"the VAE down-samples {factor}x and the net" if vae is not None else "the net"
        raise ConfigError(
            f"data.resolution={data.resolution} must be a multiple of {factor * multiple}: {why} "
            f"({type(net).__name__}) needs a side divisible by {multiple}"
        )
    for height, width in data.buckets or []:
        if height % (factor * multiple) or width % (factor * multiple):
            raise ConfigError(
                f"data.buckets: {height}x{width} (height x width) has a side that is not a multiple of "
                f"{factor * multiple} ({type(net).__name__}{' behind the VAE' if vae is not None else ''})"
            )
    # A FLUX transformer has no size of its own: rotary position ids place tokens at any resolution.
    if net.config.get("sample_size") is not None and net.config.sample_size != data.resolution // factor:
        downsampling = f" / the VAE's down-sampling {factor} = {data.resolution / factor:g}" if vae is not None else ""
        raise ConfigError(
            f"net.sample_size={net.config.sample_size} does not match data.resolution={data.resolution}{downsampling}"
        )
    conditioning.check(net, data)
