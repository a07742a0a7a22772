"""DMD2 (model=dmd2): a few offline steps on a text teacher that keep it bit-identical and move the student, the
fake-score network and its classifier; the two time-scale rhythm; the export that plain diffusers reproduces."""

from pathlib import Path

import pytest
import torch
from diffusers import LCMScheduler, StableDiffusionPipeline

from lightdiff.config import ConfigError
from lightdiff.methods.teacher import load_teacher
from lightdiff.sample import run as sample_run
from lightdiff.train import run as train_run
from lightdiff.trained import load_checkpoint_file

from .conftest import TINY, assert_reproduced, compose_config, pipeline_images, sample_py_images


def _dmd2(root: Path, teacher: Path, *extra: str) -> list[str]:
    return [f"output_root={root}", *TINY, "model=dmd2", f"model.teacher={teacher}", "model.teacher_steps=2", *extra]


@pytest.fixture(scope="module")
def dmd2_run(text_ckpt: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("dmd2")
    # fake_updates=2: batch 0 steps the student and the fake network, batch 1 the fake network only (3 steps).
    cfg = compose_config(
        "train", _dmd2(root, text_ckpt, "run_name=dmd2", "trainer.max_steps=3", "model.fake_updates=2")
    )
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


def test_dmd2_refuses_what_it_cannot_sample(text_ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"student_timesteps=\[999, 500\]: the student samples with LCMScheduler"):
        train_run(compose_config("train", _dmd2(tmp_path, text_ckpt, "model.student_timesteps=[999,500]")))
    with pytest.raises(ConfigError, match=r"model.fake_updates=0 does not fit .*: int, a finite number >= 1"):
        train_run(compose_config("train", _dmd2(tmp_path, text_ckpt, "model.fake_updates=0")))


def test_dmd2_resume_is_bit_identical_and_keeps_the_update_rhythm(text_ckpt: Path, tmp_path: Path) -> None:
    """3 optimiser steps, stop, resume to 6 == 6 at once (student, fake network, classifier, optimisers). Negative
    control: a resume that forgets how many batches it has seen updates the student on other batches, and differs."""
    base = _dmd2(tmp_path, text_ckpt, "model.fake_updates=2")

    def final_state(name: str, *steps: int, forget_batches: bool = False) -> dict:
        for index, max_steps in enumerate(steps):
            if forget_batches and index > 0:
                path = tmp_path / name / "checkpoints" / "last.ckpt"
                checkpoint = torch.load(path, weights_only=True)
                checkpoint["state_dict"]["batches_seen"].fill_(1)  # off by one: the student's turn moves
                torch.save(checkpoint, path)
            train_run(compose_config("train", [*base, f"run_name={name}", f"trainer.max_steps={max_steps}"]))
        return load_checkpoint_file(tmp_path / name / "checkpoints" / "last.ckpt")

    expected, resumed = final_state("full", 6), final_state("part", 3, 6)
    assert resumed["global_step"] == expected["global_step"] == 6
    for key, value in expected["state_dict"].items():  # tensors, and the text family's tokenizer (extra state)
        other = resumed["state_dict"][key]
        assert torch.equal(value, other) if torch.is_tensor(value) else value == other, key
    for expected_optimizer, resumed_optimizer in zip(expected["optimizer_states"], resumed["optimizer_states"]):
        for index, moments in expected_optimizer["state"].items():
            assert all(torch.equal(v, resumed_optimizer["state"][index][k]) for k, v in moments.items())
    forgetful = final_state("forgetful", 3, 6, forget_batches=True)
    student = [key for key in expected["state_dict"] if key.startswith("net.")]
    assert any(not torch.equal(expected["state_dict"][key], forgetful["state_dict"][key]) for key in student)
