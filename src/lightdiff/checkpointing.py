"""Checkpoint files that are either complete or absent: write to a temporary file, fsync, then rename.

Every checkpoint a run writes goes through `AtomicCheckpointIO`, which also refuses to write NaN or infinite
tensors; a resume starts from the newest file that loads (`newest_loadable_checkpoint`), skipping damaged ones.
"""

from __future__ import annotations

import logging
import os
import tempfile
import zipfile
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

log = logging.getLogger(__name__)

# What a resume needs at the least: the weights, and the step that orders checkpoints.
REQUIRED_KEYS = ("state_dict", "global_step")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file."""


class NonFiniteError(RuntimeError):
    """A loss, gradient or tensor about to be checkpointed is NaN or infinite; the message says which."""


def save_atomically(data: Any, path: str | Path) -> None:
    """torch.save `data` to `path` so that the file is either complete or absent: a crash in the middle of the write
    leaves the previous file at `path` untouched and loadable."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            torch.save(data, handle)
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes 0600 files; these are ordinary files
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


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
    tensors = list(_floating_tensors(tree, name))
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


def checkpoint_problem(path: str | Path) -> str | None:
    """Why a resume cannot start from `path` (None when it can): loads as a resume does (weights_only) and every
    byte of it matches its checksum."""
    path = Path(path)
    return _read_step(path)[1] or _damaged_record(path)


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
        problem = _damaged_record(path)
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
