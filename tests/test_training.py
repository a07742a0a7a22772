"""Tiny end-to-end runs through the real configs: every option that changes the training step, 2 steps each."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightdiff.nets.denoiser import network_output
from lightdiff.train import run
from lightdiff.trained import load_checkpoint_file

from .conftest import TINY, compose_config


def _metrics(run_dir: Path) -> list[dict[str, str]]:
    files = sorted(run_dir.glob("csv/version_*/metrics.csv"))
    rows: list[dict[str, str]] = []
    for path in files:
        with path.open() as handle:
            rows += list(csv.DictReader(handle))
    return rows


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["schedule=cosine"],
        ["schedule=scaled_linear", "objective.prediction_type=v_prediction"],
        ["schedule=sigmoid", "objective.prediction_type=sample", "objective.loss_weighting=min_snr"],
        ["objective.loss_weighting=min_snr", "model.offset_noise=0.1", "model.lr_schedule=constant"],
        ["experiment=shapes_class"],
        ["sampler=dpm"],
        ["sampler=euler"],
        ["sampler=ddpm"],
        ["trainer.precision=bf16-mixed"],
    ],
    ids=lambda o: " ".join(o) or "defaults",
)
def test_two_step_run_writes_checkpoint_grid_and_metrics(overrides: list[str], tiny_train_config) -> None:
    cfg = tiny_train_config(*overrides)
    trainer = run(cfg)
    run_dir = Path(cfg.run_dir)
    assert trainer.global_step == 2
    checkpoint = load_checkpoint_file(run_dir / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 2
    meta = checkpoint["lightdiff"]
    assert meta["objective"]["prediction_type"] == cfg.objective.prediction_type
    assert meta["objective"]["schedule"]["beta_schedule"] == cfg.schedule.beta_schedule
    ema = checkpoint["callbacks"]["ema"]
    assert ema["optimization_step"] == 2
    raw = [v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")]
    assert len(ema["shadow_params"]) == len(raw)
    assert any(not torch.equal(a, b) for a, b in zip(ema["shadow_params"], raw))  # the average lags the weights
    losses = [float(r["train/loss"]) for r in _metrics(run_dir) if r.get("train/loss")]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert all(v.dtype == torch.float32 for v in checkpoint["state_dict"].values())  # fp32 weights at any precision
    grid = Image.open(run_dir / "samples" / "final_step0000002.png")
    assert grid.size == (2 * 16 * 4, 2 * 16 * 4)  # 4 images of 16 px, 2x2, upscaled 4x
    assert (run_dir / "config.yaml").read_text().count("prediction_type: ") == 2  # objective, model.objective
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert "final/shapes_valid" in final
    # the collapse diagnostics beside adherence: 4 images leave no class drawn twice, so no spread is measured
    assert 0 <= final["final/recall"] <= 1 and 0 <= final["final/precision"] <= 1 and "final/diversity" not in final


def test_no_callbacks_still_saves_the_final_checkpoint(tmp_path: Path) -> None:
    overrides = [o for o in TINY if not o.startswith("callbacks.")]
    cfg = compose_config("train", [f"output_root={tmp_path}", *overrides, "callbacks=none", "trainer.max_steps=3"])
    run(cfg)
    checkpoint = load_checkpoint_file(Path(cfg.run_dir) / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 3 and "ema" not in checkpoint["callbacks"]
    assert not (Path(cfg.run_dir) / "samples").exists()


def test_logged_values_learning_rate_grad_norm_throughput(tiny_train_config) -> None:
    cfg = tiny_train_config(
        "trainer.max_steps=4", "model.warmup_steps=2", "model.lr=1e-3", "model.lr_schedule=constant"
    )
    run(cfg)
    rows = _metrics(Path(cfg.run_dir))
    learning_rates = [float(r["train/lr"]) for r in rows if r.get("train/lr")]
    assert learning_rates[:3] == pytest.approx([0.0, 5e-4, 1e-3])  # linear warm-up over 2 steps, then constant
    assert all(float(r["train/grad_norm"]) > 0 for r in rows if r.get("train/grad_norm"))
    assert sum(1 for r in rows if r.get("train/images_per_sec")) >= 3


def test_loss_falls_on_shapes(tiny_train_config) -> None:
    cfg = tiny_train_config(
        "trainer.max_steps=30",
        "data.batch_size=16",
        "data.size=512",
        "model.lr=2e-3",
        "model.warmup_steps=5",
        "callbacks.checkpoint.every_n_train_steps=15",
        "trainer.log_every_n_steps=1",
    )
    run(cfg)
    losses = [float(r["train/loss"]) for r in _metrics(Path(cfg.run_dir)) if r.get("train/loss")]
    # 30 steps reach 0.22x the first steps' loss here (0.13x at 60): a bar at 0.4x still leaves twice the margin
    assert len(losses) == 30 and np.mean(losses[-10:]) < 0.4 * np.mean(losses[:5])


def test_class_conditional_without_labels_fails_early(tmp_path: Path) -> None:
    folder = tmp_path / "plain"
    folder.mkdir()
    for i in range(8):
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / f"{i}.png")
    overrides = [
        f"output_root={tmp_path}",
        "logger=csv",
        "data=image_folder",
        f"data.root={folder}",
        "data.batch_size=4",
    ]
    cfg = compose_config("train", [*overrides, "data.resolution=16", "data.num_workers=0", "net.num_class_embeds=24"])
    with pytest.raises(ValueError, match="no labels"):
        run(cfg)
    assert not Path(cfg.run_dir).exists()


def test_wandb_offline_keeps_one_run_id_across_resume(
    tiny_train_config, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    cfg = tiny_train_config("logger=wandb", "run_name=wb")
    run(cfg)
    run_dir = Path(cfg.run_dir)
    run_id = (run_dir / "wandb_run_id.txt").read_text().strip()
    offline_runs = list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline_runs) == 1
    run(tiny_train_config("logger=wandb", "run_name=wb", "trainer.max_steps=3"))
    assert (run_dir / "wandb_run_id.txt").read_text().strip() == run_id
    assert len(list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))) == 2  # two sessions, one run id


@pytest.mark.gpu
def test_gpu_run_uses_bf16_autocast_with_fp32_weights(tiny_train_config) -> None:
    cfg = tiny_train_config("trainer=gpu")
    trainer = run(cfg)
    assert trainer.precision == "bf16-mixed"
    checkpoint = load_checkpoint_file(Path(cfg.run_dir) / "checkpoints" / "last.ckpt")
    assert all(v.dtype == torch.float32 for v in checkpoint["state_dict"].values())


def test_auto_precision_is_fp32_on_cpu(tiny_train_config) -> None:
    if torch.cuda.is_available():
        pytest.skip("checks the CPU choice")
    trainer = run(tiny_train_config())
    assert trainer.precision == "32-true"


def test_the_manual_schedule_is_the_diffusers_one() -> None:
    """`lr_factor` (turbo, dmd2: computed from the step) against the diffusers schedules Lightning steps for the other
    methods, at every step of a warm-up then cosine / constant run."""
    from diffusers.optimization import get_scheduler

    from lightdiff.methods.optimization import lr_factor

    for schedule, name in (("cosine", "cosine"), ("constant", "constant_with_warmup")):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        stepped = get_scheduler(name, optimizer, num_warmup_steps=3, num_training_steps=10)
        for step in range(12):
            assert lr_factor(schedule, 3, step, 10) == pytest.approx(optimizer.param_groups[0]["lr"], abs=1e-12)
            optimizer.step()
            stepped.step()
    assert lr_factor("cosine", 0, 5, 10) == pytest.approx(0.5)  # half-way down the half cosine


@pytest.mark.parametrize("method", ["turbo", "lcm", "dmd2", "guidance_distill"])
def test_every_distillation_teacher_can_be_stored_in_int8(method: str, text_ckpt: Path, tmp_path: Path) -> None:
    """model.base_quantization=int8 quantises the frozen teacher's linear layers after the student was copied from it:
    the student's stay fp32 and train; the teacher's prediction on a fixed input is within 2% of the full-precision
    teacher's (measured: 0.35%; int8 rounds each weight by at most half its row's step) but not equal to it (the
    control: it really was quantised). The checkpoint holds no teacher weights."""
    overrides = [f"output_root={tmp_path}", *TINY, f"model={method}", f"model.teacher={text_ckpt}", "model.lr=1e-3"]
    overrides += ["trainer.max_steps=3", "callbacks.samples.final_num_images=0", "callbacks.ema=null"]
    overrides += (["model.teacher_steps=2"] if method != "guidance_distill" else []) + (
        ["model.regression_pairs=4"] if method == "dmd2" else []
    )
    full = run(compose_config("train", [*overrides, "run_name=full"])).lightning_module
    low = run(compose_config("train", [*overrides, "run_name=int8", "model.base_quantization=int8"])).lightning_module
    teacher_linears = [m for m in low.teacher.net.modules() if isinstance(m, torch.nn.Linear)]
    assert teacher_linears and all("Int8" in type(m.weight).__name__ for m in teacher_linears)
    student_linears = [m for m in low.net.modules() if isinstance(m, torch.nn.Linear)]
    assert all(type(m.weight) is torch.nn.Parameter and m.weight.dtype == torch.float32 for m in student_linears)
    initial = full.teacher.net.state_dict()
    assert any(not torch.equal(value, initial[key]) for key, value in low.net.state_dict().items() if key in initial)
    x_t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t, condition = torch.tensor([500, 900]), full.teacher.conditioning({"text": ["a red circle", "a blue square"]})
    with torch.no_grad():
        reference = network_output(full.teacher.net, x_t, t, condition)
        gap = (network_output(low.teacher.net, x_t, t, condition) - reference).abs().max() / reference.abs().max()
    assert 0 < gap < 0.02, gap
    saved = load_checkpoint_file(tmp_path / "int8" / "checkpoints" / "last.ckpt")["state_dict"]
    assert saved and not any(key.startswith("teacher.") for key in saved)


@pytest.mark.parametrize("method", ["turbo", "lcm", "dmd2", "guidance_distill"])
def test_distillation_methods_follow_warmup_and_lr_schedule(method: str, text_ckpt: Path, tmp_path: Path) -> None:
    """Every method has the warm-up and schedule (they had none: a constant rate whatever the keys said)."""
    overrides = [f"output_root={tmp_path}", *TINY, f"model={method}", f"model.teacher={text_ckpt}"]
    overrides += ["trainer.max_steps=6", "model.lr=1e-3", "callbacks.samples.final_num_images=0"]
    overrides += (
        ["callbacks.checkpoint.every_n_train_steps=100"]
        + (["model.teacher_steps=2"] if method != "guidance_distill" else [])
        + (["model.regression_pairs=4"] if method == "dmd2" else [])
    )
    cfg = compose_config("train", [*overrides, "model.warmup_steps=2", "model.lr_schedule=cosine"])
    run(cfg)
    rates = [float(r["train/lr"]) for r in _metrics(Path(cfg.run_dir)) if r.get("train/lr")]
    assert rates[0] == 0.0 and max(rates) == pytest.approx(1e-3)  # warm-up from 0 to the peak (logged in float32)
    peak = rates.index(max(rates))
    assert 0 < peak < len(rates) - 1 and rates[-1] < max(rates)  # then down the cosine
    assert all(a >= b for a, b in zip(rates[peak:], rates[peak + 1 :]))
