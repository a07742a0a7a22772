"""DMD2 (model=dmd2): a few offline steps on a text teacher that keep it bit-identical and move the student, the
fake-score network and its classifier; the two time-scale rhythm; the export that plain diffusers reproduces."""

import shutil
from pathlib import Path

import pytest
import torch
from diffusers import LCMScheduler, StableDiffusionPipeline

from lightdiff.config import ConfigError, build
from lightdiff.diffusion import distribution_matching_gradient, distribution_matching_loss
from lightdiff.methods.teacher import load_teacher
from lightdiff.nets.denoiser import network_output
from lightdiff.sample import run as sample_run
from lightdiff.train import run as train_run
from lightdiff.trained import load_checkpoint_file

from .conftest import TINY, assert_reproduced, compose_config, pipeline_images, sample_py_images

# ----- the distribution-matching gradient against a closed form ----------------------------------------------------


def _posterior_mean(x_t: torch.Tensor, mean: float, spread: float, alpha: float, sigma: float) -> torch.Tensor:
    """E[x_0 | x_t] for x_0 ~ N(mean, spread^2), x_t = alpha x_0 + sigma eps: what an ideal score network predicts."""
    return mean + alpha * spread**2 / (alpha**2 * spread**2 + sigma**2) * (x_t - alpha * mean)


def _marginal_score(x_t: torch.Tensor, mean: float, spread: float, alpha: float, sigma: float) -> torch.Tensor:
    """grad log p_t(x_t) of the noised Gaussian N(alpha mean, alpha^2 spread^2 + sigma^2)."""
    return -(x_t - alpha * mean) / (alpha**2 * spread**2 + sigma**2)


def _moves_toward_the_data(flip: bool) -> bool:
    """G = N(mu, 1) with a learnable mu at 2, the data N(-1, 1), ideal real and fake scores: a few steps of the
    matching loss (its gradient negated with `flip`) bring mu closer to the data's mean."""
    torch.manual_seed(0)
    mu, spread, data_mean, alpha, sigma = torch.tensor(2.0, requires_grad=True), 1.0, -1.0, 0.8, 0.6
    optimizer = torch.optim.SGD([mu], lr=0.5)
    for _ in range(5):
        x0 = mu + spread * torch.randn(64, 1, 4, 4)
        with torch.no_grad():
            x_t = alpha * x0 + sigma * torch.randn_like(x0)
            real = _posterior_mean(x_t, data_mean, spread, alpha, sigma)
            fake = _posterior_mean(x_t, mu.item(), spread, alpha, sigma)
            gradient = distribution_matching_gradient(x0, real, fake)
        optimizer.zero_grad()
        distribution_matching_loss(x0, -gradient if flip else gradient).backward()
        optimizer.step()
    return abs(mu.item() - data_mean) < 2.5  # it started 3 away


def test_the_matching_gradient_is_the_score_difference_and_moves_g_toward_the_data() -> None:
    """DMD's gradient (Equation 7) for Gaussians, where the scores are known: times its normaliser and alpha /
    sigma^2 it is s_fake - s_real at x_t exactly, and descending it moves G's mean toward the data's."""
    alpha, sigma, spread, data_mean, g_mean = 0.8, 0.6, 1.0, -1.0, 2.0
    x0 = g_mean + spread * torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    x_t = alpha * x0 + sigma * torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    real = _posterior_mean(x_t, data_mean, spread, alpha, sigma)
    fake = _posterior_mean(x_t, g_mean, spread, alpha, sigma)
    gradient = distribution_matching_gradient(x0, real, fake)
    normaliser = (x0 - real).abs().flatten(1).mean(dim=1)[:, None, None, None]
    score_difference = _marginal_score(x_t, g_mean, spread, alpha, sigma) - _marginal_score(
        x_t, data_mean, spread, alpha, sigma
    )
    torch.testing.assert_close(gradient * normaliser * alpha / sigma**2, score_difference)
    # The loss hands exactly that gradient (over the element count) back to the samples.
    samples = x0.clone().requires_grad_(True)
    distribution_matching_loss(samples, gradient).backward()
    torch.testing.assert_close(samples.grad, gradient / gradient.numel())
    assert _moves_toward_the_data(flip=False)
    assert not _moves_toward_the_data(flip=True)  # negative control: the sign flipped moves G away


def _dmd2(root: Path, teacher: Path, *extra: str) -> list[str]:
    return [f"output_root={root}", *TINY, "model=dmd2", f"model.teacher={teacher}", "model.teacher_steps=2", *extra]


@pytest.fixture(scope="module")
def dmd2_run(text_ckpt: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("dmd2")
    # fake_updates=2: batch 0 steps the student and the fake network, batch 1 the fake network only (3 steps).
    # A 4-step student (the default is 1): its backward simulation and its exports at 1 and 2 steps.
    common = ["run_name=dmd2", "trainer.max_steps=3", "model.fake_updates=2", "model.regression_pairs=4"]
    cfg = compose_config("train", _dmd2(root, text_ckpt, *common, "model.student_steps=4"))
    return train_run(cfg).lightning_module, Path(cfg.run_dir)


def test_dmd2_keeps_the_teacher_and_trains_student_fake_network_and_classifier(text_ckpt: Path, dmd2_run) -> None:
    module, run_dir = dmd2_run
    teacher = load_teacher(str(text_ckpt)).net.state_dict()
    assert all(torch.equal(value, teacher[name]) for name, value in module.teacher.net.state_dict().items())
    student, fake = module.net.state_dict(), module.fake_net.state_dict()
    assert any(not torch.equal(student[name], value) for name, value in teacher.items())
    assert any(not torch.equal(fake[name], value) for name, value in teacher.items())
    assert module.classifier.backbone.unet is module.fake_net  # the GAN term reads the fake network's bottleneck
    assert int(module.batches_seen) == 2  # two batches: the student stepped on the first only
    # Two time-scale rule: 1 student update per fake_updates=2 fake-network updates (AdamW's per-parameter steps).
    student_optimizer, fake_optimizer = (optimizer.optimizer for optimizer in module.optimizers())
    assert student_optimizer.state[next(module.net.parameters())]["step"].item() == 1
    assert fake_optimizer.state[next(module.fake_net.parameters())]["step"].item() == 2
    # The classifier's heads are in the fake optimiser and received gradients at both its steps: they moved.
    heads = module.classifier.head_parameters()
    assert heads and all(fake_optimizer.state[p]["step"].item() == 2 for p in heads)
    assert all(fake_optimizer.state[p]["exp_avg"].abs().sum() > 0 for p in heads)
    checkpoint = load_checkpoint_file(run_dir / "checkpoints" / "last.ckpt")
    assert not any(k.startswith(("teacher.", "classifier.backbone.unet.")) for k in checkpoint["state_dict"])
    assert any(k.startswith("fake_net.") for k in checkpoint["state_dict"])
    assert checkpoint["lightdiff"]["sampler"] == "LCMScheduler"


@pytest.mark.parametrize("steps", [1, 2])
def test_dmd2_export_is_reproduced_by_stable_diffusion_pipeline(dmd2_run, tmp_path: Path, steps: int) -> None:
    _, run_dir = dmd2_run
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    folder = sample_run(compose_config("sample", [f"ckpt={checkpoint}", f"export={tmp_path / 'dmd2'}"]))
    pipeline = StableDiffusionPipeline.from_pretrained(folder)
    assert isinstance(pipeline.scheduler, LCMScheduler)
    pipeline.scheduler.set_timesteps(4)
    assert pipeline.scheduler.timesteps.tolist() == [999, 749, 499, 249]  # the student's timesteps
    ours = sample_py_images(checkpoint, tmp_path / "ours", f"steps={steps}", "prompt=a red circle", "guidance_scale=1")
    theirs = pipeline_images(pipeline, ["a red circle"] * 2, num_inference_steps=steps, guidance_scale=1.0)
    assert_reproduced(ours, theirs)


def test_the_default_is_the_one_step_recipe_the_distillation_study_chose(text_ckpt: Path, tmp_path: Path) -> None:
    """`model=dmd2 model.teacher=...` and nothing else is experiments/distillation's 1-step recipe: a student at T - 1
    only, DMD's regression pairs at the paper's 0.25 (1024 of them), both rates 1e-4; a 4-step student is one key."""
    cfg = compose_config("train", [f"output_root={tmp_path}", *TINY, "model=dmd2", f"model.teacher={text_ckpt}"])
    module = build(cfg.model, data=build(cfg.data))
    assert module.student_timesteps == [999] and module.metric_steps == [1]
    assert (module.regression_weight, module.regression_pairs) == (0.25, 1024)
    assert (module.lr, module.fake_lr) == (1e-4, 1e-4)
    cfg = compose_config("train", [*_dmd2(tmp_path, text_ckpt, "model.student_steps=4")])
    assert build(cfg.model, data=build(cfg.data)).student_timesteps == [999, 749, 499, 249]


def test_dmd2_refuses_what_it_cannot_sample(text_ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"student_timesteps=\[999, 500\]: the student samples with LCMScheduler"):
        train_run(compose_config("train", _dmd2(tmp_path, text_ckpt, "model.student_timesteps=[999,500]")))
    with pytest.raises(ConfigError, match=r"model.student_steps=2 and model.student_timesteps=\[999\] disagree"):
        train_run(
            compose_config(
                "train", _dmd2(tmp_path, text_ckpt, "model.student_steps=2", "model.student_timesteps=[999]")
            )
        )
    with pytest.raises(ConfigError, match=r"model.fake_updates=0 does not fit .*: int, a finite number >= 1"):
        train_run(compose_config("train", _dmd2(tmp_path, text_ckpt, "model.fake_updates=0")))


@pytest.mark.parametrize("regression", [0.0, 0.25])
def test_dmd2_resume_is_bit_identical_and_keeps_the_update_rhythm(
    text_ckpt: Path, tmp_path: Path, regression: float
) -> None:
    """3 optimiser steps, stop, resume to 6 == 6 at once (student, fake network, classifier, optimisers), with and
    without DMD's regression pairs (drawn again on resume from their own seeds, leaving the run's random stream as it
    was). Negative control: a resume that forgets how many batches it has seen updates the student on other batches,
    and differs."""
    extra = [f"model.regression_weight={regression}", "model.regression_pairs=4"]
    base = _dmd2(tmp_path, text_ckpt, "model.fake_updates=2", *extra)

    def final_state(name: str, *steps: int) -> dict:
        for max_steps in steps:
            train_run(compose_config("train", [*base, f"run_name={name}", f"trainer.max_steps={max_steps}"]))
            if name == "part" and max_steps == 3:  # the negative control resumes from the same 3 steps
                shutil.copytree(tmp_path / name, tmp_path / "forgetful")
        return load_checkpoint_file(tmp_path / name / "checkpoints" / "last.ckpt")

    expected, resumed = final_state("full", 6), final_state("part", 3, 6)
    assert resumed["global_step"] == expected["global_step"] == 6
    for key, value in expected["state_dict"].items():  # tensors, and the text family's tokenizer (extra state)
        other = resumed["state_dict"][key]
        assert torch.equal(value, other) if torch.is_tensor(value) else value == other, key
    for expected_optimizer, resumed_optimizer in zip(expected["optimizer_states"], resumed["optimizer_states"]):
        for index, moments in expected_optimizer["state"].items():
            assert all(torch.equal(v, resumed_optimizer["state"][index][k]) for k, v in moments.items())
    path = tmp_path / "forgetful" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["state_dict"]["batches_seen"].fill_(1)  # off by one: the student's turn moves
    torch.save(checkpoint, path)
    forgetful = final_state("forgetful", 6)
    student = [key for key in expected["state_dict"] if key.startswith("net.")]
    assert any(not torch.equal(expected["state_dict"][key], forgetful["state_dict"][key]) for key in student)


# ----- DMD's regression loss on the teacher's noise-image pairs ------------------------------------------------------


def test_regression_pairs_are_the_teachers_deterministic_map_seed_by_seed(dmd2_run, monkeypatch) -> None:
    """Each pair (z_i, y_i) is seed i's noise and where the teacher's guided DDIM lands from it on prompt i, drawn
    alone: the chunks (3 pairs here) keep seed, noise and prompt together. Control: another prompt lands elsewhere."""
    from lightdiff.methods import dmd2
    from lightdiff.sampling import generate

    module, _ = dmd2_run
    monkeypatch.setattr(dmd2, "REGRESSION_CHUNK", 3)
    monkeypatch.setattr(module, "regression_pairs", 5)
    pairs = module.draw_regression_pairs()
    teacher = module.teacher
    shape = pairs.noise.shape[1:]
    assert pairs.noise.shape == pairs.images.shape == (5, *shape) and len(set(pairs.inputs["text"])) > 1

    def alone(seed: int, prompt: str) -> torch.Tensor:
        return generate(
            teacher.net,
            teacher.scheduler(teacher.objective.default_sampler),
            module.teacher_steps,
            [seed],
            teacher.conditioning,
            {"label": None, "text": [prompt]},
            teacher.guidance_scale,
            vae=teacher.vae,
            size=(teacher.resolution, teacher.resolution),
            decode=False,
        )[0]

    for i, prompt in enumerate(pairs.inputs["text"]):
        seed = dmd2.REGRESSION_SEED + i
        torch.testing.assert_close(pairs.noise[i], torch.randn(shape, generator=torch.Generator().manual_seed(seed)))
        torch.testing.assert_close(pairs.images[i], alone(seed, prompt), atol=1e-5, rtol=1e-5)
    other = next(p for p in pairs.inputs["text"] if p != pairs.inputs["text"][0])
    assert (pairs.images[0] - alone(dmd2.REGRESSION_SEED, other)).abs().max() > 1e-3


def test_regression_loss_is_the_squared_distance_of_g_from_the_pairs(dmd2_run) -> None:
    """With y = G(z) + c the loss is c^2 exactly (its per-element mean); c = 0 gives 0 (the control)."""
    from lightdiff.methods.dmd2 import RegressionPairs

    module, _ = dmd2_run
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))  # the tiny teacher's latents
    inputs = {"label": None, "text": ["a red circle", "a blue square", "a red circle"]}
    with torch.no_grad():
        t = torch.full((3,), module.student_timesteps[0])
        g = module.student_x0(noise, t, module.conditioning(inputs))
    for offset in (0.5, 0.0):
        module.pairs = RegressionPairs(noise, g + offset, inputs)
        with torch.no_grad():
            loss = module.regression_loss(6)  # picks rows at random: every row is off by the same c
        assert loss.item() == pytest.approx(offset**2, abs=1e-6)
    module.pairs = None


def test_regression_pulls_the_student_onto_the_teachers_pairs(text_ckpt: Path, tmp_path: Path) -> None:
    """A few student updates with lambda_reg = 10 bring G(z) closer to the teacher's images for its pairs' noises than
    the same updates without it (the control: matching and GAN terms alone), from the same start."""
    common = ["model.fake_updates=1", "model.lr=1e-2", "model.regression_pairs=8", "trainer.max_steps=8"]

    def distance(weight: float) -> tuple[float, float]:
        args = _dmd2(tmp_path, text_ckpt, *common, f"model.regression_weight={weight}", f"run_name=reg{weight}")
        module = train_run(compose_config("train", args)).lightning_module
        pairs = module.pairs if module.pairs is not None else module.draw_regression_pairs()
        with torch.no_grad():
            condition = module.conditioning(pairs.inputs)
            t = torch.full((len(pairs),), module.student_timesteps[0])
            trained = (module.student_x0(pairs.noise, t, condition) - pairs.images).square().mean().item()
            start = module.objective.predicted_x0(
                network_output(module.teacher.net, pairs.noise, t, condition), pairs.noise, t
            )
        return trained, (start - pairs.images).square().mean().item()

    with_regression, start = distance(10.0)
    without, start_again = distance(0.0)
    assert start == pytest.approx(start_again)
    # measured: 12.5 with, 18.8 without, from 14.9
    assert with_regression < 0.9 * start and with_regression < 0.75 * without


def test_regression_refuses_a_few_step_teacher(dmd2_run, tmp_path: Path) -> None:
    """A DMD2 student re-noises at every step: its images are no function of the noise (no pairs to regress on)."""
    _, run_dir = dmd2_run
    args = _dmd2(tmp_path, run_dir / "checkpoints" / "last.ckpt", "model.regression_weight=0.25")
    with pytest.raises(ConfigError, match=r"model.regression_weight=0.25: model.teacher=.* is a few-step student"):
        train_run(compose_config("train", args))


def test_re_noising_with_the_implied_noise_is_the_deterministic_samplers_step() -> None:
    """x_0 re-noised to the next timestep with the noise x_t implies (`ddim_step`, a flow DMD2 student's backward
    simulation) is DDIM's eta-0 step (epsilon network) and FlowMatchEuler's step (velocity network), as diffusers
    computes them; fresh noise (the control, a DDPM student's) is not."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    from lightdiff.diffusion import DDPM, FlowMatching, NoiseSchedule
    from lightdiff.diffusion.consistency import ddim_step
    from lightdiff.sampling import reconfigured

    generator = torch.Generator().manual_seed(0)
    x_t, output = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    ddpm, flow = DDPM(NoiseSchedule(beta_schedule="scaled_linear")), FlowMatching(shift=3.0)
    ddim = reconfigured(ddpm.scheduler(DDIMScheduler), {"timestep_spacing": "trailing", "clip_sample": False})
    for objective, scheduler in ((ddpm, ddim), (flow, flow.scheduler(FlowMatchEulerDiscreteScheduler))):
        scheduler.set_timesteps(4)
        t, t_next = scheduler.timesteps[1], scheduler.timesteps[2]
        expected = scheduler.step(output, t, x_t).prev_sample  # (the step index follows from t)
        now, later = torch.full((2,), float(t)), torch.full((2,), float(t_next))
        x0 = objective.predicted_x0(output, x_t, now)
        ours = ddim_step(x0, x_t, objective.alpha_sigma(now), objective.alpha_sigma(later))
        torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)
        fresh = objective.noised(x0, torch.randn(x0.shape, generator=generator), later)
        assert (fresh - expected).abs().max() > 0.1
