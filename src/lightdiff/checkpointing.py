"""Checkpoint files: written whole (`AtomicCheckpointIO`, through `lightdiff.files.save_atomically`), checked
(`checkpoint_problem`), chosen on resume, and fitted to a model.

Every checkpoint a run writes goes through `AtomicCheckpointIO`, which also refuses to write NaN or infinite
tensors; a resume starts from the newest file that loads (`newest_loadable_checkpoint`), skipping damaged ones.
"""

from __future__ import annotations

import logging
import zipfile
from collections import defaultdict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy

from lightdiff.config import ConfigError
from lightdiff.files import save_atomically
from lightdiff.nets.lora import is_adapter_key

log = logging.getLogger(__name__)

# What a resume needs at the least: the weights, and the step that orders checkpoints.
REQUIRED_KEYS = ("state_dict", "global_step")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file."""


class NonFiniteError(RuntimeError):
    """A loss, gradient or tensor about to be checkpointed is NaN or infinite; the message says which."""


# The parts of a Lightning checkpoint that training updates: the weights, the optimiser's moments, and callback
# state such as the EMA weights.
TRAINED_KEYS = ("state_dict", "optimizer_states", "callbacks")
# ModelCheckpoint's scores, which start at +-inf by design: metric values, not trained tensors.
SCORE_KEYS = frozenset({"best_model_score", "current_score", "kth_value", "best_k_models"})


def _floating_tensors(tree: Any, name: str) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point() or tree.is_complex():
            yield name, tree
    elif isinstance(tree, dict):
        for key, value in tree.items():
            if key not in SCORE_KEYS:
                yield from _floating_tensors(value, f"{name}[{key!r}]")
    elif isinstance(tree, (list, tuple)):
        for index, value in enumerate(tree):
            yield from _floating_tensors(value, f"{name}[{index}]")


def first_nonfinite(tree: Any, name: str = "checkpoint") -> str | None:
    """The name, e.g. `checkpoint['state_dict']['net.conv_in.weight']`, of the first floating-point tensor in `tree`
    (nested dicts, lists, tuples) that holds a NaN or an infinity; None when all are finite."""
    return _first_nonfinite_of(list(_floating_tensors(tree, name)))


def _first_nonfinite_of(tensors: list[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first of the named `tensors` that holds a NaN or an infinity; None when all are finite."""
    by_device: dict[torch.device, list[int]] = defaultdict(list)
    for index, (_, tensor) in enumerate(tensors):
        by_device[tensor.device].append(index)
    bad: list[int] = []
    for indices in by_device.values():
        # One device-to-host copy per device, not one per tensor: this runs on every save of a large model.
        finite = torch.stack([torch.isfinite(tensors[i][1]).all() for i in indices]).tolist()
        bad += [i for i, ok in zip(indices, finite) if not ok]
    return tensors[min(bad)][0] if bad else None


def _reason(error: BaseException) -> str:
    first_line = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first_line[:200]}"


def _read_step(path: Path) -> tuple[int, str | None]:
    """(global step, None) when the archive's index and pickle load and hold a checkpoint; (-1, the reason) if not.

    Cheap whatever the file's size: the tensors are memory-mapped, not read.
    """
    try:
        if not zipfile.is_zipfile(path):  # torch.save's archive ends with its index: a cut-off file has none
            size = path.stat().st_size
            return -1, f"not a complete checkpoint archive ({size} bytes): truncated, or not a checkpoint"
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # unreadable files, refused pickles, damaged indexes
        return -1, _reason(error)
    if not isinstance(checkpoint, dict):
        return -1, f"holds a {type(checkpoint).__name__}, not a checkpoint dict"
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        return -1, f"has no {', '.join(missing)}"
    return int(checkpoint["global_step"]), None


def _damaged_record(path: Path) -> str | None:
    """Every record of the archive read back against the CRC-32 torch.save stored with it: catches what the index
    cannot, such as a block of zeros in the middle of the tensors (one sequential read of the file)."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except Exception as error:
        return _reason(error)
    return f"record {bad} fails its CRC-32 check" if bad is not None else None


def _nonfinite_record(path: Path) -> str | None:
    """The trained tensor of the checkpoint holding NaN or infinity, if any: lightdiff never writes one
    (`AtomicCheckpointIO`), so it came from elsewhere, and training on from it would only skip NaN steps."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        return _reason(error)
    bad = first_nonfinite({key: checkpoint[key] for key in TRAINED_KEYS if key in checkpoint})
    return f"{bad} holds NaN or infinite values" if bad is not None else None


def checkpoint_problem(path: str | Path, check_finite: bool = True) -> str | None:
    """Why a resume cannot start from `path` (None when it can): loads as a resume does (weights_only), every byte
    of it matches its checksum, and (`check_finite`; a file this process just wrote was checked before the write)
    its weights, EMA and optimiser state are finite."""
    path = Path(path)
    return _read_step(path)[1] or _damaged_record(path) or (_nonfinite_record(path) if check_finite else None)


def newest_loadable_checkpoint(folder: str | Path) -> Path | None:
    """The `*.ckpt` in `folder` with the highest global step that loads (on a tie last.ckpt, then the newest file).

    Each damaged file is skipped with a warning naming it and the reason. None when `folder` holds no
    checkpoint; CheckpointError when it holds only damaged ones: starting over would overwrite them.
    """
    paths = sorted(Path(folder).glob("*.ckpt"))
    if not paths:
        return None
    candidates: list[tuple[int, bool, float, Path]] = []
    problems: list[tuple[Path, str]] = []
    for path in paths:
        step, problem = _read_step(path)
        if problem is None:
            candidates.append((step, path.name == "last.ckpt", path.stat().st_mtime, path))
        else:
            problems.append((path, problem))
    chosen = None
    # Checksums are read newest first, up to the first file that passes: older files are not needed.
    for *_, path in sorted(candidates, key=lambda candidate: candidate[:3], reverse=True):
        problem = _damaged_record(path) or _nonfinite_record(path)
        if problem is None:
            chosen = path
            break
        problems.append((path, problem))
    if chosen is None:
        raise CheckpointError(
            f"no checkpoint in {folder} can be loaded:\n  "
            + "\n  ".join(f"{path}: {problem}" for path, problem in problems)
            + "\nmove them away to start the run over, or resume from another file with ckpt_path=..."
        )
    for path, problem in problems:
        log.warning("skipping checkpoint %s: it cannot be loaded (%s)", path, problem)
    return chosen


class AtomicCheckpointIO(TorchCheckpointIO):
    """A crash in the middle of a save leaves the previous file at the same path untouched and loadable, and a
    checkpoint holding a NaN or infinite tensor (weights, EMA, optimiser state) is never written."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        # Here, not in a callback: every write (ModelCheckpoint's, the final one in train.py) passes this point.
        bad = first_nonfinite({key: checkpoint[key] for key in TRAINED_KEYS if key in checkpoint})
        if bad is not None:
            raise NonFiniteError(f"refusing to write checkpoint {path}: {bad} holds NaN or infinite values")
        save_atomically(checkpoint, path)

    def load_checkpoint(
        self, path: str | Path, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        # Tensors and plain data only: a checkpoint never needs to execute code to load.
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


def plain_config(config: Any) -> dict[str, Any]:
    """A diffusers config without its private keys, for a checkpoint's plain-data `lightdiff` block."""
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


CHECKPOINT_FORMAT = 2  # 2: objective and conditioning as their own states; 1 (still read): schedule, text encoder


def format_problem(checkpoint: Mapping[str, Any]) -> str | None:
    """Why this code cannot read a checkpoint's `lightdiff` block (None when it can): written by a newer lightdiff
    (its layout is unknown here: guessing could load weights into the wrong places), or a format that is no version.
    Older formats are read (`trained.py` and the methods migrate format 1)."""
    meta = checkpoint.get("lightdiff")
    if not isinstance(meta, Mapping):
        return None  # not a lightdiff checkpoint: said by whoever needs the block
    version = meta.get("format", 1)  # format 1 had no such key at first
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        return f"lightdiff.format={version!r} is not a checkpoint format version (1 to {CHECKPOINT_FORMAT})"
    if version > CHECKPOINT_FORMAT:
        return (
            f"it was written by a newer lightdiff (checkpoint format {version}; this version reads formats 1 to "
            f"{CHECKPOINT_FORMAT}): upgrade lightdiff to read it"
        )
    return None


def nonfinite_weight(module: torch.nn.Module, prefix: str) -> str | None:
    """`prefix.name` of the first floating-point tensor of `module`'s state dict holding NaN or infinity; None if
    none does. For weights about to be used (sampled, exported, trained on), named before anything is written."""
    weights = module.state_dict().items()  # a text family's tokenizer rides along as plain extra state
    named = [(f"{prefix}.{name}", t) for name, t in weights if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return _first_nonfinite_of(named)


def denoiser_metadata(
    method: str,  # the method's name (diffusion, turbo)
    net: torch.nn.Module,  # the trained denoiser (a diffusers model)
    objective: Any,  # lightdiff.diffusion.Objective
    conditioning: Any,  # lightdiff.nets.families.Conditioning
    vae: torch.nn.Module | None,  # the frozen AutoencoderKL of a latent model
    class_names: list[str] | None,
    lora: dict[str, Any] | None = None,  # LoRA adapters' config and base (`lightdiff.nets.lora.adapt`), if any
    image_size: int | None = None,  # the side in pixels it trained at: sample.py's default for a net without one
    num_frames: int | None = None,  # frames per clip it trained on (a video model): sample.py's default
) -> dict[str, Any]:
    """A denoiser's plain-data `lightdiff` block: what `lightdiff.trained.load_trained` rebuilds it from, without the
    method's class or config (network class from an allow-list, configs, objective and conditioning states)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "method": method,
        "net_class": type(net).__name__,
        "net_config": plain_config(net.config),
        "objective": objective.state(),
        "conditioning": conditioning.state(),
        "vae_config": plain_config(vae.config) if vae is not None else None,
        "vae_class": type(vae).__name__ if vae is not None else None,
        "class_names": class_names,
        "lora": lora,
        "image_size": [image_size, image_size] if image_size else None,
        "num_frames": num_frames,
    }


def adapter_weights(state_dict: dict[str, Any]) -> dict[str, Any]:
    """The LoRA adapters' entries of a state dict: all an adapter checkpoint holds of the networks."""
    return {key: value for key, value in state_dict.items() if is_adapter_key(key)}


def keep_only_adapters(checkpoint: dict[str, Any], prefix: str = "net.") -> None:
    """Of the network under `prefix`, a checkpoint keeps the LoRA adapters alone: its base is reloaded from its source
    (a LoRA student's teacher, a fine-tune's base) and checked by fingerprint there."""
    state = checkpoint["state_dict"]
    checkpoint["state_dict"] = {k: v for k, v in state.items() if not k.startswith(prefix) or is_adapter_key(k)}


def check_adapter_checkpoint(module: pl.LightningModule, checkpoint: dict[str, Any], lora: dict[str, Any]) -> None:
    """For `on_load_checkpoint` of a method with adapters: the file must hold adapters of the same shapes made on
    the same base weights (its fingerprint), else resuming would add them to a network they were not trained on."""
    recorded = (checkpoint.get("lightdiff") or {}).get("lora")
    if not recorded:
        raise ConfigError(
            "the checkpoint holds no LoRA adapters (trained without model.lora.rank): resume it without model.lora"
        )
    recorded_encoder, encoder = recorded.get("text_encoder") or {}, lora.get("text_encoder") or {}
    if recorded_encoder and encoder and recorded_encoder["fingerprint"] != encoder["fingerprint"]:
        raise ConfigError(
            f"the checkpoint's text-encoder adapters belong to another encoder than {lora['base']['source']!r}'s"
        )
    if recorded["base"]["fingerprint"] != lora["base"]["fingerprint"]:
        raise ConfigError(
            f"the checkpoint's adapters were trained on the base {recorded['base']['source']!r} (weights "
            f"{recorded['base']['fingerprint'][:12]}), this run's base {lora['base']['source']!r} has other weights "
            f"({lora['base']['fingerprint'][:12]})"
        )
    # The adapters under `net.` and `conditioning.` (a turbo student's network is the teacher's too, under other names)
    owned = ("net.", "conditioning.")
    expected = {k: v for k, v in adapter_weights(module.state_dict()).items() if k.startswith(owned)}
    saved = {k: v for k, v in adapter_weights(checkpoint.get("state_dict") or {}).items() if k.startswith(owned)}
    check_state_dict(expected, saved, "the checkpoint")


# ----- weights that do not fit: refused before any tensor is copied, naming the keys and shapes -----------------
# torch's own `load_state_dict` error comes from deep inside a resume or an export, after other state has been
# restored, and does not say what to do. A checkpoint from another `net` or `model` config is a user mistake, so
# every missing, unexpected and differently shaped parameter is named.

_SHOWN = 8  # keys listed per kind of mismatch; the rest are counted, so a whole-network mismatch stays readable


def _shape(value: Any) -> tuple[int, ...] | str:
    shape = getattr(value, "shape", None)
    return tuple(shape) if shape is not None else type(value).__name__  # a crafted file may hold a non-tensor


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else "")


def state_dict_mismatches(
    expected: Mapping[str, Any],  # the model's own state dict (what the weights must fit)
    found: Mapping[str, Any],  # the checkpoint's weights for the same model
    may_be_missing: tuple[str, ...] = (),  # key prefixes the checkpoint leaves out on purpose (turbo's teacher)
) -> list[str]:
    """One line per kind of mismatch (shape, missing, unexpected); empty when the weights fit."""
    shapes = [
        f"{key}: checkpoint {_shape(found[key])} vs model {_shape(value)}"
        for key, value in expected.items()
        if key in found and _shape(found[key]) != _shape(value)
    ]
    missing = [key for key in expected if key not in found and not key.startswith(may_be_missing)]
    unexpected = [key for key in found if key not in expected]
    problems = []
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): {_listed(shapes)}")
    if missing:
        problems.append(f"{len(missing)} key(s) missing from the checkpoint: {_listed(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) in the checkpoint: {_listed(unexpected)}")
    return problems


def check_state_dict(
    expected: Mapping[str, Any],  # the model's own state dict
    found: Mapping[str, Any],  # the checkpoint's weights
    source: str,  # what the weights came from, for the message (a file, "checkpoint file.ckpt (vae.)")
    may_be_missing: tuple[str, ...] = (),  # key prefixes the checkpoint leaves out on purpose
) -> None:
    problems = state_dict_mismatches(expected, found, may_be_missing)
    if problems:
        raise ValueError(
            f"{source} does not fit the model (was it made with another net / model config?): " + "; ".join(problems)
        )


def load_weights(module: torch.nn.Module, weights: Mapping[str, Any], source: str) -> None:
    """`module.load_state_dict(weights)`, after a check whose error names every key that does not fit."""
    check_state_dict(module.state_dict(), weights, source)
    module.load_state_dict(weights)


def check_checkpoint_fits(
    module: pl.LightningModule,  # the module being resumed, built from this run's config
    checkpoint: dict[str, Any],  # what Lightning read from the file
    may_be_missing: tuple[str, ...] = (),  # key prefixes the module leaves out of its checkpoints
) -> None:
    """For a LightningModule's `on_load_checkpoint`: the checkpoint's state dict must fit the module. Lightning
    calls the hook before it loads the weights, so this error comes first."""
    weights = checkpoint.get("state_dict")
    if weights is None:  # a sharded checkpoint: the strategy loads (and checks) the shards itself
        return
    source = "the checkpoint"
    try:
        trainer = module.trainer
    except RuntimeError:  # not attached to a Trainer (e.g. LightningModule.load_from_checkpoint)
        trainer = None
    if trainer is not None:
        # FSDP / DeepSpeed shard or wrap the networks: the module's own state dict is not what the checkpoint holds.
        strategy = trainer.strategy
        if isinstance(strategy, DeepSpeedStrategy) or not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
            return
        source = f"checkpoint {trainer.ckpt_path}" if trainer.ckpt_path else source
    check_state_dict(module.state_dict(), weights, source, may_be_missing)
