"""Export a trained denoiser (`lightdiff.trained.TrainedDenoiser`) to a diffusers pipeline folder (safetensors).

One writer per network class (`WRITERS`): a new model family adds its writer here, next to its conditioning family
in `lightdiff.nets.conditioning`.

Export layouts, by network and objective (the sampler is the scheduler written to `scheduler/`):
- pixel UNet2DModel: `DDPMPipeline` (a flow-matching one too: DDPMPipeline's loop runs FlowMatchEulerDiscreteScheduler);
- latent UNet2DConditionModel: `StableDiffusionPipeline` (a flow-matching one keeps the layout, but diffusers'
  StableDiffusionPipeline calls `scale_model_input`, which FlowMatchEulerDiscreteScheduler lacks: sample it with
  lightdiff's sample.py); with a guidance-scale input (`model=lcm`), `LatentConsistencyModelPipeline` with
  LCMScheduler, whose `guidance_scale` is the student's input (lightdiff.json keeps the trained default); a
  guidance-distilled UNet (`model=guidance_distill`: the same input, a full-step sampler) `StableDiffusionPipeline`,
  which embeds its `guidance_scale` for a UNet with `time_cond_proj_dim` instead of guiding; an SDXL UNet
  (`addition_embed_type="text_time"`): `StableDiffusionXLPipeline` with both text encoders, zeros as the empty
  negative prompt (`force_zeros_for_empty_prompt`) and no watermarker;
- latent SD3Transformer2DModel (MMDiT): `StableDiffusion3Pipeline` with SD3's encoders; lightdiff's from-scratch
  layout trains one CLIPTextModelWithProjection for both CLIPs, written as `text_encoder` and `text_encoder_2`, with or
  without a T5 `text_encoder_3` (`model.t5`); diffusers reproduces lightdiff's samples with `max_sequence_length` =
  lightdiff.json's (0 without a T5: no zero T5 tokens appended);
- latent FluxTransformer2DModel (FLUX): `FluxPipeline` with its CLIP `text_encoder` and T5 `text_encoder_2`; plain
  diffusers reproduces lightdiff's samples with `max_sequence_length` = lightdiff.json's, and, for a transformer
  without the guidance embedding, lightdiff's `guidance_scale` as `true_cfg_scale` with `negative_prompt=""` (its
  `guidance_scale` is the embedded input of a guidance-distilled transformer, and lightdiff's then too);
- latent CogVideoXTransformer3DModel (video): `CogVideoXPipeline` with its T5 `text_encoder` and the video VAE; plain
  diffusers reproduces lightdiff's clips with `num_frames`, `height` / `width` and `max_sequence_length` =
  lightdiff.json's (`max_sequence_length` is the transformer's text length, so the pipeline's default 226 fits a
  CogVideoX model trained at its own length only); a flow-matching one keeps the layout, but CogVideoXPipeline
  calls `scale_model_input`, which FlowMatchEulerDiscreteScheduler lacks: sample it with lightdiff's sample.py;
- latent UNetSpatioTemporalConditionModel (image-to-video): `StableVideoDiffusionPipeline` with its CLIP
  `image_encoder`, a `feature_extractor` holding the family's normalisation, the VAE (SVD's
  AutoencoderKLTemporalDecoder, or a frame-wise AutoencoderKL, which the pipeline decodes frame by frame) and an Euler
  scheduler on continuous timesteps; lightdiff.json records `fps`, `motion_bucket_id`, `noise_aug_strength` and
  `min_guidance_scale`, the pipeline arguments that reproduce it;
- pixel DiTTransformer2DModel: diffusers' DiTPipeline needs a VAE, so the documented equivalent is `transformer/` +
  `scheduler/` + `lightdiff.json` without `model_index.json`; lightdiff's sample.py reads it like any export;
- latent PixArtTransformer2DModel: diffusers' PixArtAlphaPipeline expects a T5 encoder and masked T5 states, lightdiff
  trains a CLIPTextModel, so the documented equivalent is `transformer/` + `scheduler/` + `vae/` + `text_encoder/`
  (CLIPTextModel) + `tokenizer/` (CLIPTokenizer) + `lightdiff.json`, without `model_index.json`: each part is a
  diffusers / transformers folder (`from_pretrained`), and sample.py reads it back like any export.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

from diffusers import (
    AutoencoderKL,
    CogVideoXPipeline,
    DDPMPipeline,
    FluxPipeline,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    SchedulerMixin,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    StableVideoDiffusionPipeline,
)

from lightdiff.nets.conditioning import is_sdxl
from lightdiff.nets.lora import has_adapters, without_adapters, write_lora_file
from lightdiff.nets.vae import latent_shift
from lightdiff.trained import METADATA_FILE, TrainedDenoiser


def _write_ddpm(denoiser: TrainedDenoiser, scheduler: SchedulerMixin, folder: Path) -> None:
    DDPMPipeline(unet=denoiser.net, scheduler=scheduler).save_pretrained(folder, safe_serialization=True)


def _write_stable_diffusion(denoiser: TrainedDenoiser, scheduler: SchedulerMixin, folder: Path) -> None:
    shift = latent_shift(denoiser.vae)
    if shift:  # checked before anything is written
        raise ValueError(
            f"the VAE's shift_factor={shift}: StableDiffusionPipeline and StableDiffusionXLPipeline decode latents / "
            "scaling_factor without a shift, so an export would not reproduce this model; sample it with sample.py"
        )
    if is_sdxl(denoiser.net):
        _write_sdxl(denoiser, scheduler, folder)
        return
    text = denoiser.conditioning
    # A latent consistency model (guidance-scale input, LCMScheduler) is diffusers' LatentConsistencyModelPipeline; a
    # guidance-distilled UNet (the same input, a full-step sampler) StableDiffusionPipeline, which feeds that input too.
    consistency = isinstance(scheduler, LCMScheduler)
    pipeline_class = LatentConsistencyModelPipeline if consistency else StableDiffusionPipeline
    pipeline = pipeline_class(
        vae=denoiser.vae,
        text_encoder=text.text_encoder,
        tokenizer=text.tokenizer,
        unet=denoiser.net,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder, safe_serialization=True)


def _write_sdxl(denoiser: TrainedDenoiser, scheduler: SchedulerMixin, folder: Path) -> None:
    # A latent consistency student's family wraps the text family (GuidanceEmbedded): StableDiffusionXLPipeline embeds
    # the guidance scale itself for a UNet with time_cond_proj_dim (LCM-SDXL), from the same encoders.
    text = getattr(denoiser.conditioning, "text", denoiser.conditioning)
    pipeline = StableDiffusionXLPipeline(
        vae=denoiser.vae,
        text_encoder=text.text_encoder,
        text_encoder_2=text.text_encoder_2,
        tokenizer=text.tokenizer,
        tokenizer_2=text.tokenizer_2,
        unet=denoiser.net,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=text.force_zeros_for_empty_prompt,  # the unconditional input (SDXLText)
        add_watermarker=False,  # the watermark changes pixels: parity with sample.py, and an optional package
    )
    pipeline.save_pretrained(folder, safe_serialization=True)


def _with_shift_key(vae: AutoencoderKL) -> AutoencoderKL:
    """`vae` with a `shift_factor` in its config (None becomes 0): StableDiffusion3Pipeline and FluxPipeline decode
    latents / scaling_factor + shift_factor and need the key."""
    if vae.config.shift_factor is None:
        vae.register_to_config(shift_factor=0.0)
    return vae


def _write_sd3(denoiser: TrainedDenoiser, scheduler: SchedulerMixin, folder: Path) -> None:
    vae, text = _with_shift_key(denoiser.vae), denoiser.conditioning
    # SD3Text's encoders as they are; lightdiff's one CLIP (SD3CLIPText, or SD3Text without text_encoder_2) stands in
    # for both of SD3's CLIPs, so it is written as both
    second = getattr(text, "text_encoder_2", None)
    pipeline = StableDiffusion3Pipeline(
        transformer=denoiser.net,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text.text_encoder,
        tokenizer=text.tokenizer,
        text_encoder_2=second if second is not None else text.text_encoder,
        tokenizer_2=text.tokenizer_2 if second is not None else text.tokenizer,
        text_encoder_3=getattr(text, "text_encoder_3", None),
        tokenizer_3=getattr(text, "tokenizer_3", None),
    )
    pipeline.save_pretrained(folder, safe_serialization=True)


def _write_flux(denoiser: TrainedDenoiser, scheduler: SchedulerMixin, folder: Path) -> None:
    vae, text = _with_shift_key(denoiser.vae), denoiser.conditioning
    pipeline = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text.text_encoder,
        tokenizer=text.tokenizer,
        text_encoder_2=text.text_encoder_2,
        tokenizer_2=text.tokenizer_2,
        transformer=denoiser.net,
    )
    pipeline.save_pretrained(folder, safe_serialization=True)


def _write_cogvideox(denoiser: TrainedDenoiser, scheduler: SchedulerMixin, folder: Path) -> None:
    text = denoiser.conditioning
    pipeline = CogVideoXPipeline(
        tokenizer=text.tokenizer,
        text_encoder=text.text_encoder,
        vae=denoiser.vae,
        transformer=denoiser.net,
        scheduler=scheduler,
    )
    pipeline.save_pretrained(folder, safe_serialization=True)


def _write_stable_video_diffusion(denoiser: TrainedDenoiser, scheduler: SchedulerMixin, folder: Path) -> None:
    from transformers import CLIPImageProcessor

    family = denoiser.conditioning
    size = family.image_encoder.config.image_size
    processor = CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=family.image_mean,
        image_std=family.image_std,
    )
    pipeline = StableVideoDiffusionPipeline(
        vae=denoiser.vae,
        image_encoder=family.image_encoder,
        unet=denoiser.net,
        scheduler=scheduler,
        feature_extractor=processor,
    )
    pipeline.save_pretrained(folder, safe_serialization=True)


def _write_parts(denoiser: TrainedDenoiser, scheduler: SchedulerMixin, folder: Path) -> None:
    """No diffusers pipeline fits: each part as a diffusers / transformers folder (see the module docstring)."""
    denoiser.net.save_pretrained(folder / "transformer", safe_serialization=True)
    scheduler.save_pretrained(folder / "scheduler")
    if denoiser.vae is not None:
        denoiser.vae.save_pretrained(folder / "vae", safe_serialization=True)
    text_encoder = getattr(denoiser.conditioning, "text_encoder", None)
    if text_encoder is not None:
        text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
        denoiser.conditioning.tokenizer.save_pretrained(folder / "tokenizer")


Writer = Callable[[TrainedDenoiser, SchedulerMixin, Path], None]
WRITERS: dict[str, Writer] = {
    "UNet2DModel": _write_ddpm,
    "UNet2DConditionModel": _write_stable_diffusion,
    "SD3Transformer2DModel": _write_sd3,
    "FluxTransformer2DModel": _write_flux,
    "CogVideoXTransformer3DModel": _write_cogvideox,
    "UNetSpatioTemporalConditionModel": _write_stable_video_diffusion,
    "DiTTransformer2DModel": _write_parts,
    "PixArtTransformer2DModel": _write_parts,
}


def export_pipeline(
    denoiser: TrainedDenoiser,
    scheduler: SchedulerMixin,
    folder: str | Path,
    fuse_lora: bool = False,  # a network with LoRA adapters: merge them into the weights instead of a LoRA file
) -> Path:
    """Write a diffusers pipeline folder with `scheduler` as its sampler, in the layout of the network's class (the
    layouts are described at the top of this module), plus lightdiff.json (class names, EMA, objective).

    A network with LoRA adapters is written as its base plus `pytorch_lora_weights.safetensors` in diffusers' LoRA
    format (`pipe.load_lora_weights(DIR)` for the Stable Diffusion and SD3 pipelines), or with `fuse_lora` as one
    network with the adapters merged in at their current scale."""
    folder = Path(folder).expanduser()
    writer = WRITERS.get(type(denoiser.net).__name__)
    if writer is None:
        raise ValueError(f"no export layout for {type(denoiser.net).__name__} (known: {sorted(WRITERS)})")
    adapted = denoiser.net if has_adapters(denoiser.net) else None
    if fuse_lora and adapted is None:
        raise ValueError("fuse_lora: the network has no LoRA adapters to fuse")
    encoder = getattr(denoiser.conditioning, "text_encoder", None)
    adapted_encoder = encoder if encoder is not None and has_adapters(encoder) else None
    if adapted is not None:
        denoiser = dataclasses.replace(denoiser, net=without_adapters(adapted, fused=fuse_lora))
    if adapted_encoder is not None:  # the pipeline's text encoder: its base (or fused) weights, the family a copy
        conditioning = copy.deepcopy(denoiser.conditioning)
        conditioning.text_encoder = without_adapters(adapted_encoder, fused=fuse_lora)
        denoiser = dataclasses.replace(denoiser, conditioning=conditioning)
    writer(denoiser, scheduler, folder)
    if adapted is not None and not fuse_lora:
        write_lora_file(adapted, folder, adapted_encoder)
    first_frame = getattr(denoiser.conditioning, "settings", None)  # FirstFrameSettings; None for other families
    metadata = {
        "class_names": denoiser.class_names,
        "uses_ema": denoiser.uses_ema,
        "source": denoiser.source,
        "objective": denoiser.objective.state(),
        # a consistency model's guidance-scale input at sampling (GuidanceEmbedded); None for other families
        "guidance_scale": getattr(denoiser.conditioning, "guidance_scale", None),
        # the LoRA adapters: in LORA_WEIGHTS_FILE beside the base ("file"), merged into the weights, or none
        "lora": None if adapted is None else ("fused" if fuse_lora else "file"),
        "image_size": list(denoiser.image_size) if denoiser.image_size else None,  # the size it trained at
        # T5 tokens per prompt (FLUX, CogVideoX): the pipeline's `max_sequence_length` to reproduce it with
        "max_sequence_length": getattr(denoiser.conditioning, "max_sequence_length", None),
        "num_frames": denoiser.num_frames,  # frames per clip a video model trained on
        # an image-to-video model's micro-conditioning: StableVideoDiffusionPipeline's arguments to reproduce it
        "first_frame": None if first_frame is None else dataclasses.asdict(first_frame),
    }
    (folder / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    return folder
