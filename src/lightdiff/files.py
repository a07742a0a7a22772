"""Files and folders that are either complete or absent, and fingerprints of networks: the small layer every
writer uses (checkpoints, sample and export folders, latent caches, run configs), below the networks and the data.

A file is written to a temporary file beside it, flushed, then renamed over it; a folder is built beside its target
and swapped in. What a killed process leaves (`.NAME.*.tmp`, `.NAME.partial-<pid>-*`) is recognised and removed later.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


TEMPORARY_SUFFIX = ".tmp"  # save_atomically's partial files: `.NAME.<random>.tmp` beside NAME


class _WriteErrorRecorder:
    """The file object torch.save writes through: keeps the operating system's error of a failed write, which
    torch.save replaces with its own (`RuntimeError: [enforce fail at inline_container.cc] . unexpected pos`)."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.handle.flush()


def save_atomically(data: Any, path: str | Path) -> None:
    """torch.save `data` to `path` so that the file is either complete or absent: a crash in the middle of the write
    leaves the previous file at `path` untouched and loadable. A full disk (or a file size limit) is an OSError that
    names the file and says the previous one is intact; the partial temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX)
    recorder: _WriteErrorRecorder | None = None
    try:
        with os.fdopen(descriptor, "wb") as handle:
            recorder = _WriteErrorRecorder(handle)
            torch.save(data, recorder)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes 0600 files; these are ordinary files
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        cause = recorder.error if recorder is not None and recorder.error is not None else error
        if isinstance(cause, OSError) and cause.errno is not None:
            previous = f"the previous checkpoint {path} is intact" if path.exists() else f"no earlier {path} existed"
            raise OSError(
                cause.errno, f"{os.strerror(cause.errno)} while writing {path}; {previous} (partial file removed)"
            ) from error
        raise


def remove_orphaned_temporaries(folder: str | Path) -> list[Path]:
    """Delete the partial files `save_atomically` leaves when its process is killed mid-write (`.NAME.*.tmp`; a
    kill -9 gives it no chance to clean up). Called once a run has passed its checks, before training writes again;
    returns what was removed."""
    removed = []
    for path in sorted(Path(folder).glob(f".*.ckpt.*{TEMPORARY_SUFFIX}")):
        path.unlink(missing_ok=True)
        removed.append(path)
        log.warning("removed %s, a partial checkpoint left by a process killed while saving", path)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        pass
    return True


def owned_prefix(prefix: str) -> str:
    """`prefix` plus this process's pid: the name of a temporary folder `remove_stale_folders` can judge later."""
    return f"{prefix}{os.getpid()}-"


def _left_by_a_dead_process(path: Path, prefix: str) -> bool:
    """Whether `path`, named `<prefix><pid>-...` (`owned_prefix`), belongs to a process that no longer runs; a name
    without a pid (an older lightdiff's) is never judged."""
    owner = path.name[len(prefix) :].split("-", 1)[0]
    return owner.isdigit() and int(owner) != os.getpid() and not pid_alive(int(owner))


def remove_stale_folders(parent: Path, prefix: str) -> list[Path]:
    """Delete the folders `parent/<prefix><pid>-*` whose process no longer runs (killed with -9, which leaves no
    chance to clean up); those of live processes are theirs. Returns what was removed."""
    removed = []
    for path in sorted(parent.glob(f"{prefix}*")):
        if path.is_dir() and _left_by_a_dead_process(path, prefix):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _recover_interrupted_replace(folder: Path) -> None:
    """A process killed between the two renames of `folder_written_atomically` left the previous contents in
    `.NAME.old-<pid>-*/NAME` and no `folder`: put them back; other leftovers of dead processes are deleted."""
    for old in sorted(folder.parent.glob(f".{folder.name}.old-*")):
        if not _left_by_a_dead_process(old, f".{folder.name}.old-"):
            continue
        if not folder.exists() and (old / folder.name).is_dir():
            os.rename(old / folder.name, folder)
            log.warning("restored %s from %s, left by a process killed while replacing it", folder, old)
        shutil.rmtree(old, ignore_errors=True)
    for stale in remove_stale_folders(folder.parent, f".{folder.name}.partial-"):
        log.warning("removed %s, a partial output left by a killed process", stale)


@contextmanager
def folder_written_atomically(folder: str | Path) -> Iterator[Path]:
    """Yields an empty folder beside `folder` to write into; once the block completes it replaces `folder` (whose
    old contents are then deleted), and if the block raises it is deleted and `folder` is left as it was. So an
    output folder never holds a mix of two runs' files, and a refused or failed command never empties one. What a
    killed process left beside `folder` (`.NAME.partial-<pid>-*`, `.NAME.old-<pid>-*`) is cleaned up first."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    _recover_interrupted_replace(folder)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=owned_prefix(f".{folder.name}.partial-")))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes 0700 folders; this is an ordinary one
    if not folder.exists():
        os.rename(staging, folder)
        return
    old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=owned_prefix(f".{folder.name}.old-")))
    os.rename(folder, old / folder.name)  # the previous contents stay whole until the new ones are in place
    os.rename(staging, folder)
    shutil.rmtree(old)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def write_text_atomically(path: Path, text: str) -> None:
    """`text` into `path`, complete or not at all: a full disk leaves the previous file as it was."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


# Config keys that say where and by which library version a network was loaded, not what it is: the same VAE read
# from a pipeline folder and from its vae/ folder, or on another machine, must have one fingerprint (shards written
# on one machine are trained on by another).
LOCATION_KEYS = frozenset(
    {"_name_or_path", "name_or_path", "_commit_hash", "_diffusers_version", "transformers_version"}
)


def module_fingerprint(config: dict[str, Any], module: torch.nn.Module) -> str:
    """Hash of a network's config (less where it was loaded from) and weights."""
    identity = {key: value for key, value in config.items() if key not in LOCATION_KEYS}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
