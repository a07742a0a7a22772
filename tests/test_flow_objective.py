"""objective=flow_matching (issue 8): the objective object, sampler pairing, a pixel run, export, old checkpoints,
and turbo distillation of a flow-matching teacher."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, FlowMatchEulerDiscreteScheduler
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from PIL import Image

from lightdiff.config import ConfigError
from lightdiff.data import ShapesDataModule
from lightdiff.diffusion import (
    DDPM,
    FlowMatching,
    NoiseSchedule,
    distillation_weight,
    flow_alpha_sigma,
    logit_normal_timesteps,
    objective_from_state,
    shift_timesteps,
)
from lightdiff.methods.diffusion import DiffusionTraining
from lightdiff.nets.families.labels import NoCondition
from lightdiff.sample import run as sample_run
from lightdiff.sampling import generate
from lightdiff.train import run as train_run
from lightdiff.trained import load_checkpoint_file, load_denoiser

from .conftest import TINY, assert_reproduced, compose_config, pipeline_images, tiny_unet

SCHEDULE = NoiseSchedule("linear", 1000, 1e-4, 0.02)
DATA = ShapesDataModule(resolution=8, size=16, batch_size=4)


def _pixels(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("0*.png"))])


def test_training_times_are_shifted_logit_normal_draws_and_state_round_trips() -> None:
    objective = FlowMatching(logit_mean=0.3, logit_std=0.7, shift=3.0)
    drawn = objective.training_times(5, generator=torch.Generator().manual_seed(4))
    expected = shift_timesteps(logit_normal_timesteps(5, 0.3, 0.7, torch.Generator().manual_seed(4)), 3.0)
    torch.testing.assert_close(drawn, expected, rtol=0, atol=0)
    torch.testing.assert_close(objective.network_timesteps(torch.tensor([0.25, 1.0])), torch.tensor([250.0, 1000.0]))
    assert objective_from_state(objective.state()) == objective
    ddpm = DDPM(SCHEDULE, "v_prediction")
    assert objective_from_state(ddpm.state()) == ddpm
    # Format-1 checkpoints kept the schedule and prediction type beside the objective's name (or had none).
    assert objective_from_state(None, vars(SCHEDULE), "v_prediction") == ddpm
    assert objective_from_state({"name": "ddpm"}, vars(SCHEDULE), "v_prediction") == ddpm
    with pytest.raises(ValueError, match="unknown objective 'consistency'"):
        objective_from_state({"name": "consistency"})
    with pytest.raises(ValueError, match="objective.shift=0"):
        FlowMatching(shift=0)


def test_flow_distillation_weights_are_the_ddpm_formulas_on_the_flow_path() -> None:
    t = torch.tensor([0.1, 0.5, 0.9])
    alpha, sigma = flow_alpha_sigma(t)
    torch.testing.assert_close(distillation_weight("alpha_bar", alpha, sigma), (1 - t) ** 2)
    torch.testing.assert_close(distillation_weight("sds", alpha, sigma), (1 - t) * t / 2)
    torch.testing.assert_close(distillation_weight("sds", *FlowMatching().alpha_sigma(t * 1000)), (1 - t) * t / 2)
    # A DDPM's (alpha, sigma) = (sqrt(alpha_bar), sqrt(1 - alpha_bar)) through the same function.
    alphas_cumprod, timesteps = SCHEDULE.alphas_cumprod().float(), torch.tensor([10, 500])
    alpha_bar = alphas_cumprod[timesteps]
    torch.testing.assert_close(
        distillation_weight("sds", *DDPM(SCHEDULE).alpha_sigma(timesteps)), (alpha_bar * (1 - alpha_bar)).sqrt() / 2
    )


def test_sampler_and_objective_must_match() -> None:
    flow = FlowMatching(shift=2.0)
    with pytest.raises(ConfigError, match="DDIMScheduler is a DDPM sampler.*use sampler=flow_euler"):
        flow.scheduler(DDIMScheduler)
    with pytest.raises(ConfigError, match="FlowMatchEulerDiscreteScheduler integrates a flow.*objective=ddpm"):
        DDPM(SCHEDULE).scheduler(FlowMatchEulerDiscreteScheduler)
    factory = instantiate(compose_config("sample", ["ckpt=x", "sampler=flow_euler"]).sampler)
    scheduler = flow.scheduler(factory)
    assert isinstance(scheduler, FlowMatchEulerDiscreteScheduler) and scheduler.config.shift == 2.0  # the training's
    own = instantiate(compose_config("sample", ["ckpt=x", "sampler=flow_euler", "+sampler.shift=3.0"]).sampler)
    assert flow.scheduler(own).config.shift == 3.0  # the sampler's own wins


def test_flow_training_step_regresses_the_velocity_at_t_times_1000(monkeypatch: pytest.MonkeyPatch) -> None:
    objective = FlowMatching(shift=3.0)
    module = DiffusionTraining(DATA, net=tiny_unet(), objective=objective)
    monkeypatch.setattr(module, "log", lambda *args, **kwargs: None)
    monkeypatch.setattr(module, "optimizers", lambda: SimpleNamespace(param_groups=[{"lr": 0.0}]))
    seen = {}
    hook = module.net.register_forward_hook(
        lambda net, args, kwargs, output: seen.update(x_t=args[0], timesteps=kwargs["timestep"]), with_kwargs=True
    )
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    torch.manual_seed(7)
    loss = module.training_step({"pixel_values": x0, "label": torch.zeros(4, dtype=torch.long)}, 0)
    hook.remove()
    torch.manual_seed(7)  # the same draws, in the method's order: noise, then t
    noise = torch.randn_like(x0)
    t = objective.training_times(4)
    torch.testing.assert_close(seen["timesteps"], t * 1000)
    torch.testing.assert_close(seen["x_t"], (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise)
    with torch.no_grad():
        prediction = module.net(seen["x_t"], seen["timesteps"]).sample
    torch.testing.assert_close(loss, ((prediction - (noise - x0)) ** 2).mean())
    # objective.prediction_type belongs to objective=ddpm: flow matching has no such key to set (Hydra says so).
    with pytest.raises(ConfigCompositionException, match="Could not override 'objective.prediction_type'"):
        compose_config("train", ["objective=flow_matching", "objective.prediction_type=v_prediction"])


def test_sampler_auto_is_refused_by_training_before_any_folder(tiny_train_config) -> None:
    cfg = tiny_train_config("sampler=auto")
    with pytest.raises(ConfigError, match=r"sampler=auto is sample\.py's"):
        train_run(cfg)
    assert not Path(cfg.run_dir).exists()


@pytest.fixture(scope="module")
def flow_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("flow")
    overrides = [f"output_root={root}", *TINY, "run_name=flow", "trainer.max_steps=2", "objective=flow_matching"]
    cfg = compose_config("train", overrides)
    assert cfg.sampler._target_ == "diffusers.FlowMatchEulerDiscreteScheduler"  # the objective picks the grid sampler
    train_run(cfg)
    return Path(cfg.run_dir) / "checkpoints" / "last.ckpt"


def test_flow_checkpoint_needs_the_flow_sampler_and_exports_to_ddpm_pipeline(flow_ckpt: Path, tmp_path: Path) -> None:
    assert load_checkpoint_file(flow_ckpt)["lightdiff"]["objective"] == FlowMatching().state()
    with pytest.raises(ConfigError, match="use sampler=flow_euler"):  # a DDPM sampler, asked for by name
        sample_run(compose_config("sample", [f"ckpt={flow_ckpt}", f"out={tmp_path / 'x'}", "sampler=ddim"]))
    assert not (tmp_path / "x").exists()
    flow = ["sampler=flow_euler", "num_images=3", "steps=4"]
    from_ckpt = _pixels(sample_run(compose_config("sample", [f"ckpt={flow_ckpt}", f"out={tmp_path / 'a'}", *flow])))
    # No sampler given (sampler=auto): the checkpoint's objective picks flow_euler, the same images.
    auto = sample_run(compose_config("sample", [f"ckpt={flow_ckpt}", f"out={tmp_path / 'auto'}", *flow[1:]]))
    assert np.array_equal(_pixels(auto), from_ckpt)
    assert json.loads((auto / "metadata.jsonl").read_text().splitlines()[0])["sampler"] == (
        "FlowMatchEulerDiscreteScheduler"
    )
    folder = sample_run(compose_config("sample", [f"ckpt={flow_ckpt}", f"export={tmp_path / 'pipe'}", *flow]))
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    assert json.loads((folder / "lightdiff.json").read_text())["objective"]["name"] == "flow_matching"
    from_export = _pixels(sample_run(compose_config("sample", [f"ckpt={folder}", f"out={tmp_path / 'b'}", *flow])))
    assert np.array_equal(from_ckpt, from_export) and from_ckpt.std() > 0
    # Plain diffusers: DDPMPipeline's loop runs the exported FlowMatchEuler scheduler to the same images.
    pipeline = DDPMPipeline.from_pretrained(folder)
    assert isinstance(pipeline.scheduler, FlowMatchEulerDiscreteScheduler)
    theirs = pipeline_images(pipeline, None, 3, rounded=False, num_inference_steps=4)
    denoiser = load_denoiser(flow_ckpt)
    scheduler = denoiser.objective.scheduler(FlowMatchEulerDiscreteScheduler)
    assert_reproduced(generate(denoiser.net, scheduler, 4, [0, 1, 2], NoCondition(), {}), theirs, 1e-5)


def test_resuming_with_another_objective_is_refused(flow_ckpt: Path) -> None:
    checkpoint = load_checkpoint_file(flow_ckpt)
    with pytest.raises(ConfigError, match="trained with objective=flow_matching, this config says objective=ddpm"):
        DiffusionTraining(DATA, net=tiny_unet(), objective=DDPM(SCHEDULE)).on_load_checkpoint(checkpoint)


def test_a_checkpoint_from_before_objectives_loads_as_ddpm(tmp_path: Path) -> None:
    net = tiny_unet()
    meta = {
        "format": 1,
        "method": "pixel",
        "net_class": "UNet2DModel",
        "net_config": {k: v for k, v in net.config.items() if not k.startswith("_")},
        "schedule": dict(vars(SCHEDULE)),
        "prediction_type": "epsilon",
        "class_names": None,
    }
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}, "lightdiff": meta}, tmp_path / "a")
    denoiser = load_denoiser(tmp_path / "a")
    assert denoiser.objective == DDPM(SCHEDULE)
    out = sample_run(compose_config("sample", [f"ckpt={tmp_path / 'a'}", f"out={tmp_path / 'o'}", "num_images=2"]))
    assert len(_pixels(out)) == 2  # the default DDIM sampler serves it, as before


def test_turbo_distils_a_flow_matching_teacher(flow_ckpt: Path, tmp_path: Path) -> None:
    overrides = [f"output_root={tmp_path}", *TINY, "model=turbo", f"model.teacher={flow_ckpt}", "model.teacher_steps=2"]
    trainer = train_run(compose_config("train", [*overrides, "run_name=student", "trainer.max_steps=2"]))
    module = trainer.lightning_module
    assert module.student_timesteps == [1000.0, 667.0, 334.0, 1.0]  # FlowMatchEuler's 4 steps (1 and 2 are among them)
    assert isinstance(module.student_scheduler(), FlowMatchEulerDiscreteScheduler)
    teacher = load_denoiser(flow_ckpt).net.state_dict()
    assert any(not torch.equal(value, teacher[name]) for name, value in module.net.state_dict().items())
    assert all(torch.isfinite(value) for key, value in trainer.callback_metrics.items() if key.startswith("train/"))
    ckpt = Path(tmp_path / "student" / "checkpoints" / "last.ckpt")
    meta = load_checkpoint_file(ckpt)["lightdiff"]
    assert meta["objective"]["name"] == "flow_matching" and meta["scheduler_overrides"] == {}
    one_step = sample_run(
        compose_config(
            "sample", [f"ckpt={ckpt}", f"out={tmp_path / 's'}", "sampler=flow_euler", "steps=1", "num_images=2"]
        )
    )
    assert _pixels(one_step).shape == (2, 16, 16, 3)
    with pytest.raises(ConfigError, match="model.student_timesteps is for DDPM teachers"):
        train_run(compose_config("train", [*overrides, "run_name=bad", "model.student_timesteps=[999]"]))


def test_training_example_of_each_objective_matches_its_closed_form() -> None:
    torch.manual_seed(0)
    x0, noise = torch.randn(6, 3, 4, 4), torch.randn(6, 3, 4, 4)
    schedule = NoiseSchedule(beta_schedule="linear")
    alphas_cumprod = schedule.alphas_cumprod().float()
    flow = FlowMatching(shift=3.0).training_example(x0, noise)
    t = (flow.timesteps / 1000).view(-1, 1, 1, 1)
    torch.testing.assert_close(flow.x_t, (1 - t) * x0 + t * noise)
    torch.testing.assert_close(flow.target, noise - x0)
    assert torch.equal(flow.weight, torch.ones(6)) and bool(((t > 0) & (t < 1)).all())
    ddpm = DDPM(schedule, "v_prediction", "min_snr", 5.0).training_example(x0, noise)
    assert ddpm.timesteps.dtype == torch.int64 and int(ddpm.timesteps.max()) < 1000
    alpha_bar = alphas_cumprod[ddpm.timesteps].view(-1, 1, 1, 1)
    torch.testing.assert_close(ddpm.x_t, alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise)
    torch.testing.assert_close(ddpm.target, alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0)
    snr = alpha_bar.flatten() / (1 - alpha_bar.flatten())
    torch.testing.assert_close(ddpm.weight, torch.clamp(snr, max=5.0) / (snr + 1))  # min-SNR for v (Hang et al.)
