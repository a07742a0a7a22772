"""Train a diffusion model: `python train.py [group=option ...] [key=value ...]` (see README.md)."""

import os

import hydra
from omegaconf import DictConfig

from lightdiff.loggers import objective
from lightdiff.train import run


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    trainer = run(cfg)
    if trainer.global_step < cfg.trainer.max_steps and os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
        # Stopped by a signal: callbacks.Preemption saved last.ckpt and the job is requeued (by Preemption, or by
        # SLURM's preemption). Leaving without a result keeps submitit, and the sweep waiting on it, from taking
        # this part of the run as the job's end; the requeued job resumes the run and returns the result.
        raise SystemExit(f"stopped at step {trainer.global_step} of {cfg.trainer.max_steps}; the requeued job resumes")
    # A sweeper (hparams_search=...) optimises the returned value.
    return objective(trainer, cfg.optimize_metric) if cfg.optimize_metric else None


if __name__ == "__main__":
    main()
