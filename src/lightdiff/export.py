"""Load a trained denoiser from a Lightning checkpoint or a diffusers pipeline folder; export to diffusers.

Checkpoints are read with `torch.load(weights_only=True)`: tensors and plain data only, so a crafted file cannot
run code, and the network class comes from a fixed allow-list, never from a path stored in the file.

Export layouts, by network and objective (the sampler is the scheduler written to `scheduler/`):
- pixel UNet2DModel: `DDPMPipeline` (a flow-matching one too: DDPMPipeline's loop runs FlowMatchEulerDiscreteScheduler);
- latent UNet2DConditionModel: `StableDiffusionPipeline` (a flow-matching one keeps the layout, but diffusers'
  StableDiffusionPipeline calls `scale_model_input`, which FlowMatchEulerDiscreteScheduler lacks: sample it with
  lightdiff's sample.py);
- latent SD3Transformer2DModel (MMDiT): `StableDiffusion3Pipeline` with `text_encoder_2` = `text_encoder` (lightdiff
  trains one CLIPTextModelWithProjection, and SD3 concatenates the two encoders' outputs) and no T5; diffusers
  reproduces lightdiff's samples with `max_sequence_length=0` (no zero T5 tokens appended; see nets/denoiser.py);
- pixel DiTTransformer2DModel: diffusers' DiTPipeline needs a VAE, so the documented equivalent is `transformer/` +
  `scheduler/` + `lightdiff.json` without `model_index.json`; lightdiff's sample.py reads it like any export;
- latent PixArtTransformer2DModel: diffusers' PixArtAlphaPipeline expects a T5 encoder and masked T5 states, lightdiff
  trains a CLIPTextModel, so the documented equivalent is `transformer/` + `scheduler/` + `vae/` + `text_encoder/`
  (CLIPTextModel) + `tokenizer/` (CLIPTokenizer) + `lightdiff.json`, without `model_index.json`: each part is a
  diffusers / transformers folder (`from_pretrained`), and sample.py reads it back like any export.
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
    DiTTransformer2DModel,
    PixArtTransformer2DModel,
    SchedulerMixin,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from lightdiff.diffusion import DDPM, FlowMatching, NoiseSchedule, Objective, objective_from_state
from lightdiff.methods.checkpoint_checks import load_weights
from lightdiff.nets.denoiser import Denoiser, takes_pooled_text, takes_text

log = logging.getLogger(__name__)

NET_CLASSES: dict[str, type] = {
    "UNet2DModel": UNet2DModel,
    "UNet2DConditionModel": UNet2DConditionModel,
    "DiTTransformer2DModel": DiTTransformer2DModel,
    "SD3Transformer2DModel": SD3Transformer2DModel,
    "PixArtTransformer2DModel": PixArtTransformer2DModel,
}
TEXT_ENCODER_CLASSES: dict[str, type] = {
    "CLIPTextModel": CLIPTextModel,
    "CLIPTextModelWithProjection": CLIPTextModelWithProjection,
}
METADATA_FILE = "lightdiff.json"  # beside model_index.json: what diffusers' layout has no place for


@dataclass
class TrainedDenoiser:
    net: Denoiser
    schedule: NoiseSchedule
    prediction_type: str
    class_names: list[str] | None
    source: str  # the checkpoint file or pipeline folder it came from
    uses_ema: bool  # whether `net` holds the EMA weights
    vae: AutoencoderKL | None = None  # latent models only, as are the two below
    tokenizer: CLIPTokenizer | None = None
    text_encoder: CLIPTextModel | CLIPTextModelWithProjection | None = None
    scheduler_overrides: dict | None = None  # sampler settings the model needs (a turbo student: trailing timesteps)
    objective: Objective = DDPM()  # how it was trained, hence which sampler fits it

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
    denoiser.objective = objective_from_state(meta.get("objective"))  # absent before flow matching existed: ddpm
    if "vae_config" in meta:  # a latent model (or a turbo student of one)
        from lightdiff.methods.latent import tokenizer_from_state

        denoiser.vae = AutoencoderKL.from_config(meta["vae_config"])
        load_weights(denoiser.vae, _weights(checkpoint, "vae."), f"{path} (vae.)")
        text_class = TEXT_ENCODER_CLASSES.get(meta.get("text_encoder_class", "CLIPTextModel"))
        if text_class is None:  # as for the net: a class named in a file is only ever looked up
            raise ValueError(
                f"{path}: lightdiff.text_encoder_class={meta.get('text_encoder_class')!r} is not one of "
                f"{sorted(TEXT_ENCODER_CLASSES)}"
            )
        denoiser.text_encoder = text_class(CLIPTextConfig(**meta["text_encoder_config"]))
        load_weights(denoiser.text_encoder, _weights(checkpoint, "text_encoder."), f"{path} (text_encoder.)")
        denoiser.tokenizer = tokenizer_from_state(meta["tokenizer"])
        denoiser.vae.eval()
        denoiser.text_encoder.eval()
    return denoiser


def _weights(checkpoint: dict, prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}


def _from_pipeline_folder(folder: Path) -> TrainedDenoiser:
    part = "transformer" if (folder / "transformer").is_dir() else "unet"
    if not (folder / part).is_dir() or not (folder / "scheduler").is_dir():
        raise ValueError(f"{folder} is not a diffusers pipeline folder (it needs unet/ or transformer/ and scheduler/)")
    net_class = json.loads((folder / part / "config.json").read_text()).get("_class_name", "UNet2DModel")
    if net_class not in NET_CLASSES:
        raise ValueError(f"{folder}: {part} class {net_class!r} is not one of {sorted(NET_CLASSES)}")
    net = NET_CLASSES[net_class].from_pretrained(folder / part)
    scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    metadata_path = folder / METADATA_FILE
    metadata = json.loads(metadata_path.read_text()) if metadata_path.exists() else {}
    objective = objective_from_state(metadata.get("objective"))
    if scheduler_config.get("_class_name", "").startswith("FlowMatch") and not isinstance(objective, FlowMatching):
        # A flow-matching folder written elsewhere: its scheduler says how many timesteps and which shift.
        objective = FlowMatching(
            shift=float(scheduler_config.get("shift", 1.0)),
            num_train_timesteps=int(scheduler_config.get("num_train_timesteps", 1000)),
        )
    denoiser = TrainedDenoiser(
        net=net.eval(),
        schedule=NoiseSchedule.from_scheduler_config(scheduler_config),
        prediction_type=scheduler_config.get("prediction_type", "epsilon"),
        class_names=metadata.get("class_names"),
        source=str(folder),
        uses_ema=bool(metadata.get("uses_ema", False)),
        objective=objective,
    )
    if takes_text(net):
        for component in ("vae", "text_encoder", "tokenizer"):
            if not (folder / component).is_dir():
                raise ValueError(f"{folder} has a text-conditioned {part} but no {component}/")
        text_class = CLIPTextModelWithProjection if takes_pooled_text(net) else CLIPTextModel
        denoiser.vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
        denoiser.text_encoder = text_class.from_pretrained(folder / "text_encoder").eval()
        denoiser.tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        if takes_pooled_text(net):
            _check_lightdiff_sd3_layout(folder, denoiser.text_encoder)
    return denoiser


def _check_lightdiff_sd3_layout(folder: Path, text_encoder: CLIPTextModelWithProjection) -> None:
    """lightdiff samples an SD3 folder with `text_encoder` standing in for both CLIP encoders and no T5, as it exports
    them; a folder that holds another second encoder or a T5 would sample differently here than in diffusers."""
    if (folder / "text_encoder_3").is_dir():
        raise ValueError(f"{folder} has a T5 text_encoder_3/; lightdiff samples only its own SD3 exports (no T5)")
    second = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2")
    first_state, second_state = text_encoder.state_dict(), second.state_dict()
    if first_state.keys() != second_state.keys() or any(
        not torch.equal(first_state[key], second_state[key]) for key in first_state
    ):
        raise ValueError(
            f"{folder}: text_encoder_2 differs from text_encoder; lightdiff samples only its own SD3 exports, "
            "which use one encoder for both"
        )


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
    for text-conditioned latent UNets, `StableDiffusion3Pipeline` for latent MMDiTs, `DDPMPipeline` for pixel UNets,
    `transformer/` + `scheduler/` for pixel DiTs, and those plus `vae/`, `text_encoder/`, `tokenizer/` for latent
    PixArts (the layouts are described at the top of this module)."""
    folder = Path(folder).expanduser()
    if isinstance(denoiser.net, SD3Transformer2DModel):
        vae = denoiser.vae
        if vae.config.shift_factor is None:
            # StableDiffusion3Pipeline decodes latents / scaling_factor + shift_factor; lightdiff never shifts.
            vae.register_to_config(shift_factor=0.0)
        pipeline = StableDiffusion3Pipeline(
            transformer=denoiser.net,
            scheduler=scheduler,
            vae=vae,
            text_encoder=denoiser.text_encoder,
            tokenizer=denoiser.tokenizer,
            text_encoder_2=denoiser.text_encoder,  # one encoder stands in for SD3's two CLIPs (nets/denoiser.py)
            tokenizer_2=denoiser.tokenizer,
            text_encoder_3=None,
            tokenizer_3=None,
        )
    elif isinstance(denoiser.net, DiTTransformer2DModel):
        pipeline = None  # no diffusers pipeline runs a pixel-space DiT: the parts alone (see the module docstring)
        denoiser.net.save_pretrained(folder / "transformer", safe_serialization=True)
        scheduler.save_pretrained(folder / "scheduler")
    elif isinstance(denoiser.net, PixArtTransformer2DModel):
        pipeline = None  # PixArtAlphaPipeline expects a T5 encoder: the parts alone (see the module docstring)
        denoiser.net.save_pretrained(folder / "transformer", safe_serialization=True)
        scheduler.save_pretrained(folder / "scheduler")
        denoiser.vae.save_pretrained(folder / "vae", safe_serialization=True)
        denoiser.text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
        denoiser.tokenizer.save_pretrained(folder / "tokenizer")
    elif denoiser.is_text_model:
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
    if pipeline is not None:
        pipeline.save_pretrained(folder, safe_serialization=True)
    metadata = {
        "class_names": denoiser.class_names,
        "uses_ema": denoiser.uses_ema,
        "source": denoiser.source,
        "objective": denoiser.objective.state(),
    }
    (folder / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    return folder
