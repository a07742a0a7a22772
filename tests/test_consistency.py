"""LCM (model=lcm): its math against diffusers' LCMScheduler and pipeline, a few offline steps that keep the teacher
bit-identical, and an export that plain diffusers' LatentConsistencyModelPipeline reproduces."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import LatentConsistencyModelPipeline, LCMScheduler

from lightdiff.config import ConfigError
from lightdiff.diffusion import DDPM, NoiseSchedule
from lightdiff.diffusion.consistency import boundary_scalings, ddim_step, pseudo_huber, solver_timesteps
from lightdiff.methods.teacher import load_teacher
from lightdiff.nets.families.sd import guidance_scale_embedding
from lightdiff.sample import run as sample_run
from lightdiff.train import run as train_run
from lightdiff.trained import load_checkpoint_file

from .conftest import TINY, assert_reproduced, compose_config, pipeline_images, sample_py_images

COSINE = DDPM(NoiseSchedule("squaredcos_cap_v2", 1000))


def test_solver_grid_and_boundary_scalings_are_lcm_schedulers() -> None:
    scheduler = LCMScheduler(original_inference_steps=50)
    scheduler.set_timesteps(50)
    assert sorted(scheduler.timesteps.tolist()) == solver_timesteps(1000, 50) == list(range(19, 1000, 20))
    t = torch.tensor([0, 19, 499, 999])
    c_skip, c_out = boundary_scalings(t, timestep_scaling=10.0)
    for index, step in enumerate(t.tolist()):
        expected = scheduler.get_scalings_for_boundary_condition_discrete(step)
        assert (c_skip[index].item(), c_out[index].item()) == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert c_skip[0] == 1 and c_out[0] == 0  # the boundary condition f(x, 0) = x


def test_guidance_embedding_is_the_pipelines() -> None:
    w = torch.tensor([0.0, 1.5, 7.0])
    theirs = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=256)
    torch.testing.assert_close(guidance_scale_embedding(w, 256), theirs)
    assert guidance_scale_embedding(w, 7).shape == (3, 7)


def test_ddim_step_from_the_true_x0_keeps_the_noise_and_huber_by_hand() -> None:
    torch.manual_seed(0)
    x0, noise = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    t, t_prev = torch.tensor([519, 999]), torch.tensor([499, 979])
    x_t = COSINE.noised(x0, noise, t)
    stepped = ddim_step(x0, x_t, COSINE.alpha_sigma(t), COSINE.alpha_sigma(t_prev))
    torch.testing.assert_close(stepped, COSINE.noised(x0, noise, t_prev), atol=1e-4, rtol=1e-4)
    # (a - b) = 0, 3, 4 with c = 1: sqrt(1) - 1 = 0, sqrt(10) - 1, sqrt(17) - 1; their mean
    value = pseudo_huber(torch.tensor([0.0, 3.0, 4.0]), torch.zeros(3), 1.0).item()
    assert value == pytest.approx((0 + 10**0.5 - 1 + 17**0.5 - 1) / 3)


def _lcm(root: Path, teacher: Path, *extra: str) -> list[str]:
    return [f"output_root={root}", *TINY, "model=lcm", f"model.teacher={teacher}", "model.teacher_steps=2", *extra]


@pytest.fixture(scope="module")
def lcm_run(text_ckpt: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("lcm")
    cfg = compose_config("train", _lcm(root, text_ckpt, "run_name=lcm", "trainer.max_steps=3"))
    return train_run(cfg).lightning_module, Path(cfg.run_dir) / "checkpoints" / "last.ckpt"


def test_lcm_trains_the_student_only_and_keeps_the_teacher_bit_identical(text_ckpt: Path, lcm_run) -> None:
    module, checkpoint = lcm_run
    reference = load_teacher(str(text_ckpt))
    teacher = reference.net.state_dict()
    for name, value in module.teacher.net.state_dict().items():
        assert torch.equal(value, teacher[name]), name
    for part in ("vae", "conditioning"):  # frozen VAE and text encoder: bit-identical too
        theirs = getattr(reference, part).state_dict()
        assert all(
            torch.equal(v, theirs[k])
            for k, v in getattr(module.teacher, part).state_dict().items()
            if torch.is_tensor(v)
        )
    student = module.net.state_dict()
    assert module.net.config.time_cond_proj_dim == 256 and module.teacher.net.config.time_cond_proj_dim is None
    assert any(not torch.equal(student[name], value) for name, value in teacher.items())  # the student moved
    assert student["time_embedding.cond_proj.weight"].abs().sum() > 0  # the guidance input was learnt from zero
    # The target network is an average between the student and its start: neither of them.
    target = module.target_net.state_dict()
    moved = [name for name in teacher if not torch.equal(student[name], teacher[name])]
    assert all(not torch.equal(target[name], student[name]) for name in moved[:5])
    meta = load_checkpoint_file(checkpoint)
    assert meta["lightdiff"]["sampler"] == "LCMScheduler"
    assert meta["lightdiff"]["conditioning"]["family"] == "guidance_embedded"
    assert not any(key.startswith("teacher.") for key in meta["state_dict"])  # reloaded from model.teacher


def test_lcm_student_starts_as_the_teacher(text_ckpt: Path, tmp_path: Path) -> None:
    """Zero-initialised guidance input: at step 0 the student's output is the teacher's, whatever the scale."""
    from lightdiff.nets.denoiser import network_output
    from lightdiff.nets.families.sd import unet_with_guidance_input

    teacher = load_teacher(str(text_ckpt))
    student = unet_with_guidance_input(teacher.net, 256)
    condition = teacher.conditioning({"text": ["a red circle", "a blue square"]})
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 300])
    expected = network_output(teacher.net, x, t, condition)
    with_guidance = dict(condition.kwargs, timestep_cond=guidance_scale_embedding(torch.tensor([3.0, 7.0]), 256))
    torch.testing.assert_close(student(x, t, **with_guidance).sample, expected)


@pytest.mark.parametrize("steps", [1, 2])
def test_lcm_export_is_reproduced_by_latent_consistency_pipeline(lcm_run, tmp_path: Path, steps: int) -> None:
    _, checkpoint = lcm_run
    folder = sample_run(compose_config("sample", [f"ckpt={checkpoint}", f"export={tmp_path / 'lcm'}"]))
    pipeline = LatentConsistencyModelPipeline.from_pretrained(folder)
    assert isinstance(pipeline.scheduler, LCMScheduler)
    ours = sample_py_images(checkpoint, tmp_path / "ours", f"steps={steps}", "prompt=a red circle", "guidance_scale=3")
    theirs = pipeline_images(pipeline, ["a red circle"] * 2, num_inference_steps=steps, guidance_scale=3.0)
    assert_reproduced(ours, theirs)
    # The guidance scale is the student's input: another scale gives other images (the comparison can fail).
    other = pipeline_images(pipeline, ["a red circle"] * 2, num_inference_steps=steps, guidance_scale=7.0)
    assert np.abs(other - theirs).max() > 0


def test_lcm_refuses_teachers_without_text(class_ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model=lcm distils a text-conditioned UNet"):
        train_run(compose_config("train", _lcm(tmp_path, class_ckpt)))
    with pytest.raises(ConfigError, match="model.guidance_scale_min=9 and model.guidance_scale_max=8.0 must satisfy"):
        train_run(compose_config("train", _lcm(tmp_path, class_ckpt, "model.guidance_scale_min=9")))
