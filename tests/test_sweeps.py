"""Sweeps (`python train.py -m ...`): a run folder and a wandb name per job, one wandb group per sweep, the
submitit launchers, the Optuna search, and the launch that cannot work."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lightdiff.config import ConfigError, build, check_config
from lightdiff.loggers import LatestMetrics, objective
from lightdiff.train import _check_launch, run

from .conftest import CONF, REPO, TINY, compose_config

SWEPT = "model.lr=1e-4,3e-4"


def _train(*args: str, expect_ok: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "train.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    if expect_ok:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def _job_folders(output_root: Path) -> dict[float, Path]:
    """Each job's run folder, by the learning rate in its config.yaml."""
    folders = [p.parent for p in output_root.glob("pixel-shapes-linear/*/config.yaml")]
    return {OmegaConf.load(folder / "config.yaml").model.lr: folder for folder in folders}


@pytest.mark.slow  # four tiny training runs in subprocesses (about a minute on 2 cores)
def test_each_job_has_its_own_run_folder_and_resumes_there(tmp_path: Path) -> None:
    _train("-m", f"output_root={tmp_path}", *TINY, SWEPT)
    folders = _job_folders(tmp_path)
    assert sorted(folders) == [1e-4, 3e-4]  # before: the second job resumed the first job's run
    for folder in folders.values():
        assert (folder / "checkpoints" / "last.ckpt").is_file()
        assert "resuming" not in (folder / "train.log").read_text()
    # The same sweep again, longer (trainer.max_steps is not part of a job's folder name): each job resumes its run.
    _train("-m", f"output_root={tmp_path}", *TINY, SWEPT, "trainer.max_steps=3")
    assert _job_folders(tmp_path) == folders
    for folder in folders.values():
        assert "resuming" in (folder / "train.log").read_text()
        assert json.loads((folder / "final_metrics.json").read_text())["step"] == 3


@pytest.mark.slow  # two tiny training runs as submitit subprocesses
def test_submitit_local_launcher_runs_every_job(tmp_path: Path) -> None:
    _train(
        "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", f"output_root={tmp_path}", *TINY, SWEPT
    )
    folders = _job_folders(tmp_path)
    assert sorted(folders) == [1e-4, 3e-4]
    assert all((folder / "checkpoints" / "last.ckpt").is_file() for folder in folders.values())
    assert list((tmp_path / "sweeps").glob("*/.submitit/*/*_result.pkl"))  # submitit ran them, not Hydra in-process


def test_multirun_jobs_share_a_wandb_group_and_keep_their_own_folders(tmp_path: Path) -> None:
    """A sweep's jobs as its launcher composes them: one group (the sweep folder's name), one run folder and wandb
    name per job; a single run keeps outputs/<run_name>/ and no group."""
    sweep = ["hydra.mode=MULTIRUN", f"hydra.sweep.dir={tmp_path}/sweeps/lr_search", "logger=wandb"]
    jobs, loggers = [], []
    for lr in ("1e-4", "3e-4"):
        job = compose_config("train", [f"output_root={tmp_path}", *sweep, f"model.lr={lr}"])
        OmegaConf.resolve(job)  # while HydraConfig is this job's, as in the job's process
        jobs.append(job)
        loggers.append(build(job.logger)._wandb_init)
    assert loggers[0]["group"] == loggers[1]["group"] == "lr_search"
    assert [init["name"] for init in loggers] == [
        "pixel-shapes-linear/model.lr=1e-4",
        "pixel-shapes-linear/model.lr=3e-4",
    ]
    assert jobs[0].run_dir == f"{tmp_path}/pixel-shapes-linear/model.lr=1e-4" != jobs[1].run_dir

    single = compose_config("train", [f"output_root={tmp_path}", "logger=wandb", "model.lr=1e-4"])
    assert single.run_dir == f"{tmp_path}/pixel-shapes-linear" and single.logger.group is None


def test_multirun_with_in_process_ddp_fails_fast_naming_the_slurm_launcher(tmp_path: Path) -> None:
    """A job of `python train.py -m trainer=cpu trainer.devices=2 ...` as its launcher composes it (in process: the
    real multirun's launch is `test_each_job_has_its_own_run_folder_and_resumes_there`)."""

    def job(*overrides: str) -> DictConfig:
        sweep = ["hydra.mode=MULTIRUN", f"hydra.sweep.dir={tmp_path}/sweeps/s", "logger=none", "model.lr=1e-4"]
        return compose_config("train", [f"output_root={tmp_path}", *sweep, "trainer=cpu", *overrides])

    with pytest.raises(ConfigError, match="trainer.devices=2") as refused:
        run(job("trainer.devices=2"))
    assert "hydra/launcher=slurm" in str(refused.value)
    assert list(tmp_path.iterdir()) == []  # nothing written
    # Controls: a one-device job of the sweep, and the two-device run without -m, pass the launch check.
    _check_launch(job("trainer.devices=1"))
    _check_launch(compose_config("train", [f"output_root={tmp_path}", "trainer=cpu", "trainer.devices=2"]))


def test_slurm_launcher_config_submits_one_task_per_gpu_with_the_preemption_signal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """conf/hydra/launcher/slurm.yaml through the real plugin and submitit, up to the sbatch script."""
    import submitit.slurm.slurm as submitit_slurm

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "train",
            [
                "hydra/launcher=slurm",
                "hydra.launcher.partition=gpu",
                f"hydra.sweep.dir={tmp_path}",
                "trainer.devices=4",
            ],
            return_hydra_config=True,
        )
    HydraConfig.instance().set_config(cfg)
    scripts: list[str] = []

    def capture(executor: submitit_slurm.SlurmExecutor, command: str) -> None:
        scripts.append(executor._make_submission_file_text(command, "test"))
        raise RuntimeError("not submitted")

    monkeypatch.setattr(submitit_slurm.SlurmExecutor, "_submit_command", capture)
    (tmp_path / "srun").write_text("#!/bin/sh\n")  # submitit refuses to start where it finds no srun
    (tmp_path / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    launcher = instantiate(cfg.hydra.launcher)
    launcher.config = cfg
    with pytest.raises(RuntimeError, match="not submitted"):
        launcher.launch([["model.lr=1e-4"], ["model.lr=3e-4"]], initial_job_idx=0)
    script = scripts[0]
    for line in ("--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu", "--signal=USR1@120", "--array=0-1"):
        assert f"#SBATCH {line}" in script, script


@pytest.mark.parametrize("search", ["optuna_fid", "optuna_shapes"])
def test_hparams_search_configs_compose_with_their_objective(search: str, tmp_path: Path) -> None:
    cfg = compose_config("train", [f"output_root={tmp_path}", f"hparams_search={search}"])
    check_config(cfg)
    assert cfg.optimize_metric == {"optuna_fid": "val/fid", "optuna_shapes": "final/shapes_valid"}[search]
    assert HydraConfig.get().sweeper.params["model.lr"].startswith("tag(log")


@pytest.mark.slow  # two tiny training runs
def test_optuna_search_returns_the_metric_and_records_the_best_parameters(tmp_path: Path) -> None:
    _train("-m", "hparams_search=optuna_shapes", "hydra.sweeper.n_trials=2", f"output_root={tmp_path}", *TINY)
    (results,) = (tmp_path / "sweeps").glob("*/optimization_results.yaml")
    found = OmegaConf.load(results)
    assert set(found.best_params) == {"model.lr", "schedule"} and 0.0 <= found.best_value <= 1.0
    assert len(list(tmp_path.glob("pixel-shapes-*/*/checkpoints/last.ckpt"))) == 2  # one run folder per trial


def test_objective_names_the_missing_metric_and_the_logged_ones() -> None:
    class FakeTrainer:
        global_rank = 0
        global_step = 2
        callback_metrics = {"train/loss": torch.tensor(0.5)}
        loggers = [LatestMetrics()]

    FakeTrainer.loggers[0].log_metrics({"final/shapes_valid": 0.75}, step=2)
    assert objective(FakeTrainer(), "final/shapes_valid") == 0.75
    assert objective(FakeTrainer(), "train/loss") == 0.5
    with pytest.raises(ConfigError, match=r"optimize_metric='val/fid'.*final/shapes_valid, train/loss"):
        objective(FakeTrainer(), "val/fid")
