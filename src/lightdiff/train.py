"""The body of `python train.py`: check the config, build data, model, callbacks, loggers and trainer, fit.

Nothing is written before the whole config has been checked and every object built, so a config mistake never
leaves a half-made run folder. The run folder is `outputs/<run_name>/`; running the same run_name again resumes it.
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import WandbLogger

from lightdiff.checkpointing import AtomicCheckpointIO
from lightdiff.config import ConfigError, build, check_config

log = logging.getLogger(__name__)


def _resume_path(cfg: DictConfig, run_dir: Path) -> str | None:
    if cfg.ckpt_path:
        path = Path(cfg.ckpt_path).expanduser()
        if not path.is_file():
            raise ConfigError(f"ckpt_path={cfg.ckpt_path!r} is not a file")
        return str(path)
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file() and not cfg.resume:
        # Starting over would overwrite the run's checkpoints: refuse rather than lose them.
        raise ConfigError(f"resume=false but {run_dir} already holds checkpoints; pick another run_name")
    return str(last) if last.is_file() else None


def _write_config(cfg: DictConfig, run_dir: Path) -> None:
    """Save the resolved config; on resume, warn about every line that changed since the run began."""
    text = OmegaConf.to_yaml(cfg, resolve=True)
    path = run_dir / "config.yaml"
    if path.exists() and path.read_text() != text:
        changes = [
            line
            for line in difflib.unified_diff(path.read_text().splitlines(), text.splitlines(), lineterm="", n=0)
            if line[:1] in "+-" and not line.startswith(("+++", "---"))
        ]
        log.warning("the config differs from the one this run started with:\n%s", "\n".join(changes))
        path.rename(run_dir / "config.previous.yaml")
    path.write_text(text)


def run(cfg: DictConfig) -> pl.Trainer:
    check_config(cfg)
    run_dir = Path(cfg.run_dir)
    pl.seed_everything(cfg.seed, workers=True)

    datamodule = build(cfg.data)
    model = build(cfg.model)
    model.attach_data(datamodule)  # each method checks that its networks fit the data
    callbacks = [build(c) for c in (cfg.callbacks or {}).values() if c is not None]
    if cfg.get("metrics"):
        with torch.random.fork_rng(devices=[]):  # building a feature network must not shift training's random stream
            callbacks.append(build(cfg.metrics))
    ckpt_path = _resume_path(cfg, run_dir)

    # Everything is built: from here on files are written.
    run_dir.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(run_dir / "train.log")
    file_handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(file_handler)
    package_logger = logging.getLogger("lightdiff")
    if package_logger.getEffectiveLevel() > logging.INFO:
        package_logger.setLevel(logging.INFO)  # resumes, metrics and the run folder belong in train.log
    _write_config(cfg, run_dir)
    logger = build(cfg.logger) if cfg.logger is not None else False
    trainer: pl.Trainer = build(
        cfg.trainer, default_root_dir=str(run_dir), callbacks=callbacks, logger=logger, plugins=[AtomicCheckpointIO()]
    )
    if logger:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    if ckpt_path:
        log.info("resuming %s from %s", cfg.run_name, ckpt_path)
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
        # The last step is saved even when max_steps is not a multiple of the checkpoint interval.
        trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    finally:
        logging.getLogger().removeHandler(file_handler)
        file_handler.close()
        if isinstance(logger, WandbLogger):
            import wandb

            wandb.finish()  # sequential multirun jobs must not log into the previous job's run
    log.info("run folder: %s", run_dir)
    return trainer
