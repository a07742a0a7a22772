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
import itertools
import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from safetensors import safe_open

from lightdiff.config import ConfigError, PositiveFloat, PositiveInt
from lightdiff.nets.single_file import original_unet_names

ADAPTER = "default"  # peft's adapter name; files carry no name
LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY in the safetensors header
# A pair of experts' second one (Wan 2.2 A14B's low-noise `transformer_2`) has its own file, which diffusers applies
# with `pipe.load_lora_weights(DIR, weight_name=EXPERT_2_LORA_FILE, load_into_transformer_2=True)`
EXPERT_2_LORA_FILE = "pytorch_lora_weights_transformer_2.safetensors"
LORA_FILES = {"unet": LORA_WEIGHTS_FILE, "transformer": LORA_WEIGHTS_FILE, "transformer_2": EXPERT_2_LORA_FILE}

# Presets (`target_modules: null`), as diffusers' LoRA training scripts choose them. Suffixes of module names.
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]  # every diffusers Attention: UNets and transformers
JOINT_ATTENTION = ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]  # MMDiT's text stream
# transformer blocks' MLPs (Wan's blocks call theirs `ffn`, Qwen-Image's `img_mlp` and `txt_mlp`, Z-Image's SwiGLU
# `feed_forward`, FLUX.2's `linear_in` / `linear_out`)
FEED_FORWARD = [
    *("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "ffn.net.0.proj", "ffn.net.2"),
    *("img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"),
    *("feed_forward.w1", "feed_forward.w2", "feed_forward.w3"),
    *("ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out"),  # FLUX.2's double-stream
    "to_qkv_mlp_proj",  # FLUX.2's single-stream blocks: attention and MLP inputs in one projection ...
    "attn.to_out",  # ... and outputs in one (a Linear there; an Attention's to_out is a list: `_adaptable`)
]
RESNET_CONVOLUTIONS = ["conv1", "conv2"]  # the 3x3 convolutions of a UNet's ResNet blocks (`convolutions: true`)
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]  # CLIP's attention (`text_encoder: true`)


@dataclass
class LoraSettings:
    """`model.lora`: the adapters a method adds to its network; `rank: null` adds none (full training)."""

    rank: PositiveInt | None = None  # r; null: no adapters, the whole network trains
    alpha: PositiveFloat | None = None  # the update is scaled by alpha / r; null: alpha = r (scale 1, diffusers')
    dropout: float = 0.0  # dropout on the adapters' input
    target_modules: list[str] | None = None  # module-name suffixes; null: the preset of the network's family
    convolutions: bool = False  # add the UNet ResNet blocks' convolutions to the preset
    text_encoder: bool = False  # also adapt a pretrained CLIP text encoder's attention (model=latent)

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


def _adaptable(net: torch.nn.Module, target: str) -> list[str]:
    """`target` where every module it names is a layer peft adapts; else the full names of those that are (FLUX.2's
    single-stream `attn.to_out` is a Linear, its double-stream blocks' a list); none where it names nothing."""
    matched = [(name, module) for name, module in net.named_modules() if name == target or name.endswith("." + target)]
    layers = [name for name, module in matched if isinstance(module, torch.nn.Linear | torch.nn.Conv2d)]
    return [target] if matched and len(layers) == len(matched) else layers


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
        targets = [name for target in preset for name in _adaptable(net, target)]
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
    """The adapters' config; a network with a frozen component (one of Wan 2.2's experts trains alone) gets none
    there: peft's `exclude_modules` (a regex over module names) leaves it out."""
    frozen = getattr(net, "frozen_component", None)
    return _config(settings, target_modules(net, settings), rf"{frozen}\..*" if frozen else None)


def text_encoder_lora_config(settings: LoraSettings) -> LoraConfig:
    return _config(settings, TEXT_ENCODER_TARGETS)


def _config(settings: LoraSettings, targets: list[str], exclude: str | None = None) -> LoraConfig:
    rank = int(settings.rank)
    return LoraConfig(
        r=rank,
        lora_alpha=float(settings.alpha) if settings.alpha is not None else rank,
        lora_dropout=float(settings.dropout),
        init_lora_weights="gaussian",  # A Gaussian, B zero: the adapted network starts as its base (diffusers')
        target_modules=targets,
        exclude_modules=exclude,
    )


def is_adapter_key(name: str) -> bool:
    """Whether a parameter or state-dict key belongs to a LoRA adapter (peft names them `lora_A` / `lora_B`)."""
    return ".lora_A." in name or ".lora_B." in name


def has_adapters(net: torch.nn.Module) -> bool:
    return any(isinstance(module, BaseTunerLayer) for module in net.modules())


def _layer_sides(module: torch.nn.Module) -> tuple[int, int] | None:
    """(inputs, outputs) of a layer LoRA adapts, as the low-rank factors see them: a convolution's input side is
    its in_channels times its kernel (lora_A is a convolution of that kernel); None for other modules."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, torch.nn.modules.conv._ConvNd):
        return module.in_channels // module.groups * math.prod(module.kernel_size), module.out_channels
    return None


def check_rank(net: torch.nn.Module, config: LoraConfig, key: str = "model.lora.rank") -> None:
    """Refuse a rank above an adapted layer's smaller side, naming the layer, before any adapter is allocated: such
    adapters are larger than the layer itself and add nothing a full fine-tune would not (rank 1000 on a 320-wide
    layer), and a huge rank ends in an allocator error with no key named."""
    for name, module in net.named_modules():
        sides = _layer_sides(module)
        if sides is None or not check_target_module_exists(config, name):
            continue
        if config.r > min(sides):
            raise ConfigError(
                f"{key}={config.r} is above the smaller side of the adapted layer {name} ({type(module).__name__} "
                f"{sides[0]} -> {sides[1]}): at most {min(sides)} here; lower the rank, or train the whole network "
                "(model.lora.rank=null)"
            )


def add_adapters(net: torch.nn.Module, config: LoraConfig) -> None:
    """Inject `config`'s adapters into `net` and freeze everything else: only the adapters train."""
    inject_adapter_in_model(config, net, adapter_name=ADAPTER)
    for name, parameter in net.named_parameters():
        parameter.requires_grad_(is_adapter_key(name))


def adapt(
    net: torch.nn.Module,
    settings: LoraSettings,
    base_source: str,  # where the base comes from (a pipeline folder or hub id, a teacher checkpoint)
    text_encoder: torch.nn.Module | None = None,  # with `settings.text_encoder`: the pipeline's text encoder
) -> dict[str, Any]:
    """Add `settings`' adapters to `net` (and `text_encoder`); returns the record every adapter checkpoint carries:
    the adapters' LoraConfigs, the base's source and fingerprints (checked wherever the adapters are loaded)."""
    config = lora_config(net, settings)
    check_rank(net, config)
    if text_encoder is not None:
        check_rank(text_encoder, text_encoder_lora_config(settings))
    base = {"source": _source(base_source), "fingerprint": base_fingerprint(net), "net_class": type(net).__name__}
    add_adapters(net, config)
    record: dict[str, Any] = {"config": config_record(config), "base": base}
    if text_encoder is not None:
        encoder_config = text_encoder_lora_config(settings)
        record["text_encoder"] = {
            "config": config_record(encoder_config),
            "fingerprint": base_fingerprint(text_encoder),
        }
        add_adapters(text_encoder, encoder_config)
    return record


def _source(source: str) -> str:
    """A local base as an absolute path (a run may be resumed or sampled from elsewhere); a hub id as it is."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def config_record(config: LoraConfig) -> dict[str, Any]:
    """The LoraConfig fields lightdiff sets, as plain data (a checkpoint holds no peft object)."""
    record = {
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": sorted(config.target_modules),
    }
    return record | ({"exclude_modules": config.exclude_modules} if config.exclude_modules else {})


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
    # diffusers models are built from their config with from_config, transformers models by their constructor
    plain = type(net).from_config(net.config) if hasattr(type(net), "from_config") else type(net)(net.config)
    plain.load_state_dict(state)
    return plain.eval()


# ----- diffusers' LoRA files ------------------------------------------------------------------------------------


def lora_prefix(net: torch.nn.Module) -> str:
    """The pipeline component a network is saved as, which prefixes its keys in a LoRA file."""
    return "unet" if hasattr(net, "down_blocks") else "transformer"


def pipeline_components(net: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The pipeline components `net` is saved as, each with its LoRA file (`LORA_FILES`): itself as `unet` or
    `transformer`, or a pair of experts' own (Wan 2.2 A14B: `transformer` and `transformer_2`)."""
    components = getattr(net, "pipeline_components", None)
    return dict(components) if components is not None else {lora_prefix(net): net}


def adapter_states(net: torch.nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """peft's adapter tensors of each pipeline component of `net` that has any (`pipeline_components`), keyed
    relative to that component: what each LoRA file of it holds."""
    state = get_peft_model_state_dict(net, adapter_name=ADAPTER)
    components = pipeline_components(net)
    if len(components) == 1:
        return {name: state for name in components if state}
    parts = {
        name: {key[len(name) + 1 :]: value for key, value in state.items() if key.startswith(name + ".")}
        for name in components
    }
    return {name: part for name, part in parts.items() if part}


def write_expert_lora_files(net: torch.nn.Module, folder: Path) -> list[Path]:
    """A pair of experts' adapters, one diffusers LoRA file per adapted expert (`LORA_FILES`), each with its keys
    under `transformer.` as diffusers writes and reads them (`load_into_transformer_2` for the second)."""
    from diffusers import StableDiffusion3Pipeline

    config = net.peft_config[ADAPTER].to_dict()
    config["exclude_modules"] = None  # names of the pair's modules: each file adapts one plain transformer
    states = adapter_states(net)
    for name, part in states.items():
        StableDiffusion3Pipeline.save_lora_weights(
            folder, transformer_lora_layers=part, transformer_lora_adapter_metadata=config, weight_name=LORA_FILES[name]
        )
    return [folder / LORA_FILES[name] for name in states]


def write_lora_file(net: torch.nn.Module, folder: Path, text_encoder: torch.nn.Module | None = None) -> Path:
    """`folder/pytorch_lora_weights.safetensors` with the adapters of `net` (and of `text_encoder`, if it has any),
    written by diffusers' own pipeline writer. SD3's pipeline has two CLIP encoders where lightdiff trains one for
    both (nets/families/sd3.py), so its adapters are written for both."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline

    if len(pipeline_components(net)) > 1:
        if text_encoder is not None and has_adapters(text_encoder):
            raise ConfigError("model.lora.text_encoder=true: a pair of experts' export adapts the experts alone")
        return write_expert_lora_files(net, folder)[0]

    def layers_and_config(module: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return get_peft_model_state_dict(module, adapter_name=ADAPTER), module.peft_config[ADAPTER].to_dict()

    net_layers, net_config = layers_and_config(net)
    adapted_encoder = text_encoder is not None and has_adapters(text_encoder)
    encoder_layers, encoder_config = layers_and_config(text_encoder) if adapted_encoder else (None, None)
    if lora_prefix(net) == "unet":
        StableDiffusionPipeline.save_lora_weights(
            folder,
            unet_lora_layers=net_layers,
            unet_lora_adapter_metadata=net_config,
            text_encoder_lora_layers=encoder_layers,
            text_encoder_lora_adapter_metadata=encoder_config,
            weight_name=LORA_WEIGHTS_FILE,
        )
    else:
        StableDiffusion3Pipeline.save_lora_weights(
            folder,
            transformer_lora_layers=net_layers,
            transformer_lora_adapter_metadata=net_config,
            text_encoder_lora_layers=encoder_layers,
            text_encoder_lora_adapter_metadata=encoder_config,
            text_encoder_2_lora_layers=encoder_layers,
            text_encoder_2_lora_adapter_metadata=encoder_config,
            weight_name=LORA_WEIGHTS_FILE,
        )
    return folder / LORA_WEIGHTS_FILE


KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}  # kohya's name of each component's adapters


def kohya_state_dict(net: torch.nn.Module, text_encoder: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The adapters of a Stable Diffusion 1.x / 2.x or SDXL UNet (and of its CLIP text encoder, if it has any) in
    kohya's layout, as sd-scripts writes them and ComfyUI / AUTOMATIC1111 read them: `lora_unet_<module path, dots as
    underscores>.lora_down.weight` (peft's lora_A), `.lora_up.weight` (lora_B) and `.alpha` (the update is scaled by
    alpha / rank in both). kohya trains SD 1.x / 2.x on the diffusers UNet, so its module paths are diffusers' own;
    SDXL on the original UNet, so there they are the original names (nets/single_file.py). diffusers' reader of kohya
    files (`_convert_non_diffusers_lora_to_diffusers`, `_maybe_map_sgm_blocks_to_diffusers`) is the reverse, tested
    against it."""
    if lora_prefix(net) != "unet":
        raise ConfigError(
            f"export_format=kohya writes Stable Diffusion / SDXL UNet adapters; {type(net).__name__} is not a UNet: "
            "export the diffusers LoRA file instead"
        )
    sdxl = getattr(net.config, "addition_embed_type", None) == "text_time"
    original = {}
    if sdxl:  # module path -> the original UNet's (kohya's SDXL names)
        weights = [key.replace(".base_layer", "") for key in net.state_dict() if not is_adapter_key(key)]
        original = {
            k.rsplit(".", 1)[0]: v.rsplit(".", 1)[0] for k, v in original_unet_names(weights, dict(net.config)).items()
        }
    state: dict[str, torch.Tensor] = {}
    for component, module in (("unet", net), ("text_encoder", text_encoder)):
        if module is None or not has_adapters(module):
            continue
        config = module.peft_config[ADAPTER]
        if config.use_rslora or config.use_dora or config.rank_pattern or config.alpha_pattern:
            raise ConfigError("export_format=kohya: rsLoRA, DoRA or per-module ranks have no kohya layout")
        for key, tensor in get_peft_model_state_dict(module, adapter_name=ADAPTER).items():
            path, kind = key.rsplit(".lora_", 1)  # "down_blocks.0....to_q", "A.weight"
            if component == "text_encoder" and not path.startswith("text_model."):
                # kohya names CLIP's modules as CLIPTextModel had them (text_model.encoder...); newer transformers
                # versions dropped the text_model level
                path = f"text_model.{path}"
            name = KOHYA_PREFIXES[component] + original.get(path, path).replace(".", "_")
            state[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = tensor.detach().contiguous()
            state[f"{name}.alpha"] = torch.tensor(float(config.lora_alpha))
    if not state:
        raise ConfigError("export_format=kohya: the model has no LoRA adapters to write")
    return state


def comfyui_state_dicts(
    net: torch.nn.Module, original_name: Callable[[str], str]
) -> dict[str, dict[str, torch.Tensor]]:
    """Each adapted pipeline component's adapters (a pair of experts: each expert's) keyed as ComfyUI keys LoRA
    files for the model's original layout: `diffusion_model.<original layer name>.lora_down.weight` (peft's lora_A),
    `.lora_up.weight` (lora_B) and `.alpha` (both scale the update by alpha / rank)."""
    if not has_adapters(net):
        raise ConfigError("export_format=comfyui: the model has no LoRA adapters to write")
    config = net.peft_config[ADAPTER]
    if config.use_rslora or config.use_dora or config.rank_pattern or config.alpha_pattern:
        raise ConfigError(
            "export_format=comfyui: rsLoRA, DoRA or per-module ranks are written as diffusers' files only"
        )
    files: dict[str, dict[str, torch.Tensor]] = {}
    for component, state in adapter_states(net).items():
        part: dict[str, torch.Tensor] = {}
        for key, tensor in state.items():
            layer, kind = key.rsplit(".lora_", 1)  # "blocks.0.attn1.to_q", "A.weight"
            name = f"diffusion_model.{original_name(layer)}"
            part[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = tensor.detach().contiguous()
            part[f"{name}.alpha"] = torch.tensor(float(config.lora_alpha))
        files[component] = part
    return files


LoraPart = tuple[dict[str, torch.Tensor], dict[str, Any] | None]  # a component's tensors and LoraConfig, if given


def _read_lora_file(path: Path, prefix: str) -> dict[str, LoraPart]:
    """The file's adapters per component (`prefix`, the denoiser's, and `text_encoder`), with prefixes removed."""
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
    components = sorted({key.split(".")[0] for key in tensors})
    unknown = [name for name in components if name not in (prefix, "text_encoder", "text_encoder_2")]
    if unknown or prefix not in components:
        shown = ", ".join(components[:5]) + (f" and {len(components) - 5} more" if len(components) > 5 else "")
        raise ConfigError(
            f"lora={str(path)!r} holds adapters under {shown}; lightdiff applies diffusers' format: keys under the "
            f"denoiser's {prefix!r} (and optionally 'text_encoder'); convert other formats with diffusers first"
        )
    metadata = json.loads(header[LORA_METADATA_KEY]) if LORA_METADATA_KEY in header else None
    parts: dict[str, LoraPart] = {}
    for name in components:
        state = {key[len(name) + 1 :]: value for key, value in tensors.items() if key.startswith(name + ".")}
        if not any(".lora_A." in key for key in state):
            from diffusers.utils import convert_unet_state_dict_to_peft

            state = convert_unet_state_dict_to_peft(state)  # diffusers' older `lora.down` / `lora.up` names
        config = None
        if metadata is not None:  # the pipeline writer keys it by component: {"unet.r": 4, ...}
            config = {k[len(name) + 1 :]: v for k, v in metadata.items() if k.startswith(name + ".")} or None
        parts[name] = (state, config)
    second = parts.pop("text_encoder_2", None)  # SD3: lightdiff's one encoder stands for both
    if second is not None:
        first = parts.get("text_encoder")
        if (
            first is None
            or first[0].keys() != second[0].keys()
            or any(not torch.equal(first[0][key], second[0][key]) for key in first[0])
        ):
            raise ConfigError(
                f"lora={str(path)!r} adapts SD3's two CLIP encoders differently; lightdiff's SD3 uses one for both"
            )
    return parts


def meta_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of `module` whose parameters and buffers are on the meta device: its structure and shapes, no storage."""
    memo: dict[int, object] = {}
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        empty = torch.empty_like(tensor, device="meta")
        is_parameter = isinstance(tensor, torch.nn.Parameter)
        memo[id(tensor)] = torch.nn.Parameter(empty, requires_grad=tensor.requires_grad) if is_parameter else empty
    return copy.deepcopy(module, memo)


def _fitted_config(module: torch.nn.Module, state: dict[str, torch.Tensor], config: dict | None) -> LoraConfig:
    """The LoraConfig that makes `state` fit `module`, checked on a copy: a file made for another network names the
    keys that do not fit, before `module` changes."""
    if config is not None:
        lora = LoraConfig(**{k: v for k, v in config.items() if k in LoraConfig.__dataclass_fields__})
    else:  # no header: ranks from the shapes, alpha = rank (diffusers' reading of such files)
        from diffusers.utils.peft_utils import get_peft_kwargs

        ranks = {f"^{key}": value.shape[1] for key, value in state.items() if "lora_B" in key and value.ndim > 1}
        lora = LoraConfig(**get_peft_kwargs(ranks, None, state))
    names = set(_module_names(module))
    unknown = sorted({key.split(".lora_")[0] for key in state} - names)
    if unknown:
        raise ConfigError(
            f"was made for another network: {len(unknown)} of its modules are not in {type(module).__name__} "
            f"(e.g. {unknown[:3]})"
        )
    trial = meta_copy(module)  # the adapter shapes without a second copy of the weights (10 GB for an SDXL UNet)
    inject_adapter_in_model(lora, trial, adapter_name=ADAPTER)
    expected = get_peft_model_state_dict(trial, adapter_name=ADAPTER)
    wrong = [
        f"{key}: file {tuple(state[key].shape)}, network {tuple(expected[key].shape)}"
        for key in sorted(state)
        if key in expected and state[key].shape != expected[key].shape
    ]
    missing = sorted(set(expected) - set(state))
    if wrong or missing:
        detail = "; ".join(wrong[:3]) if wrong else f"no weights for {missing[:3]}"
        raise ConfigError(f"does not fit {type(module).__name__}: {detail}")
    return lora


def load_lora_file(net: torch.nn.Module, path: str | Path, text_encoder: torch.nn.Module | None = None) -> None:
    """Add the adapters of a diffusers-format LoRA file to `net` (and its text-encoder adapters to `text_encoder`):
    lightdiff's export or any other; a pair of experts reads a folder's file per expert (`LORA_FILES`). Every part is
    checked to fit before anything changes."""
    path = Path(path).expanduser()
    planned: list[tuple[torch.nn.Module, dict[str, torch.Tensor], LoraConfig]] = []
    for file, module in _lora_files(net, path).items():
        parts = _read_lora_file(file, lora_prefix(module))
        if "text_encoder" in parts and text_encoder is None:
            raise ConfigError(f"lora={str(file)!r} adapts a text encoder and this model has none")
        targets = {lora_prefix(module): module, "text_encoder": text_encoder}
        for name, (state, config) in parts.items():
            try:
                planned.append((targets[name], state, _fitted_config(targets[name], state, config)))
            except ConfigError as error:
                raise ConfigError(f"lora={str(file)!r} ({name}) {error}") from error
    for module, state, config in planned:
        add_adapters(module, config)
        set_peft_model_state_dict(module, state, adapter_name=ADAPTER)
        module.requires_grad_(False)


def _lora_files(net: torch.nn.Module, path: Path) -> dict[Path, torch.nn.Module]:
    """The LoRA file(s) at `path` and the network each adapts: `path` for one network; for a pair of experts, the
    folder's file of each expert that has one."""
    components = pipeline_components(net)
    if len(components) == 1:
        return {path: net}
    files = {path / LORA_FILES[name]: module for name, module in components.items()} if path.is_dir() else {}
    files = {file: module for file, module in files.items() if file.is_file()}
    if not files:
        names = ", ".join(LORA_FILES[name] for name in components)
        raise ConfigError(f"lora={str(path)!r}: a pair of experts reads a folder with a file per expert ({names})")
    return files
