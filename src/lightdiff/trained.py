"""A trained model, read from a Lightning checkpoint or a diffusers pipeline folder: what sample.py, the exporter and
a turbo teacher use. No training method is imported: a checkpoint's plain-data `lightdiff` block says everything.

Checkpoints are read with `torch.load(weights_only=True)`: tensors and plain data only, so a crafted file cannot
run code, and every class comes from a fixed allow-list, never from a path stored in the file.
"""

from __future__ import annotations

import json
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import LCMScheduler
from peft import LoraConfig

from lightdiff.checkpointing import adapter_weights, check_state_dict, format_problem, load_weights, nonfinite_weight
from lightdiff.diffusion import EDM, FlowMatching, NoiseSchedule, Objective, objective_from_state
from lightdiff.nets.families import (
    Conditioning,
    ConditioningSettings,
    Denoiser,
    conditioning_from_state,
    denoiser_classes,
    family_of,
)
from lightdiff.nets.families import (
    load_denoiser as load_pipeline_denoiser,
)
from lightdiff.nets.families.base import NO_DATA, EncodesWithVae, TextEncoders
from lightdiff.nets.families.sd import CLIPText
from lightdiff.nets.lora import (
    LORA_FILES,
    add_adapters,
    base_fingerprint,
    has_adapters,
    is_adapter_key,
    load_lora_file,
)
from lightdiff.nets.pretrained import load_vae
from lightdiff.nets.text import TEXT_ENCODER_CLASSES, tokenizer_from_state
from lightdiff.nets.vae import VAE_CLASSES, Autoencoder, vae_scale_factor
from lightdiff.sampling import sample_size

log = logging.getLogger(__name__)

# Samplers a model may require whatever `sampler=` says (a latent consistency model: LCMScheduler), by class name.
REQUIRED_SAMPLERS: dict[str, type] = {"LCMScheduler": LCMScheduler}
METADATA_FILE = "lightdiff.json"  # beside model_index.json: what diffusers' layout has no place for
VAE_CLASSES_TUPLE = tuple(VAE_CLASSES.values())


@dataclass
class TrainedDenoiser:
    net: Denoiser
    objective: Objective  # how it was trained, hence which sampler fits it
    conditioning: Conditioning  # the family that makes its network's conditioning (frozen)
    class_names: list[str] | None
    source: str  # the checkpoint file or pipeline folder it came from
    uses_ema: bool  # whether `net` holds the EMA weights
    vae: Autoencoder | None = None  # latent models only
    scheduler_overrides: dict | None = None  # sampler settings the model needs (a turbo student: trailing timesteps)
    required_sampler: str | None = None  # a key of REQUIRED_SAMPLERS: the only sampler that fits (LCM students)
    image_size: tuple[int, int] | None = None  # (height, width) in pixels it trained at, where recorded
    num_frames: int | None = None  # frames per clip a video model trained on, where recorded
    teacher: str | None = None  # a distilled student's teacher (checkpoint or pipeline), where recorded
    student_steps: int | None = None  # the steps a few-step student was trained to sample in, where recorded

    def default_size(self) -> tuple[int, int]:
        """(height, width) in pixels sample.py draws without `height` / `width`: the training size where recorded
        (a FLUX transformer has no size of its own), else the network's `sample_size` through the VAE."""
        if self.image_size is not None:
            return self.image_size
        return sample_size(self.net, vae_scale_factor(self.vae) if self.vae is not None else 1)


def _distillation(meta: dict) -> dict[str, object]:
    """A student's teacher and step count, as its checkpoint records them (methods/teacher.py save_student)."""
    timesteps = meta.get("student_timesteps")
    return {"teacher": meta.get("teacher"), "student_steps": len(timesteps) if timesteps else None}


PICKLE_PROTOCOL_2_OR_LATER = 0x80  # first byte of torch.save's legacy (non-zip) format: a pickle, protocol >= 2


def load_checkpoint_file(path: Path) -> dict:
    """`torch.load` restricted to tensors and plain data, with errors that name the file."""
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive (a pickle before torch 1.6)
        with open(path, "rb") as handle:
            head = handle.read(16)
        if head[:1] != bytes([PICKLE_PROTOCOL_2_OR_LATER]):
            raise ValueError(
                f"{path} is not a checkpoint: neither torch.save's archive nor a pickle (it starts with {head!r}); "
                "give a lightdiff .ckpt file or an exported pipeline folder"
            )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # pickle errors, truncated zip archives, refused globals
        raise ValueError(f"cannot load checkpoint {path}: {error}") from error


def _weights(checkpoint: dict, prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}


def _load_ema(net: torch.nn.Module, checkpoint: dict, path: Path) -> bool:
    """Copy the EMA weights of the checkpoint into `net` (its adapters alone, if it has any: what trained); False
    where it has none."""
    ema_state = checkpoint.get("callbacks", {}).get("ema") or {}
    if not ema_state:
        return False
    shadow = ema_state["shadow_params"]
    adapted = has_adapters(net)
    # what `callbacks.ema.averaged_parameters` covered: the parameters that trained (a frozen Wan expert's did not)
    named = [(n, p) for n, p in net.named_parameters() if (is_adapter_key(n) or not adapted) and p.requires_grad]
    if len(shadow) != len(named):
        raise ValueError(f"{path}: EMA holds {len(shadow)} tensors for {len(named)} parameters")
    with torch.no_grad():
        for (name, parameter), average in zip(named, shadow):
            if average.shape != parameter.shape:  # copy_ would broadcast a smaller tensor without a word
                raise ValueError(
                    f"{path}: EMA weights of net.{name} have shape {tuple(average.shape)}, "
                    f"the network's {tuple(parameter.shape)}"
                )
            parameter.copy_(average)
    return True


def _conditioning_of_checkpoint(path: Path, checkpoint: dict, meta: dict, net: torch.nn.Module) -> Conditioning:
    if "conditioning" in meta:
        conditioning = conditioning_from_state(meta["conditioning"])
        load_weights(conditioning, _weights(checkpoint, "conditioning."), f"{path} (conditioning.)")
        return conditioning
    if "text_encoder_config" not in meta:  # format 1 without text: the net's labels, if any
        return family_of(net).new_conditioning(net, ConditioningSettings(), NO_DATA)
    # Format 1 (before conditioning families): the text encoder's weights under `text_encoder.`.
    encoder_class = TEXT_ENCODER_CLASSES.get(meta.get("text_encoder_class", "CLIPTextModel"))
    if encoder_class is None:
        raise ValueError(
            f"{path}: lightdiff.text_encoder_class={meta.get('text_encoder_class')!r} is not one of "
            f"{sorted(TEXT_ENCODER_CLASSES)}"
        )
    from transformers import CLIPTextConfig

    text_encoder = encoder_class(CLIPTextConfig(**meta["text_encoder_config"]))
    load_weights(text_encoder, _weights(checkpoint, "text_encoder."), f"{path} (text_encoder.)")
    return CLIPText(tokenizer_from_state(meta["tokenizer"]), text_encoder.eval(), trainable=False)


def _from_lightning_checkpoint(path: Path, checkpoint: dict, meta: dict, use_ema: bool) -> TrainedDenoiser:
    if meta.get("lora"):
        return _adapters_on_base(path, checkpoint, meta, use_ema)
    classes = denoiser_classes()
    net_class = classes.get(meta.get("net_class", ""))
    if net_class is None:  # a class name read from a file is never imported: only these are built
        raise ValueError(f"{path}: lightdiff.net_class={meta.get('net_class')!r} is not one of {sorted(classes)}")
    net = net_class.from_config(meta["net_config"])
    load_weights(net, _weights(checkpoint, "net."), f"{path} (net.)")
    uses_ema = use_ema and _load_ema(net, checkpoint, path)
    if use_ema and not uses_ema:
        log.warning("%s has no EMA weights; sampling with the raw weights", path)
    vae = _autoencoder_from_checkpoint(path, checkpoint, meta) if meta.get("vae_config") else None
    conditioning = _conditioning_of_checkpoint(path, checkpoint, meta, net)
    if isinstance(conditioning, EncodesWithVae):  # SVD's conditioning frame goes through the model's VAE
        conditioning.attach_vae(vae)
    return TrainedDenoiser(
        net=net.eval(),
        # format 1 kept the schedule and prediction type beside the objective's name
        objective=objective_from_state(
            meta.get("objective"), meta.get("schedule"), meta.get("prediction_type", "epsilon")
        ),
        conditioning=conditioning,
        class_names=meta.get("class_names"),
        source=str(path),
        uses_ema=uses_ema,
        vae=vae,
        scheduler_overrides=meta.get("scheduler_overrides"),
        required_sampler=_required_sampler(meta.get("sampler"), path),
        image_size=_image_size(meta.get("image_size")),
        num_frames=meta.get("num_frames"),
        **_distillation(meta),
    )


def _adapters_on_base(path: Path, checkpoint: dict, meta: dict, use_ema: bool) -> TrainedDenoiser:
    """A checkpoint of LoRA adapters: its base, reloaded from where it was trained and checked to be the same weights,
    with the adapters (EMA ones by default); the objective and sampler settings are the checkpoint's."""
    record = meta["lora"]
    source = record["base"]["source"]
    try:
        base = load_denoiser(local_path(source))
    except (FileNotFoundError, ValueError) as error:
        raise ValueError(
            f"{path}: its LoRA adapters belong to the base {source!r}, which cannot be loaded: {error}"
        ) from error
    net = base.net
    if base_fingerprint(net) != record["base"]["fingerprint"]:
        raise ValueError(
            f"{path}: the base {source!r} no longer holds the weights its adapters were trained on (fingerprint "
            f"{base_fingerprint(net)[:12]}, recorded {record['base']['fingerprint'][:12]})"
        )
    add_adapters(net, LoraConfig(**record["config"]))
    adapters = _weights(checkpoint, "net.")
    check_state_dict(adapter_weights(net.state_dict()), adapters, f"{path} (net. adapters)")
    net.load_state_dict(adapters, strict=False)  # the base's weights are already in place
    uses_ema = use_ema and _load_ema(net, checkpoint, path)
    conditioning = base.conditioning
    if "conditioning" in meta:  # the settings the adapters trained with (FLUX's max_sequence_length, ...), not the
        # base pipeline's defaults, on the base's frozen weights (the checkpoint holds none of them)
        conditioning = conditioning_from_state(meta["conditioning"])
        load_weights(conditioning, base.conditioning.state_dict(), f"{source} (its conditioning)")
        if isinstance(conditioning, EncodesWithVae):
            conditioning.attach_vae(base.vae)
    if record.get("text_encoder"):  # model.lora.text_encoder: the pipeline's encoder had adapters too
        encoder = conditioning.text_encoders()["text_encoder"]
        if base_fingerprint(encoder) != record["text_encoder"]["fingerprint"]:
            raise ValueError(f"{path}: the text encoder of {source!r} is not the one its adapters were trained on")
        add_adapters(encoder, LoraConfig(**record["text_encoder"]["config"]))
        encoder_adapters = _weights(checkpoint, "conditioning.text_encoder.")
        check_state_dict(
            adapter_weights(encoder.state_dict()), encoder_adapters, f"{path} (conditioning.text_encoder.)"
        )
        encoder.load_state_dict(encoder_adapters, strict=False)
        encoder.requires_grad_(False).eval()
    return TrainedDenoiser(
        net=net.requires_grad_(False).eval(),
        objective=objective_from_state(meta["objective"]),
        conditioning=conditioning.requires_grad_(False).eval(),
        class_names=meta.get("class_names"),
        source=str(path),
        uses_ema=uses_ema,
        vae=base.vae,
        scheduler_overrides=meta.get("scheduler_overrides"),
        required_sampler=_required_sampler(meta.get("sampler"), path),
        image_size=_image_size(meta.get("image_size")),
        num_frames=meta.get("num_frames", base.num_frames),  # a video base's clip length, as the adapters trained
        **_distillation(meta),
    )


def local_path(source: str) -> Path:
    """A file or folder, or a hub id's snapshot (downloaded once, then read from the cache)."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source))
    except Exception as error:  # offline, unknown id, no access
        raise FileNotFoundError(f"{source!r} is neither a file, a folder nor a reachable hub id ({error})") from error


def _required_sampler(name: str | None, source: Path) -> str | None:
    if name is not None and name not in REQUIRED_SAMPLERS:
        raise ValueError(f"{source}: sampler {name!r} is not one of {sorted(REQUIRED_SAMPLERS)}")
    return name


def _from_pipeline_folder(folder: Path) -> TrainedDenoiser:
    part = "transformer" if (folder / "transformer").is_dir() else "unet"
    if not (folder / part).is_dir() or not (folder / "scheduler").is_dir():
        raise ValueError(f"{folder} is not a diffusers pipeline folder (it needs unet/ or transformer/ and scheduler/)")
    net_class = json.loads((folder / part / "config.json").read_text()).get("_class_name", "UNet2DModel")
    classes = denoiser_classes()
    if net_class not in classes:
        raise ValueError(f"{folder}: {part} class {net_class!r} is not one of {sorted(classes)}")
    if (folder / "transformer_2").is_dir():  # Wan 2.2 A14B's two experts, as one net
        net = load_pipeline_denoiser(str(folder), key="the pipeline folder").eval()
    else:
        net = classes[net_class].from_pretrained(folder / part).eval()
    scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    metadata_path = folder / METADATA_FILE
    metadata = json.loads(metadata_path.read_text()) if metadata_path.exists() else {}
    saved_objective = metadata.get("objective") or {}
    if saved_objective.get("name") in ("flow_matching", "edm"):  # lightdiff's own export: the training settings too
        objective = objective_from_state(saved_objective)
    elif scheduler_config.get("timestep_type") == "continuous":  # Stable Video Diffusion's EDM sampler
        objective = EDM(
            sigma_min=float(scheduler_config.get("sigma_min") or EDM.sigma_min),
            sigma_max=float(scheduler_config.get("sigma_max") or EDM.sigma_max),
            num_train_timesteps=int(scheduler_config.get("num_train_timesteps", 1000)),
        )
    elif scheduler_config.get("_class_name", "").startswith("FlowMatch"):
        # A flow-matching folder written elsewhere: its scheduler says how many timesteps and which shift.
        objective = FlowMatching(
            shift=float(scheduler_config.get("shift", 1.0)),
            num_train_timesteps=int(scheduler_config.get("num_train_timesteps", 1000)),
        )
    else:  # a DDPM folder: its scheduler holds the schedule and the prediction type
        objective = objective_from_state(
            {
                "name": "ddpm",
                "schedule": vars(NoiseSchedule.from_scheduler_config(scheduler_config)),
                "prediction_type": scheduler_config.get("prediction_type", "epsilon"),
            }
        )
    # the family reads its conditioning (and the VAE) as its pipeline lays them out
    vae, conditioning = family_of(net).read_folder(folder, net, metadata, lambda: load_vae(None, str(folder / "vae")))
    if vae is not None:
        vae = vae.eval()
    if any((folder / name).is_file() for name in set(LORA_FILES.values())):  # LoRA adapters: the base with them
        encoders = conditioning.text_encoders() if isinstance(conditioning, TextEncoders) else {}
        load_lora_file(net, folder, encoders.get("text_encoder"))
    return TrainedDenoiser(
        net=net,
        objective=objective,
        conditioning=conditioning,
        class_names=metadata.get("class_names"),
        source=str(folder),
        uses_ema=bool(metadata.get("uses_ema", False)),
        vae=vae,
        required_sampler="LCMScheduler" if scheduler_config.get("_class_name") == "LCMScheduler" else None,
        image_size=_image_size(metadata.get("image_size")),
        num_frames=metadata.get("num_frames"),
    )


def _image_size(recorded: list[int] | None) -> tuple[int, int] | None:
    return (int(recorded[0]), int(recorded[1])) if recorded else None


def _autoencoder_from_checkpoint(path: Path, checkpoint: dict, meta: dict) -> Autoencoder:
    """The checkpoint's VAE (`vae.`), of the class it records (AutoencoderKL before classes were recorded)."""
    vae_class = VAE_CLASSES.get(meta.get("vae_class") or "AutoencoderKL")
    if vae_class is None:
        raise ValueError(f"{path}: lightdiff.vae_class={meta.get('vae_class')!r} is not one of {sorted(VAE_CLASSES)}")
    vae = vae_class.from_config(meta["vae_config"])
    load_weights(vae, _weights(checkpoint, "vae."), f"{path} (vae.)")
    return vae.eval()


def load_trained(path: str | Path, use_ema: bool = True) -> TrainedDenoiser | Autoencoder:
    """What a checkpoint file holds, read once: a denoiser (EMA weights by default) or, from the autoencoder
    stage, its VAE; a folder is read as an exported pipeline."""
    path = Path(path).expanduser()
    if path.is_dir():
        return _finite(_from_pipeline_folder(path), path)
    if not path.exists():
        raise FileNotFoundError(f"ckpt={str(path)!r} does not exist")
    checkpoint = load_checkpoint_file(path)
    meta = checkpoint.get("lightdiff")
    if not isinstance(meta, dict):
        raise ValueError(f"{path} is not a lightdiff checkpoint (no 'lightdiff' block)")
    if problem := format_problem(checkpoint):
        raise ValueError(f"{path}: {problem}")
    if meta.get("method") == "autoencoder":
        return _finite(_autoencoder_from_checkpoint(path, checkpoint, meta), path)
    return _finite(_from_lightning_checkpoint(path, checkpoint, meta, use_ema), path)


def _finite(trained: TrainedDenoiser | Autoencoder, path: Path) -> TrainedDenoiser | Autoencoder:
    """`trained`, once every weight about to be sampled or exported (the EMA ones where used) is finite: a NaN would
    draw black images and export a pipeline holding it, both without an error."""
    if isinstance(trained, TrainedDenoiser):
        parts = {"net": trained.net, "conditioning": trained.conditioning, "vae": trained.vae}
    else:
        parts = {"vae": trained}
    for prefix, module in parts.items():
        if module is not None and (bad := nonfinite_weight(module, prefix)):
            ema = prefix == "net" and isinstance(trained, TrainedDenoiser) and trained.uses_ema
            raise ValueError(
                f"{path}: {bad} ({'EMA weights' if ema else 'weights'}) holds NaN or infinite values; nothing was "
                "drawn or written (use an earlier checkpoint of the run)"
            )
    return trained


def load_denoiser(path: str | Path, use_ema: bool = True) -> TrainedDenoiser:
    """A denoiser from a Lightning checkpoint file (EMA weights by default) or an exported pipeline folder."""
    trained = load_trained(path, use_ema)
    if not isinstance(trained, TrainedDenoiser):
        raise ValueError(f"{path} holds an autoencoder, not a denoiser")
    return trained


def load_autoencoder(path: str | Path) -> Autoencoder:
    """The VAE of an autoencoder-stage checkpoint, or a diffusers VAE folder (AutoencoderKL, a video VAE)."""
    if Path(path).expanduser().is_dir():
        return load_vae(None, str(Path(path).expanduser())).eval()
    trained = load_trained(path)
    if not isinstance(trained, VAE_CLASSES_TUPLE):
        raise ValueError(f"{path} is not an autoencoder checkpoint")
    return trained
