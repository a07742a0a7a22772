"""Train a diffusion model: `python train.py [group=option ...] [key=value ...]` (see README.md)."""

import hydra
from omegaconf import DictConfig

from lightdiff.callbacks.preemption import PREEMPTED_EXIT_STATUS, Preempted
from lightdiff.loggers import objective
from lightdiff.train import run


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        trainer = run(cfg)
    except Preempted:
        # last.ckpt is saved (train.log says "preempted at step N"). A distinct status, not 0: submitit and a sweep
        # waiting on this job must not take it as the job's end (the requeued job resumes and returns the result),
        # and a script can tell "resume me" from success and from an error.
        raise SystemExit(PREEMPTED_EXIT_STATUS) from None
    # A sweeper (hparams_search=...) optimises the returned value.
    return objective(trainer, cfg.optimize_metric) if cfg.optimize_metric else None


if __name__ == "__main__":
    main()
