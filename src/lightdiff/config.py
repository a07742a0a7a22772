"""Config checks that run before anything is written: missing values, unknown keys and wrong types.

Hydra reports unknown group options and unknown override keys itself. What it cannot see is a value that does
not fit the constructor it is meant for: `data.batch_size=abc`, `model.prediction_type=eps`. Every node with a
`_target_` is checked against the signature and type hints of its target, and the error names the key.
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf


def auto_precision() -> str:
    """`${lightdiff.auto_precision:}`: bf16-mixed on a GPU that supports bf16 (weights stay fp32), else 32-true."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def on_cuda() -> bool:
    """`${lightdiff.on_cuda:}`: whether a CUDA GPU is visible; the speed-path switches that are safe on a GPU and
    pointless or slower on a CPU (channels_last, fused AdamW, pinned memory) default to it."""
    import torch

    return torch.cuda.is_available()


def loader_workers() -> int:
    """`${lightdiff.loader_workers:}`: data-loader processes that keep GPUs fed: up to 8 per GPU, from the CPU cores
    (shared among the GPUs of the node); 0 without CUDA, where extra processes compete with training for the cores."""
    import os

    import torch

    if not torch.cuda.is_available():
        return 0
    return max(1, min(8, (os.cpu_count() or 1) // torch.cuda.device_count()))


def asset(name: str) -> str:
    """`${lightdiff.asset:NAME}`: the path of a file or folder shipped in the package (src/lightdiff/assets/NAME)."""
    from pathlib import Path

    path = Path(__file__).parent / "assets" / name
    if not path.exists():
        raise FileNotFoundError(f"lightdiff ships no asset {name!r} (looked for {path})")
    return str(path)


# The groups that describe the model; a method may leave some unused (turbo: the teacher's net, objective, schedule).
MODEL_GROUPS = ("net", "objective", "schedule", "optimizer", "discriminator")


def groups_used_by_model(root: DictConfig) -> set[str]:
    """The top-level groups the `model` node uses, directly or through another used group (objective=ddpm uses
    `schedule`; objective=flow_matching does not): a node uses group g where its key g holds the group's node
    (`model.net: ${net}`). Compared by value, so the answer is the same before and after the config is resolved."""
    used: set[str] = set()
    todo = [root.get("model")]
    while todo:
        node = todo.pop()
        if not isinstance(node, DictConfig):
            continue
        for group in MODEL_GROUPS:
            if group not in used and group in node and group in root and node[group] == root[group]:
                used.add(group)
                todo.append(root[group])
    return used


def unless_pretrained(pretrained: str | None, default: str) -> str | None:
    """`${lightdiff.unless_pretrained:${.pretrained},DEFAULT}`: DEFAULT (the shipped shapes VAE) when `model.pretrained`
    is unset, else None, so a pipeline brings its own VAE unless `model.vae` names another one on the command line
    (a UNet trained on one VAE's latents is ruined by another's)."""
    return default if pretrained is None else None


def shapes_video_vae(pretrained: str | None, net_target: str) -> str | None:
    """`${lightdiff.shapes_video_vae:${.pretrained},${net._target_}}`: model=video's default VAE: None with
    `model.pretrained` (the pipeline's own, as `unless_pretrained`), else the moving-shapes VAE shipped for the net's
    family (`Family.shapes_vae`: CogVideoX's 3-D VAE, Wan's), since a family learns one VAE's latents and its
    pipeline decodes with that VAE alone; a family without one must be given `model.vae`."""
    if pretrained is not None:
        return None
    from lightdiff.nets.families import FAMILIES

    class_name = net_target.rsplit(".", 1)[-1]
    names = {family.shapes_vae for family in FAMILIES if family.denoiser_class.__name__ == class_name}
    names.discard(None)
    if len(names) != 1:
        raise ConfigError(
            f"model.vae: lightdiff ships no moving-shapes VAE for net._target_={net_target}; give one (train one: "
            "python train.py model=autoencoder data=moving_shapes, then export it with sample.py export=DIR)"
        )
    return asset(names.pop())


def default_run_name(*, _root_: DictConfig) -> str:
    """`${lightdiff.default_run_name:}`: `<model>-<data>` from the group choices, then the schedule where the model
    uses one, the net when it is not the method's default and the objective when it is not ddpm
    (`pixel-shapes-linear-dit`, `pixel-shapes-flow_matching`), so `python train.py net=dit` after
    `python train.py` starts its own run instead of resuming the UNet's. Groups a method ignores never name it."""
    from hydra.core.hydra_config import HydraConfig

    choices = HydraConfig.get().runtime.choices
    used = groups_used_by_model(_root_)
    parts = [choices["model"], choices["data"]]
    if "schedule" in used:
        parts.append(choices["schedule"])
    if "net" in used and choices.get("net") not in (None, choices["model"]):
        parts.append(choices["net"])
    # (objective=cogvideox under schedule=cogvideox, as model=video picks them, is named once)
    if "objective" in used and choices.get("objective") not in (None, "ddpm", choices.get("schedule")):
        parts.append(choices["objective"])
    return "-".join(parts)


MAX_JOB_FOLDER_CHARS = 160  # a folder name may have 255 bytes; past this the name is shortened with a hash


def _multirun_job_overrides() -> str | None:
    """The job's overrides as one folder name (Hydra's `hydra.job.override_dirname`), or None outside a multirun."""
    import hashlib

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    # `/` in a value (data.root=/data/x) or a group override (metrics/features=...) would make nested folders.
    name = HydraConfig.get().job.override_dirname.replace("/", "_") or "defaults"
    if len(name) > MAX_JOB_FOLDER_CHARS:
        # Still a pure function of the overrides: a requeued job finds the same folder.
        name = f"{name[: MAX_JOB_FOLDER_CHARS - 13]}-{hashlib.sha1(name.encode()).hexdigest()[:12]}"
    return name


def sweep_job_path(base: str) -> str:
    """`${lightdiff.sweep_job_path:BASE}`: BASE in a single run; BASE/<the job's overrides> in a multirun job.

    Each job of `python train.py -m model.lr=1e-4,3e-4` gets its own run folder (`.../model.lr=1e-4`) and wandb
    name, named after its overrides alone, so the same command run again, or a requeued SLURM job, resumes it.
    """
    job = _multirun_job_overrides()
    return base if job is None else f"{base}/{job}"


def sweep_group() -> str | None:
    """`${lightdiff.sweep_group:}`: the name of the multirun's folder (`hydra.sweep.dir`), shared by all its jobs;
    None in a single run."""
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig

    if _multirun_job_overrides() is None:
        return None
    return Path(HydraConfig.get().sweep.dir).name


OmegaConf.register_new_resolver("lightdiff.auto_precision", auto_precision, replace=True)
OmegaConf.register_new_resolver("lightdiff.on_cuda", on_cuda, replace=True)
OmegaConf.register_new_resolver("lightdiff.loader_workers", loader_workers, replace=True)
OmegaConf.register_new_resolver("lightdiff.asset", asset, replace=True)
OmegaConf.register_new_resolver("lightdiff.unless_pretrained", unless_pretrained, replace=True)
OmegaConf.register_new_resolver("lightdiff.shapes_video_vae", shapes_video_vae, replace=True)
OmegaConf.register_new_resolver("lightdiff.default_run_name", default_run_name, replace=True)
OmegaConf.register_new_resolver("lightdiff.sweep_job_path", sweep_job_path, replace=True)
OmegaConf.register_new_resolver("lightdiff.sweep_group", sweep_group, replace=True)


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


@dataclass(frozen=True)
class Bound:
    """A range a number argument must lie in, checked with the types before anything is built or written
    (`lr: PositiveFloat`): torch's own error for `lr=-1` comes from inside `fit`, after the run folder is written,
    and names no key. NaN and infinities are never inside a bound."""

    minimum: float
    inclusive: bool = False  # False: the value must be above `minimum`

    def holds(self, value: float) -> bool:
        return math.isfinite(value) and (value >= self.minimum if self.inclusive else value > self.minimum)

    def __str__(self) -> str:
        return f"a finite number {'>=' if self.inclusive else '>'} {self.minimum:g}"


PositiveFloat = Annotated[float, Bound(0.0)]  # learning rates, scales
NonNegativeFloat = Annotated[float, Bound(0.0, inclusive=True)]  # loss weights (0: off)
PositiveInt = Annotated[int, Bound(1.0, inclusive=True)]  # counts and sizes
NonNegativeInt = Annotated[int, Bound(0.0, inclusive=True)]  # counts that may be 0 (loader processes)


def _matches(value: Any, hint: Any) -> bool | None:
    """True/False when the hint can be checked, None when it is too complex to judge (then it is not judged)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin is Annotated:
        base, *metadata = typing.get_args(hint)
        fits = _matches(value, base)
        bounds = [m for m in metadata if isinstance(m, Bound)]
        return fits if not fits or isinstance(value, bool) else all(b.holds(value) for b in bounds)
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin in (Union, types.UnionType):
        results = [_matches(value, arg) for arg in typing.get_args(hint)]
        return True if any(r is True for r in results) else (None if None in results else False)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (tuple, list, Sequence) or hint in (tuple, list):
        return isinstance(value, (list, tuple, ListConfig)) or None
    if origin in (dict, Mapping) or hint is dict:
        return isinstance(value, (dict, DictConfig)) or None
    return None


def _described(hint: Any) -> str:
    """A hint as the error shows it: `float, a finite number > 0` for PositiveFloat (Optional ones included)."""
    if typing.get_origin(hint) is Annotated:
        base, *metadata = typing.get_args(hint)
        return ", ".join([_described(base), *(str(m) for m in metadata if isinstance(m, Bound))])
    if typing.get_origin(hint) in (Union, types.UnionType):
        return " | ".join(_described(arg) for arg in typing.get_args(hint))
    return hint.__name__ if isinstance(hint, type) else str(hint)


def _signature_of(target: Callable) -> tuple[inspect.Signature, dict[str, Any]]:
    function = target.__init__ if inspect.isclass(target) else target
    signature = inspect.signature(function)
    try:
        hints = typing.get_type_hints(function, include_extras=True)  # extras: the `Bound`s of Annotated hints
    except Exception:  # third-party annotations that cannot be evaluated here: check names only
        hints = {}
    return signature, hints


def _check_node(node: DictConfig, path: str) -> None:
    target_name = node.get("_target_")
    try:
        target = get_object(target_name)
    except Exception as error:
        raise ConfigError(f"{path}._target_={target_name!r} cannot be imported: {error}") from error
    signature, hints = _signature_of(target)
    parameters = signature.parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    for key in node:
        if str(key).startswith("_"):
            continue
        key_path = f"{path}.{key}" if path else str(key)
        if key not in parameters:
            if not takes_any:
                known = ", ".join(name for name in parameters if name != "self")
                raise ConfigError(f"{key_path} is not an argument of {target_name}; it takes: {known}")
            continue
        value = node[key]
        if OmegaConf.is_config(value) and "_target_" in value:
            continue  # checked as a node of its own
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
        if key in hints and _matches(value, hints[key]) is False:
            raise ConfigError(f"{key_path}={value!r} does not fit {target_name}'s argument: {_described(hints[key])}")


def build(node: Any, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate`, but an error a constructor raises about its input (ConfigError, a bad value or file:
    ValueError, a missing file) surfaces as itself: Hydra wraps it in an InstantiationException whose message buries
    the key or file it names."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        cause = error.__cause__
        if isinstance(cause, (ValueError, FileNotFoundError)):
            raise cause from None
        raise


def check_config(cfg: DictConfig) -> None:
    """Resolve every interpolation (naming missing keys) and check every `_target_` node's arguments."""
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except Exception as error:
        raise ConfigError(f"config error: {error}") from error

    def walk(node: Any, path: str) -> None:
        if isinstance(node, DictConfig):
            if "_target_" in node:
                _check_node(node, path)
            for key in node:
                walk(node[key], f"{path}.{key}" if path else str(key))
        elif isinstance(node, ListConfig):
            for index, item in enumerate(node):
                walk(item, f"{path}[{index}]")

    walk(cfg, "")
