"""The body of `python train.py`: check the config, build data, model, callbacks, loggers and trainer, fit.

Nothing is written before the whole config has been checked and every object built, so a config mistake never
leaves a half-made run folder. The run folder is `outputs/<run_name>/`; running the same run_name again resumes it.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from pytorch_lightning.callbacks import ProgressBar
from pytorch_lightning.loggers import Logger, WandbLogger
from pytorch_lightning.plugins.environments import SLURMEnvironment
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from lightdiff.callbacks.checkpoint import FinalCheckpoint
from lightdiff.callbacks.preemption import Preempted
from lightdiff.checkpointing import AtomicCheckpointIO, checkpoint_problem, format_problem, newest_loadable_checkpoint
from lightdiff.config import MODEL_GROUPS, ConfigError, build, check_config, groups_used_by_model
from lightdiff.contract import LatentCaching, NamesPartSources
from lightdiff.data import ImageDataModule
from lightdiff.files import remove_orphaned_temporaries
from lightdiff.loggers import LatestMetrics
from lightdiff.nets.summary import components, summary_table
from lightdiff.run_folder import RunFolderLock, record_config

log = logging.getLogger(__name__)


MAX_TRAINING_SEED = 2**32 - 1  # numpy's and so Lightning's seed_everything's largest seed


def _resume_path(cfg: DictConfig, run_dir: Path) -> str | None:
    if cfg.ckpt_path:
        path = Path(cfg.ckpt_path).expanduser()
        if not path.is_file():
            raise ConfigError(f"ckpt_path={cfg.ckpt_path!r} is not a file")
        problem = checkpoint_problem(path)
        if problem is not None:  # a file asked for by name: an error, never a silent fallback to another one
            raise ConfigError(f"ckpt_path={cfg.ckpt_path!r} cannot be loaded: {problem}")
        return str(path)
    folder = run_dir / "checkpoints"
    if not cfg.resume and any(folder.glob("*.ckpt")):
        # Starting over would overwrite the run's checkpoints: refuse rather than lose them.
        raise ConfigError(f"resume=false but {run_dir} already holds checkpoints; pick another run_name")
    # The newest checkpoint that loads: a last.ckpt damaged by a crash or a full disk falls back to the newest
    # step checkpoint (with a warning naming it); a folder of only damaged files is an error, not a fresh start.
    path = newest_loadable_checkpoint(folder)
    return str(path) if path is not None else None


def _check_launch(cfg: DictConfig) -> None:
    """Refuse a multirun whose jobs would start their own DDP processes: Lightning re-launches `sys.argv` for each
    rank, which in a multirun is the whole sweep again (Hydra multirun + in-process DDP is unsupported upstream)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN or SLURMEnvironment.detect():
        return
    devices, num_nodes = cfg.trainer.get("devices", 1), cfg.trainer.get("num_nodes", 1)
    several = num_nodes > 1 or devices in ("auto", -1, "-1") or (isinstance(devices, int) and devices > 1)
    several = several or (isinstance(devices, (list, ListConfig)) and len(devices) > 1)
    if several and "launch_single_process" not in str(cfg.trainer.get("strategy", "")):
        raise ConfigError(
            f"python train.py -m with trainer.devices={devices} trainer.num_nodes={num_nodes}: each job would "
            "re-launch the whole sweep for its extra ranks. Sweep with one process per GPU through a cluster "
            "launcher (hydra/launcher=slurm, see README 'Running on a cluster'), or run each multi-GPU "
            "job without -m, or sweep single-device jobs (trainer.devices=1)"
        )


UNUSED_GROUP_REASONS = {
    "net": (
        "a distillation method (turbo, lcm, dmd2, guidance_distill) distils its teacher's network, "
        "model=few_step_finetune adapts its base's, and the autoencoder's is model.vae"
    ),
    "objective": "a distillation method takes its teacher's objective (few_step_finetune: its base's), and the "
    "autoencoder has none",
    "schedule": "a beta schedule belongs to objective=ddpm (a distilled student takes its teacher's)",
    "discriminator": "only model=turbo takes the discriminator group (the autoencoder's is model.discriminator)",
    "optimizer": "this method builds no optimiser from the group",
}


def _check_used_groups(cfg: DictConfig) -> None:
    """A group chosen or set on the command line that the model does not use would be silently ignored: refuse it
    (distillation takes net, objective and schedule from its teacher; objective=flow_matching has no schedule)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    used = groups_used_by_model(cfg)
    for override in HydraConfig.get().overrides.task:
        key = override.split("=", 1)[0].lstrip("+~")
        group = key.split(".")[0].split("/")[0].split("@")[0]
        if key == group and group in MODEL_GROUPS and group not in cfg:
            # An optional group (`- optional net: ${model}`) makes Hydra skip an option it cannot find, typos too.
            raise ConfigError(f"{override}: there is no such option (no conf/{group}/{override.split('=', 1)[1]}.yaml)")
        if group in MODEL_GROUPS and group not in used:
            choices = HydraConfig.get().runtime.choices
            raise ConfigError(
                f"{override}: this run (model={choices.get('model')}, objective={choices.get('objective')}) does not "
                f"use the `{group}` group: {UNUSED_GROUP_REASONS[group]}; drop it"
            )
    if cfg.trainer.get("gradient_clip_val") is not None:
        raise ConfigError(
            "trainer.gradient_clip_val: clipping is the method's, model.max_grad_norm (GAN methods train "
            "under manual optimisation, where Lightning's clipping does not apply)"
        )


def _report_skipped_images(datamodule: ImageDataModule, loggers: list[Logger]) -> None:
    """`data.skip_bad=true`: the images left out, in train.log (written only now: the scan ran before the log file
    existed) and as the metric `data/skipped_images`, so a run's record says how much of its data it saw."""
    skipped = getattr(datamodule.source_dataset, "skipped", None)
    if skipped is None:  # a data set that skips nothing
        return
    if skipped:
        shown = ", ".join(str(path) for path in skipped[:10])
        more = f" and {len(skipped) - 10} more" if len(skipped) > 10 else ""
        log.warning("data.skip_bad=true: skipped %d unreadable image(s): %s%s", len(skipped), shown, more)
    for logger in loggers:
        logger.log_metrics({"data/skipped_images": float(len(skipped))}, step=0)


def _check_resume_fits(
    model: pl.LightningModule, datamodule: ImageDataModule, ckpt_path: str | None, world_size: int
) -> None:
    """A checkpoint of another net / method config, or whose data streams were laid out for another number of ranks
    or loader workers, is refused before anything is written: every method's `on_load_checkpoint` and the data
    module's `check_resume` only check that the checkpoint fits (Lightning loads it inside `fit`, after the run
    folder was written). The tensors are memory-mapped, not read."""
    if ckpt_path is None:
        return
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    if problem := format_problem(checkpoint):
        raise ConfigError(f"resuming from {ckpt_path}: {problem}")
    try:
        model.on_load_checkpoint(checkpoint)
        # Lightning saves a data module's state under its class's qualified name
        datamodule.check_resume(checkpoint.get(type(datamodule).__qualname__) or {}, world_size)
    except ValueError as error:  # ConfigError included
        raise ConfigError(f"resuming from {ckpt_path}: {error}") from None


class _EarlyRecords(logging.Handler):
    """Holds lightdiff's log records from before train.log exists (a damaged checkpoint skipped, a fallback taken),
    so train.log gets them too once it is opened: a run's record is complete, not only the terminal's."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("lightdiff"):
            self.records.append(record)


def run(cfg: DictConfig) -> pl.Trainer:
    """Train as `cfg` says. Raises ConfigError (nothing written) for a config that cannot work, and `Preempted` once a
    preemption signal's checkpoint is saved (train.py exits with PREEMPTED_EXIT_STATUS)."""
    early_records = _EarlyRecords()
    logging.getLogger().addHandler(early_records)
    try:
        return _run(cfg, early_records)
    finally:
        logging.getLogger().removeHandler(early_records)


def _run(cfg: DictConfig, early_records: _EarlyRecords) -> pl.Trainer:
    _check_used_groups(cfg)
    check_config(cfg)
    max_steps = cfg.trainer.get("max_steps")
    if max_steps in (None, -1):
        # The training sampler is endless (data/sampler.py): a run is as long as its number of steps.
        raise ConfigError("trainer.max_steps is not set: lightdiff trains for a number of steps, e.g. 100000")
    if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 1:
        raise ConfigError(f"trainer.max_steps={max_steps!r} must be a positive number of optimiser steps")
    seed = cfg.seed
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_TRAINING_SEED:
        # Lightning's seed_everything would replace such a seed by a random one with a warning: an unrepeatable run.
        raise ConfigError(f"seed={seed!r} must be a whole number from 0 to {MAX_TRAINING_SEED} (numpy's seed range)")
    if "_target_" not in cfg.sampler:  # sampler/auto.yaml: one sampler per objective, for sample.py's checkpoints
        raise ConfigError(
            "sampler=auto is sample.py's (it picks by a checkpoint's objective); training grids use the "
            "objective's own sampler by default (sampler: default_${objective}), or name one: "
            "sampler=ddim|ddpm|dpm|euler|flow_euler"
        )
    _check_launch(cfg)
    # A data set without a held-out split (data.val_*) serves an empty validation list: no val/loss, not a problem.
    warnings.filterwarnings("ignore", message="Total length of `list` across ranks is zero")
    run_dir = Path(cfg.run_dir)
    # Under DDP every rank runs this function; rank 0 alone owns the folder and writes its config and log.
    is_rank_zero = rank_zero_only.rank == 0
    lock = RunFolderLock(run_dir)
    if is_rank_zero and (refusal := lock.refusal()):  # said now, not after minutes of loading networks
        raise ConfigError(refusal)
    pl.seed_everything(cfg.seed, workers=True)

    datamodule = build(cfg.data)  # an image folder is scanned here: unreadable images and bad labels fail now
    datamodule.order_seed = cfg.seed  # the shuffle of each epoch follows the run's seed (data/sampler.py)
    model = build(cfg.model, data=datamodule)  # each method builds its networks for the data and checks they fit
    if datamodule.cache_latents:
        if not isinstance(model, LatentCaching):
            raise ConfigError(f"data.cache_latents=true: {type(model).__name__} cannot train from cached latents")
        datamodule.use_latent_cache(*model.latent_cache_encoders())
    callbacks = [build(c) for c in (cfg.callbacks or {}).values() if c is not None]
    if not cfg.trainer.get("enable_progress_bar", True):  # trainer.enable_progress_bar=false wins over the callback
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    if cfg.get("metrics"):
        with torch.random.fork_rng(devices=[]):  # building a feature network must not shift training's random stream
            callbacks.append(build(cfg.metrics))
    # First of the end-of-run hooks: the final state is on disk before grids, metrics or anything else that can fail.
    final_checkpoint = FinalCheckpoint(run_dir / "checkpoints" / "last.ckpt")
    callbacks.insert(0, final_checkpoint)
    ckpt_path = _resume_path(cfg, run_dir)
    logger = build(cfg.logger) if cfg.logger is not None else False
    loggers = [logger] if logger else []
    if cfg.get("optimize_metric"):
        loggers.append(LatestMetrics())  # where train.py reads the sweep's objective (lightdiff.loggers.objective)
    plugins: list = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        # callbacks.Preemption saves last.ckpt and requeues; Lightning's own requeue would save hpc_ckpt files.
        plugins.append(SLURMEnvironment(auto_requeue=False))
    trainer: pl.Trainer = build(
        cfg.trainer, default_root_dir=str(run_dir), callbacks=callbacks, logger=loggers or False, plugins=plugins
    )
    if rank_zero_only.rank > 0:
        # Every rank built the same networks from `seed` (DDP also copies rank 0's weights); from here each rank
        # draws its own noise and timesteps, or all ranks would train on the same noise.
        pl.seed_everything(cfg.seed + rank_zero_only.rank, workers=True, verbose=False)

    _check_resume_fits(model, datamodule, ckpt_path, trainer.world_size)

    # Everything is built and checked: from here on files are written, by the folder's one owner.
    if is_rank_zero:
        lock.acquire()  # refused (ConfigError naming the owner) if another run took it since the check above
    try:
        return _fit(cfg, trainer, model, datamodule, logger, loggers, final_checkpoint, ckpt_path, early_records)
    finally:
        lock.release()


def _fit(
    cfg: DictConfig,
    trainer: pl.Trainer,
    model: pl.LightningModule,
    datamodule: ImageDataModule,
    logger: Logger | bool,
    loggers: list[Logger],
    final_checkpoint: FinalCheckpoint,
    ckpt_path: str | None,
    early_records: _EarlyRecords,
) -> pl.Trainer:
    """Write the run folder's config and log, then fit (the folder is this process's: `RunFolderLock`)."""
    run_dir = Path(cfg.run_dir)
    is_rank_zero = rank_zero_only.rank == 0
    file_handler = logging.FileHandler(run_dir / "train.log") if is_rank_zero else logging.NullHandler()
    file_handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    for record in early_records.records:  # what was said before train.log existed
        file_handler.handle(record)
    logging.getLogger().removeHandler(early_records)
    logging.getLogger().addHandler(file_handler)
    package_logger = logging.getLogger("lightdiff")
    if package_logger.getEffectiveLevel() > logging.INFO:
        package_logger.setLevel(logging.INFO)  # resumes, metrics and the run folder belong in train.log
    if is_rank_zero:
        record_config(run_dir, OmegaConf.to_yaml(cfg, resolve=True))
        remove_orphaned_temporaries(run_dir / "checkpoints")
    parts = components(model)  # each network with its class, size and memory: train.log and the logger's config
    sources = model.part_sources if isinstance(model, NamesPartSources) else None
    log.info("the model's networks:\n%s", summary_table(parts, sources))
    if logger:
        logger.log_hyperparams({**OmegaConf.to_container(cfg, resolve=True), "components": [c.row() for c in parts]})
    _report_skipped_images(datamodule, loggers)
    if ckpt_path:
        log.info("resuming %s from %s", cfg.run_name, ckpt_path)
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
        if not final_checkpoint.saved:  # nothing was left to train (resumed at max_steps): no on_train_end ran
            final_checkpoint.save(trainer)
    except Preempted as stop:
        log.warning(
            "preempted at step %d (%s): checkpoints/last.ckpt holds it; the end-of-run round (final grids, samples, "
            "metrics) is skipped; run the same command to resume",
            stop.step,
            stop.received,
        )
        raise
    except SIGTERMException:
        # Lightning's own SIGTERM handling, in force when callbacks.preemption is off: it stops after the batch and
        # saves nothing, so the run resumes from its last periodic checkpoint.
        log.warning(
            "preempted at step %d (SIGTERM, callbacks.preemption off: nothing saved since the last periodic "
            "checkpoint); run the same command to resume",
            trainer.global_step,
        )
        raise Preempted(trainer.global_step, "SIGTERM") from None
    finally:
        logging.getLogger().removeHandler(file_handler)
        file_handler.close()
        if isinstance(logger, WandbLogger):
            import wandb

            wandb.finish()  # sequential multirun jobs must not log into the previous job's run
    log.info("run folder: %s", run_dir)
    return trainer
