"""wandb that never blocks: online with credentials, offline (with the sync command) without, same run on resume;
and the metrics memory a sweep's objective is read from."""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import Any, Literal

from pytorch_lightning import Trainer
from pytorch_lightning.loggers import Logger, WandbLogger

from lightdiff.config import ConfigError

log = logging.getLogger(__name__)

RUN_ID_FILE = "wandb_run_id.txt"


def _has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc

        netrc_path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
        return netrc_path.exists() and any("wandb" in host for host in netrc.netrc(netrc_path).hosts)
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_logger(
    run_dir: str,  # the run folder: wandb files and the stored run id live here
    run_name: str,  # display name of the run
    project: str = "lightdiff",  # wandb project
    entity: str | None = None,  # wandb team or user; None uses the default of the credentials
    group: str | None = None,  # wandb group (sweeps put all their runs in one)
    tags: list[str] | None = None,  # wandb tags
    mode: Literal["auto", "online", "offline"] = "auto",  # auto: online when credentials exist, else offline
) -> WandbLogger:
    """A WandbLogger whose run id is stored in the run folder before training, so a resumed run continues it."""
    folder = Path(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    id_file = folder / RUN_ID_FILE
    if id_file.exists():
        run_id = id_file.read_text().strip()
    else:
        run_id = uuid.uuid4().hex[:8]  # wandb's id alphabet: lowercase letters and digits
        id_file.write_text(run_id + "\n")
    environment_mode = os.environ.get("WANDB_MODE")
    offline = (
        mode == "offline"
        or environment_mode in ("offline", "dryrun")
        or (mode == "auto" and environment_mode != "online" and not _has_wandb_credentials())
    )
    if offline:
        log.warning(
            "wandb runs offline (no credentials found; `wandb login` or WANDB_API_KEY to log online). "
            "Upload later with: wandb sync %s/wandb/offline-run-*-%s",
            folder,
            run_id,
        )
    return WandbLogger(
        name=run_name,
        save_dir=str(folder),
        project=project,
        entity=entity,
        group=group,
        tags=tags,
        id=run_id,
        resume="allow",
        offline=offline,
        log_model=False,  # checkpoints stay in the run folder; uploading them is the user's choice
    )


class LatestMetrics(Logger):
    """Keeps the last value of every metric logged. The sample and FID callbacks log `final/shapes_*` and `val/fid`
    through the loggers only, not into `trainer.callback_metrics`; a sweep's objective is read back from here."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[str, float] = {}

    @property
    def name(self) -> str:
        return "latest_metrics"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.update({key: float(value) for key, value in metrics.items()})

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


def objective(trainer: Trainer, key: str) -> float | None:
    """The value of metric `key` (`optimize_metric`) at the end of training, for a sweeper; None on ranks other
    than 0, which log nothing (a launcher reads rank 0's return value)."""
    if trainer.global_rank != 0:
        return None
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    for logger in trainer.loggers:
        if isinstance(logger, LatestMetrics):
            metrics.update(logger.metrics)
    if key not in metrics:
        raise ConfigError(
            f"optimize_metric={key!r} was not logged by this run (at step {trainer.global_step}); "
            f"logged metrics: {', '.join(sorted(metrics)) or 'none'}"
        )
    return metrics[key]
