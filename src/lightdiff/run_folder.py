"""A run folder has one owner, and its configs are never lost.

- `RunFolderLock`: `outputs/<run>/.lock`, made with O_EXCL before a run writes anything, holding the owner's host,
  pid and start time. A second run on the same folder (the same command started twice, a sweep that repeats a
  point) is refused naming the owner; a lock whose process is gone (a kill -9, a node reboot) on this host is taken
  over with a warning. O_EXCL on a plain file, not `flock`: it also holds between hosts on a shared file system,
  where a lock from another host is never judged stale (its process cannot be seen from here).
- `record_config`: `config.yaml` is the config of the newest start, written atomically; `configs/NNN.yaml` keeps
  every different config the run started with, oldest first, each written once and never rewritten. Called only
  once every check has passed, so a refused resume changes nothing.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from lightdiff.config import ConfigError
from lightdiff.files import pid_alive, write_text_atomically

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
HISTORY_FOLDER = "configs"
HALF_WRITTEN_SECONDS = 10.0  # an empty lock younger than this may be another run still writing its owner


def _process_start(pid: int) -> str | None:
    """When process `pid` started, in clock ticks since boot (/proc/PID/stat field 22): tells a reused pid from the
    lock's owner. None where /proc is not there (macOS) or the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # fields after the command name, which may hold spaces


def _alive(owner: dict[str, Any]) -> bool:
    """Whether the lock's owner (on this host) still runs: its pid exists and, where known, started when it did."""
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0 or not pid_alive(pid):
        return False
    started = owner.get("process_start")
    return started is None or _process_start(pid) in (None, started)


def _describe(owner: dict[str, Any]) -> str:
    started = owner.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {owner.get('pid')} on {owner.get('host')}, started {when}"


class RunFolderLock:
    """Exclusive ownership of one run folder for the life of a run: `acquire` once every check has passed, `release`
    in a `finally`."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.owner = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "process_start": _process_start(os.getpid()),
            "started": time.time(),
        }
        self.held = False

    def _read_owner(self) -> dict[str, Any] | None:
        try:
            owner = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # half-written: a process killed between open and write, or one writing now
            return {}
        return owner if isinstance(owner, dict) else {}

    def _stale(self, owner: dict[str, Any]) -> bool:
        """A lock nobody holds any more: its process on this host is gone, or it is empty or unreadable for longer
        than a run takes to write it (an empty one may be a run between its O_EXCL and its write)."""
        if not owner:
            try:
                return time.time() - self.path.stat().st_mtime > HALF_WRITTEN_SECONDS
            except FileNotFoundError:
                return True
        return owner.get("host") == self.owner["host"] and not _alive(owner)

    def refusal(self) -> str | None:
        """Why this folder cannot be taken now (None when it can): checked early, before the networks are built."""
        owner = self._read_owner()
        if owner is None or self._stale(owner):
            return None
        who = _describe(owner) if owner else "still writing its lock"
        return (
            f"run folder {self.run_dir} is in use by another run ({who}; lock file {self.path}). Two runs in one "
            "folder overwrite each other's checkpoints and config: wait for it, pick another run_name, or if that run "
            f"is gone (a process on another host that no longer runs), delete {self.path}"
        )

    def acquire(self) -> None:
        """Take the folder or raise ConfigError naming its owner; a stale lock is taken over with a warning."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a stale lock removed between two runs taking it over: one of them wins the O_EXCL
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._read_owner()
                if owner is None:
                    continue  # released in the meantime
                if not self._stale(owner):
                    raise ConfigError(self.refusal() or f"run folder {self.run_dir} is locked ({self.path})") from None
                log.warning(
                    "taking over %s: its run (%s) no longer runs (killed, or its node rebooted)",
                    self.path,
                    _describe(owner) if owner else "unreadable lock",
                )
                self.path.unlink(missing_ok=True)
                continue
            try:
                with os.fdopen(descriptor, "w") as handle:
                    handle.write(json.dumps(self.owner) + "\n")
                    handle.flush()
                    os.fsync(handle.fileno())
            except BaseException:  # a full disk: no half-written lock left to block the next start
                self.path.unlink(missing_ok=True)
                raise
            self.held = True
            return
        raise ConfigError(f"could not take {self.path}: other runs keep taking it")

    def release(self) -> None:
        if self.held:
            if self._read_owner() == self.owner:  # never remove a lock another run took over
                self.path.unlink(missing_ok=True)
            self.held = False


def config_history(run_dir: Path) -> list[Path]:
    """The run's configs, oldest first (`configs/000.yaml`, ...)."""
    return sorted((run_dir / HISTORY_FOLDER).glob("[0-9][0-9][0-9].yaml"))


def _adopt_legacy_configs(run_dir: Path) -> None:
    """A run folder from before the history: its config.previous.yaml (older) and config.yaml become 000, 001."""
    history = run_dir / HISTORY_FOLDER
    if history.exists():
        return
    legacy = [run_dir / name for name in ("config.previous.yaml", "config.yaml") if (run_dir / name).is_file()]
    if not legacy:
        return
    history.mkdir()
    for index, path in enumerate(legacy):
        write_text_atomically(history / f"{index:03d}.yaml", path.read_text())
    (run_dir / "config.previous.yaml").unlink(missing_ok=True)


def record_config(run_dir: Path, text: str) -> None:
    """Make `text` (the resolved config) the run's config.yaml, and append it to configs/ if it differs from the
    newest one there; on a resume, the lines that changed since the previous start are logged."""
    _adopt_legacy_configs(run_dir)
    history = config_history(run_dir)
    newest = history[-1].read_text() if history else None
    if newest != text:
        if newest is not None:
            changes = [
                line
                for line in difflib.unified_diff(newest.splitlines(), text.splitlines(), lineterm="", n=0)
                if line[:1] in "+-" and not line.startswith(("+++", "---"))
            ]
            log.warning("the config differs from the previous start's (%s):\n%s", history[-1].name, "\n".join(changes))
        (run_dir / HISTORY_FOLDER).mkdir(exist_ok=True)
        number = int(history[-1].stem) + 1 if history else 0
        write_text_atomically(run_dir / HISTORY_FOLDER / f"{number:03d}.yaml", text)
    write_text_atomically(run_dir / "config.yaml", text)
