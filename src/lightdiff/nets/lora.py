"""LoRA adapters on any lightdiff denoiser (Hu et al. 2021, arXiv 2106.09685), made by `peft` as diffusers makes them.

W x becomes W x + (alpha / r) B A x with A (r x in) Gaussian and B (out x r) zero at the start, so an adapted network
starts equal to its base; only A and B train, the base W stays frozen and bit-identical. `model.lora.rank` turns
adapters on (`LoraSettings`); without a rank the whole network trains as before.

Files are diffusers' LoRA format: `pytorch_lora_weights.safetensors` holding peft's keys (`<module>.lora_A.weight`)
under the pipeline component's name (`unet.` / `transformer.`), with the adapter's LoraConfig in the safetensors
metadata, as `StableDiffusionPipeline.save_lora_weights` writes and `pipe.load_lora_weights(DIR)` reads.

Every function here works on any `torch.nn.Module` through peft, also for the diffusers classes without diffusers'
adapter mixin (UNet2DModel, DiT, PixArt), so training, export and `sample.py lora=` have one path for every network.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open

from lightdiff.config import ConfigError, PositiveFloat, PositiveInt

ADAPTER = "default"  # peft's adapter name; files carry no name
LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY in the safetensors header

# Presets (`target_modules: null`), as diffusers' LoRA training scripts choose them. Suffixes of module names.
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]  # every diffusers Attention: UNets and transformers
JOINT_ATTENTION = ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]  # MMDiT's text stream
FEED_FORWARD = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]  # transformer blocks
RESNET_CONVOLUTIONS = ["conv1", "conv2"]  # the 3x3 convolutions of a UNet's ResNet blocks (`convolutions: true`)


@dataclass
class LoraSettings:
    """`model.lora`: the adapters a method adds to its network; `rank: null` adds none (full training)."""

    rank: PositiveInt | None = None  # r; null: no adapters, the whole network trains
    alpha: PositiveFloat | None = None  # the update is scaled by alpha / r; null: alpha = r (scale 1, diffusers')
    dropout: float = 0.0  # dropout on the adapters' input
    target_modules: list[str] | None = None  # module-name suffixes; null: the preset of the network's family
    convolutions: bool = False  # add the UNet ResNet blocks' convolutions to the preset

    def __post_init__(self) -> None:
        if self.rank is not None and (isinstance(self.rank, bool) or self.rank < 1):
            raise ConfigError(f"model.lora.rank={self.rank} must be at least 1 (null turns LoRA off)")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model.lora.dropout={self.dropout} must lie in [0, 1)")
        if self.target_modules is not None:
            self.target_modules = [str(name) for name in self.target_modules]
            if not self.target_modules:
                raise ConfigError("model.lora.target_modules=[] names no module (null: the network's preset)")

    @property
    def enabled(self) -> bool:
        return self.rank is not None


def _module_names(net: torch.nn.Module) -> list[str]:
    return [name for name, _ in net.named_modules() if name]


def _matches(names: list[str], target: str) -> bool:
    return any(name == target or name.endswith("." + target) for name in names)


def target_modules(net: torch.nn.Module, settings: LoraSettings) -> list[str]:
    """The module suffixes to adapt: `settings.target_modules`, every one of which must exist, or the family's preset
    (attention projections; plus feed-forward in transformers; plus ResNet convolutions with `convolutions`)."""
    names = _module_names(net)
    is_unet = hasattr(net, "down_blocks")
    if settings.convolutions and not is_unet:
        raise ConfigError(f"model.lora.convolutions=true: {type(net).__name__} has no ResNet convolutions (UNets do)")
    if settings.target_modules is not None:
        missing = [target for target in settings.target_modules if not _matches(names, target)]
        if missing:
            raise ConfigError(
                f"model.lora.target_modules: {missing} match no module of {type(net).__name__} (module names end "
                f"with one of them; e.g. {names[:1] + [n for n in names if n.endswith('to_q')][:2]})"
            )
        targets = list(settings.target_modules)
    else:
        preset = ATTENTION if is_unet else ATTENTION + JOINT_ATTENTION + FEED_FORWARD
        targets = [target for target in preset if _matches(names, target)]
    if settings.convolutions:
        targets += RESNET_CONVOLUTIONS
    if not targets:
        raise ConfigError(
            f"model.lora: the preset adapts attention projections and {type(net).__name__} has none (its blocks are "
            f"{list(net.config.get('down_block_types') or [])}): set model.lora.convolutions=true or "
            "model.lora.target_modules"
        )
    return targets


def lora_config(net: torch.nn.Module, settings: LoraSettings) -> LoraConfig:
    rank = int(settings.rank)
    return LoraConfig(
        r=rank,
        lora_alpha=float(settings.alpha) if settings.alpha is not None else rank,
        lora_dropout=float(settings.dropout),
        init_lora_weights="gaussian",  # A Gaussian, B zero: the adapted network starts as its base (diffusers')
        target_modules=target_modules(net, settings),
    )


def is_adapter_key(name: str) -> bool:
    """Whether a parameter or state-dict key belongs to a LoRA adapter (peft names them `lora_A` / `lora_B`)."""
    return ".lora_A." in name or ".lora_B." in name


def has_adapters(net: torch.nn.Module) -> bool:
    return any(isinstance(module, BaseTunerLayer) for module in net.modules())


def add_adapters(net: torch.nn.Module, config: LoraConfig) -> None:
    """Inject `config`'s adapters into `net` and freeze everything else: only the adapters train."""
    inject_adapter_in_model(config, net, adapter_name=ADAPTER)
    for name, parameter in net.named_parameters():
        parameter.requires_grad_(is_adapter_key(name))


def adapt(net: torch.nn.Module, settings: LoraSettings, base_source: str) -> dict[str, Any]:
    """Add `settings`' adapters to `net` (the base, loaded from `base_source`); returns the record every adapter
    checkpoint carries: the adapters' LoraConfig, the base's source and fingerprint (checked wherever it is loaded)."""
    config = lora_config(net, settings)
    base = {"source": _source(base_source), "fingerprint": base_fingerprint(net), "net_class": type(net).__name__}
    add_adapters(net, config)
    return {"config": config_record(config), "base": base}


def _source(source: str) -> str:
    """A local base as an absolute path (a run may be resumed or sampled from elsewhere); a hub id as it is."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def config_record(config: LoraConfig) -> dict[str, Any]:
    """The LoraConfig fields lightdiff sets, as plain data (a checkpoint holds no peft object)."""
    return {
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": sorted(config.target_modules),
    }


def adapter_parameters(net: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [parameter for name, parameter in net.named_parameters() if is_adapter_key(name)]


def base_fingerprint(net: torch.nn.Module) -> str:
    """SHA-256 of the base weights (names, dtypes, shapes, bytes), the same before and after adapters are added: what
    an adapter file records of the base it belongs to, checked wherever it is applied again."""
    digest = hashlib.sha256()
    state = {k.replace(".base_layer", ""): v for k, v in net.state_dict().items() if not is_adapter_key(k)}
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


@contextmanager
def adapters_disabled(net: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """`net` as its base while inside (a turbo student whose base is the teacher); a no-op without adapters."""
    layers = [module for module in net.modules() if isinstance(module, BaseTunerLayer)]
    previous = [layer.disable_adapters for layer in layers]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield net
    finally:
        for layer, disabled in zip(layers, previous):
            layer.enable_adapters(not disabled)


def set_adapter_scale(net: torch.nn.Module, scale: float) -> None:
    """Scale every adapter's update by `scale` (diffusers' `lora_scale`): 0 is the base, 1 the adapters as trained."""
    for module in net.modules():
        if isinstance(module, BaseTunerLayer):
            module.set_scale(ADAPTER, scale)


def without_adapters(net: torch.nn.Module, fused: bool) -> torch.nn.Module:
    """A fresh network of `net`'s class holding its base weights, or (`fused`) the base with the adapters merged in
    at their current scale: what a diffusers pipeline folder holds."""
    source = copy.deepcopy(net)
    if fused:
        for module in source.modules():
            if isinstance(module, BaseTunerLayer):
                module.merge(adapter_names=[ADAPTER])
    state = {k.replace(".base_layer", ""): v for k, v in source.state_dict().items() if not is_adapter_key(k)}
    plain = type(net).from_config(net.config)
    plain.load_state_dict(state)
    return plain.eval()


# ----- diffusers' LoRA files ------------------------------------------------------------------------------------


def lora_prefix(net: torch.nn.Module) -> str:
    """The pipeline component a network is saved as, which prefixes its keys in a LoRA file."""
    return "unet" if hasattr(net, "down_blocks") else "transformer"


def write_lora_file(net: torch.nn.Module, folder: Path) -> Path:
    """`folder/pytorch_lora_weights.safetensors` with `net`'s adapters, written by diffusers' own pipeline writer."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline

    state = get_peft_model_state_dict(net, adapter_name=ADAPTER)
    metadata = net.peft_config[ADAPTER].to_dict()
    if lora_prefix(net) == "unet":
        StableDiffusionPipeline.save_lora_weights(
            folder, unet_lora_layers=state, unet_lora_adapter_metadata=metadata, weight_name=LORA_WEIGHTS_FILE
        )
    else:
        StableDiffusion3Pipeline.save_lora_weights(
            folder,
            transformer_lora_layers=state,
            transformer_lora_adapter_metadata=metadata,
            weight_name=LORA_WEIGHTS_FILE,
        )
    return folder / LORA_WEIGHTS_FILE


def _read_lora_file(path: Path, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The tensors under `prefix.` (prefix removed) and their LoraConfig from the header, if it has one."""
    if path.is_dir():
        path = path / LORA_WEIGHTS_FILE
    if not path.is_file():
        raise ConfigError(
            f"lora={str(path)!r} is not a file (a .safetensors file, or a folder with {LORA_WEIGHTS_FILE})"
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # not a safetensors file, truncated
        raise ConfigError(f"lora={str(path)!r} is not a readable safetensors file ({error})") from error
    ours = {key[len(prefix) + 1 :]: value for key, value in tensors.items() if key.startswith(prefix + ".")}
    others = sorted({key.split(".")[0] for key in tensors if not key.startswith(prefix + ".")})
    if others:
        raise ConfigError(
            f"lora={str(path)!r} holds adapters for {others}; lightdiff applies a file whose keys all start with "
            f"{prefix!r} (the denoiser's)"
        )
    if not ours:
        raise ConfigError(f"lora={str(path)!r} holds no tensor")
    if not any(".lora_A." in key for key in ours):
        from diffusers.utils import convert_unet_state_dict_to_peft

        ours = convert_unet_state_dict_to_peft(ours)  # diffusers' older `lora.down` / `lora.up` names
    metadata = json.loads(header[LORA_METADATA_KEY]) if LORA_METADATA_KEY in header else None
    if metadata is not None:  # the pipeline writer keys it by component: {"unet.r": 4, ...}
        metadata = {k[len(prefix) + 1 :]: v for k, v in metadata.items() if k.startswith(prefix + ".")} or metadata
    return ours, metadata


def load_lora_file(net: torch.nn.Module, path: str | Path) -> LoraConfig:
    """Add the adapters of a diffusers-format LoRA file to `net` (lightdiff's export or any other), checked to fit:
    a file made for another network names the keys that do not, before `net` changes."""
    path = Path(path).expanduser()
    state, metadata = _read_lora_file(path, lora_prefix(net))
    if metadata is not None:
        config = LoraConfig(**{k: v for k, v in metadata.items() if k in LoraConfig.__dataclass_fields__})
    else:  # no header: ranks from the shapes, alpha = rank (diffusers' reading of such files)
        from diffusers.utils.peft_utils import get_peft_kwargs

        ranks = {f"^{key}": value.shape[1] for key, value in state.items() if "lora_B" in key and value.ndim > 1}
        config = LoraConfig(**get_peft_kwargs(ranks, None, state))
    names = _module_names(net)
    targets = sorted({key.split(".lora_")[0] for key in state})
    unknown = [target for target in targets if target not in names]
    if unknown:
        raise ConfigError(
            f"lora={str(path)!r} was made for another network: {len(unknown)} of its modules are not in "
            f"{type(net).__name__} (e.g. {unknown[:3]})"
        )
    trial = copy.deepcopy(net)  # the check runs on a copy: `net` is untouched if the file does not fit
    inject_adapter_in_model(config, trial, adapter_name=ADAPTER)
    expected = get_peft_model_state_dict(trial, adapter_name=ADAPTER)
    wrong = [
        f"{key}: file {tuple(state[key].shape)}, network {tuple(expected[key].shape)}"
        for key in sorted(state)
        if key in expected and state[key].shape != expected[key].shape
    ]
    missing = sorted(set(expected) - set(state))
    if wrong or missing:
        detail = "; ".join(wrong[:3]) if wrong else f"no weights for {missing[:3]}"
        raise ConfigError(f"lora={str(path)!r} does not fit {type(net).__name__}: {detail}")
    add_adapters(net, config)
    set_peft_model_state_dict(net, state, adapter_name=ADAPTER)
    net.requires_grad_(False)
    return config
