"""Load a trained denoiser from a Lightning checkpoint or a diffusers pipeline folder; export to diffusers.

Checkpoints are read with `torch.load(weights_only=True)`: tensors and plain data only, so a crafted file cannot
run code, and the network class comes from a fixed allow-list, never from a path stored in the file.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMPipeline,
    SchedulerMixin,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from lightdiff.diffusion import NoiseSchedule
from lightdiff.methods.checkpoint_checks import load_weights

log = logging.getLogger(__name__)

NET_CLASSES: dict[str, type] = {"UNet2DModel": UNet2DModel, "UNet2DConditionModel": UNet2DConditionModel}
METADATA_FILE = "lightdiff.json"  # beside model_index.json: what diffusers' layout has no place for


@dataclass
class TrainedDenoiser:
    net: UNet2DModel | UNet2DConditionModel
    schedule: NoiseSchedule
    prediction_type: str
    class_names: list[str] | None
    source: str  # the checkpoint file or pipeline folder it came from
    uses_ema: bool  # whether `net` holds the EMA weights
    vae: AutoencoderKL | None = None  # latent models only, as are the two below
    tokenizer: CLIPTokenizer | None = None
    text_encoder: CLIPTextModel | None = None
    scheduler_overrides: dict | None = None  # sampler settings the model needs (a turbo student: trailing timesteps)

    @property
    def is_text_model(self) -> bool:
        return self.text_encoder is not None


def load_checkpoint_file(path: Path) -> dict:
    """`torch.load` restricted to tensors and plain data, with errors that name the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # pickle errors, truncated zip archives, refused globals
        raise ValueError(f"cannot load checkpoint {path}: {error}") from error


def _from_lightning_checkpoint(path: Path, checkpoint: dict, meta: dict, use_ema: bool) -> TrainedDenoiser:
    net_class = NET_CLASSES.get(meta.get("net_class", ""))
    if net_class is None:  # a class name read from a file is never imported: only these are built
        raise ValueError(f"{path}: lightdiff.net_class={meta.get('net_class')!r} is not one of {sorted(NET_CLASSES)}")
    net = net_class.from_config(meta["net_config"])
    load_weights(net, _weights(checkpoint, "net."), f"{path} (net.)")
    ema_state = checkpoint.get("callbacks", {}).get("ema") or {}
    uses_ema = bool(use_ema and ema_state)
    if uses_ema:
        shadow = ema_state["shadow_params"]
        parameters = list(net.parameters())
        if len(shadow) != len(parameters):
            raise ValueError(f"{path}: EMA holds {len(shadow)} tensors for {len(parameters)} parameters")
        with torch.no_grad():
            for (name, parameter), average in zip(net.named_parameters(), shadow):
                if average.shape != parameter.shape:  # copy_ would broadcast a smaller tensor without a word
                    raise ValueError(
                        f"{path}: EMA weights of net.{name} have shape {tuple(average.shape)}, "
                        f"the network's {tuple(parameter.shape)}"
                    )
                parameter.copy_(average)
    elif use_ema:
        log.warning("%s has no EMA weights; sampling with the raw weights", path)
    denoiser = TrainedDenoiser(
        net=net.eval(),
        schedule=NoiseSchedule(**meta["schedule"]),
        prediction_type=meta["prediction_type"],
        class_names=meta.get("class_names"),
        source=str(path),
        uses_ema=uses_ema,
    )
    denoiser.scheduler_overrides = meta.get("scheduler_overrides")
    if "vae_config" in meta:  # a latent model (or a turbo student of one)
        from lightdiff.methods.latent import tokenizer_from_state

        denoiser.vae = AutoencoderKL.from_config(meta["vae_config"])
        load_weights(denoiser.vae, _weights(checkpoint, "vae."), f"{path} (vae.)")
        denoiser.text_encoder = CLIPTextModel(CLIPTextConfig(**meta["text_encoder_config"]))
        load_weights(denoiser.text_encoder, _weights(checkpoint, "text_encoder."), f"{path} (text_encoder.)")
        denoiser.tokenizer = tokenizer_from_state(meta["tokenizer"])
        denoiser.vae.eval()
        denoiser.text_encoder.eval()
    return denoiser


def _weights(checkpoint: dict, prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}


def _from_pipeline_folder(folder: Path) -> TrainedDenoiser:
    if not (folder / "unet").is_dir() or not (folder / "scheduler").is_dir():
        raise ValueError(f"{folder} is not a diffusers pipeline folder (it needs unet/ and scheduler/)")
    unet_class = json.loads((folder / "unet" / "config.json").read_text()).get("_class_name", "UNet2DModel")
    if unet_class not in NET_CLASSES:
        raise ValueError(f"{folder}: unet class {unet_class!r} is not one of {sorted(NET_CLASSES)}")
    net = NET_CLASSES[unet_class].from_pretrained(folder / "unet")
    scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    metadata_path = folder / METADATA_FILE
    metadata = json.loads(metadata_path.read_text()) if metadata_path.exists() else {}
    denoiser = TrainedDenoiser(
        net=net.eval(),
        schedule=NoiseSchedule.from_scheduler_config(scheduler_config),
        prediction_type=scheduler_config.get("prediction_type", "epsilon"),
        class_names=metadata.get("class_names"),
        source=str(folder),
        uses_ema=bool(metadata.get("uses_ema", False)),
    )
    if unet_class == "UNet2DConditionModel":
        for part in ("vae", "text_encoder", "tokenizer"):
            if not (folder / part).is_dir():
                raise ValueError(f"{folder} has a text-conditioned unet but no {part}/")
        denoiser.vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
        denoiser.text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
        denoiser.tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    return denoiser


def _autoencoder_from_checkpoint(path: Path, checkpoint: dict, meta: dict) -> AutoencoderKL:
    vae = AutoencoderKL.from_config(meta["vae_config"])
    load_weights(vae, _weights(checkpoint, "vae."), f"{path} (vae.)")
    return vae.eval()


def load_trained(path: str | Path, use_ema: bool = True) -> TrainedDenoiser | AutoencoderKL:
    """What a checkpoint file holds, read once: a denoiser (EMA weights by default) or, from the autoencoder
    stage, its VAE; a folder is read as an exported pipeline."""
    path = Path(path).expanduser()
    if path.is_dir():
        return _from_pipeline_folder(path)
    if not path.exists():
        raise FileNotFoundError(f"ckpt={str(path)!r} does not exist")
    checkpoint = load_checkpoint_file(path)
    meta = checkpoint.get("lightdiff")
    if not isinstance(meta, dict):
        raise ValueError(f"{path} is not a lightdiff checkpoint (no 'lightdiff' block)")
    if meta.get("method") == "autoencoder":
        return _autoencoder_from_checkpoint(path, checkpoint, meta)
    return _from_lightning_checkpoint(path, checkpoint, meta, use_ema)


def load_denoiser(path: str | Path, use_ema: bool = True) -> TrainedDenoiser:
    """A denoiser from a Lightning checkpoint file (EMA weights by default) or an exported pipeline folder."""
    trained = load_trained(path, use_ema)
    if not isinstance(trained, TrainedDenoiser):
        raise ValueError(f"{path} holds an autoencoder, not a denoiser")
    return trained


def load_autoencoder(path: str | Path) -> AutoencoderKL:
    """The VAE of an autoencoder-stage checkpoint, or a diffusers AutoencoderKL folder."""
    if Path(path).expanduser().is_dir():
        return AutoencoderKL.from_pretrained(Path(path).expanduser()).eval()
    trained = load_trained(path)
    if not isinstance(trained, AutoencoderKL):
        raise ValueError(f"{path} is not an autoencoder checkpoint")
    return trained


def export_pipeline(denoiser: TrainedDenoiser, scheduler: SchedulerMixin, folder: str | Path) -> Path:
    """Write a diffusers pipeline folder (safetensors) with `scheduler` as its sampler: `StableDiffusionPipeline`
    for text-conditioned latent models, `DDPMPipeline` for pixel models."""
    folder = Path(folder).expanduser()
    if denoiser.is_text_model:
        pipeline = StableDiffusionPipeline(
            vae=denoiser.vae,
            text_encoder=denoiser.text_encoder,
            tokenizer=denoiser.tokenizer,
            unet=denoiser.net,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    else:
        pipeline = DDPMPipeline(unet=denoiser.net, scheduler=scheduler)
    pipeline.save_pretrained(folder, safe_serialization=True)
    metadata = {"class_names": denoiser.class_names, "uses_ema": denoiser.uses_ema, "source": denoiser.source}
    (folder / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    return folder
