"""Turbo (ADD / LADD): distillation math against closed forms, frozen parts, optimiser separation, sampling, export."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler
from PIL import Image
from transformers import Dinov2Model

from lightdiff.config import ConfigError
from lightdiff.diffusion import DDPM, NoiseSchedule, distillation_distance, distillation_weight, trailing_timesteps
from lightdiff.diffusion.adversarial import hinge_discriminator_loss, r1_penalty
from lightdiff.methods.teacher import load_teacher
from lightdiff.nets.feature_discriminator import UNetEncoderFeatures
from lightdiff.sample import run as sample_run
from lightdiff.train import run as train_run
from lightdiff.trained import load_checkpoint_file, load_denoiser

from .conftest import TINY, assert_discriminator_heads_learnt, compose_config, tiny_dinov2_overrides

OBJECTIVE = DDPM(NoiseSchedule("linear", 1000, 1e-4, 0.02))
ALPHAS_CUMPROD = OBJECTIVE.alphas_cumprod


def test_student_timesteps_are_diffusers_trailing_steps() -> None:
    scheduler = DDIMScheduler(timestep_spacing="trailing")
    for count in (1, 2, 4):
        scheduler.set_timesteps(count)
        assert trailing_timesteps(1000, count) == scheduler.timesteps.tolist()
    assert trailing_timesteps(1000, 4) == [999, 749, 499, 249]


def test_distillation_weights_closed_forms() -> None:
    t = torch.tensor([0, 499, 999])
    alpha_bar = ALPHAS_CUMPROD[t]
    alpha, sigma = OBJECTIVE.alpha_sigma(t)
    torch.testing.assert_close(distillation_weight("alpha_bar", alpha, sigma), alpha_bar)
    torch.testing.assert_close(distillation_weight("sds", alpha, sigma), (alpha_bar * (1 - alpha_bar)).sqrt() / 2)
    assert torch.equal(distillation_weight("none", alpha, sigma), torch.ones(3))
    with pytest.raises(ValueError, match="distill_weighting='sdss'"):
        distillation_weight("sdss", alpha, sigma)


def test_sds_weighting_gives_the_score_distillation_gradient() -> None:
    """grad of c(t) ||x_s - x_teacher||^2 equals SDS's w(t) (eps_teacher - eps) with w = sigma^2 (DreamFusion)."""
    torch.manual_seed(0)
    t = torch.tensor([300])
    x_student = torch.randn(1, 3, 4, 4, requires_grad=True)
    eps, eps_teacher = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    x_t = ALPHAS_CUMPROD[t].sqrt() * x_student.detach() + (1 - ALPHAS_CUMPROD[t]).sqrt() * eps
    x_teacher = OBJECTIVE.predicted_x0(eps_teacher, x_t, t)
    loss = distillation_weight("sds", *OBJECTIVE.alpha_sigma(t)) * (x_student - x_teacher).pow(2).sum()
    (gradient,) = torch.autograd.grad(loss, x_student)
    sds = (1 - ALPHAS_CUMPROD[t]) * (eps_teacher - eps)
    torch.testing.assert_close(gradient, sds, atol=1e-5, rtol=1e-4)


def test_hinge_and_r1_against_hand_computed_values() -> None:
    real, fake = torch.tensor([[0.5, 2.0]]), torch.tensor([[-0.5, 1.0]])
    # real: relu(1 - [0.5, 2]) = [0.5, 0] -> 0.25; fake: relu(1 + [-0.5, 1]) = [0.5, 2] -> 1.25; half the sum: 0.75
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(0.75)
    features = [torch.randn(2, 3, requires_grad=True), torch.randn(2, 1, 2, 2, requires_grad=True)]
    weights = torch.tensor([1.0, -2.0, 3.0])
    logits = (features[0] * weights).sum(dim=1) + 0.5 * features[1].flatten(1).sum(dim=1)
    # d logits / d features = weights and 0.5 everywhere: |w|^2 + 4 x 0.25 = 14 + 1 = 15 per sample
    assert r1_penalty(logits, features).item() == pytest.approx(15.0)


def test_distillation_distance_is_adds_squared_norm_per_sample() -> None:
    student = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])  # (2, 1, 2, 2)
    teacher = torch.tensor([[[[0.0, 2.0], [1.0, 4.0]]], [[[1.0, 1.0], [1.0, -1.0]]]])
    weight = torch.tensor([0.5, 2.0])
    # sample 0: ||(1, 0, 2, 0)||^2 = 5, x 0.5 = 2.5; sample 1: ||(-1, -1, -1, 1)||^2 = 4, x 2 = 8; mean 5.25
    assert distillation_distance(student, teacher, weight).item() == pytest.approx(5.25)
    # Not a per-element mean (which would give 5.25 / 4): lambda = 2.5 is ADD's lambda on this scale.
    doubled = torch.cat([student, student], dim=1), torch.cat([teacher, teacher], dim=1)
    assert distillation_distance(*doubled, weight).item() == pytest.approx(10.5)


@pytest.mark.parametrize(
    ("schedule", "teacher", "student"),
    [
        (NoiseSchedule("linear", 1000, 1e-4, 0.02), "epsilon", "v_prediction"),  # 1 / alpha_999 = 157
        (NoiseSchedule("squaredcos_cap_v2", 1000), "epsilon", "v_prediction"),  # 20000
        (NoiseSchedule("scaled_linear", 1000, 0.00085, 0.012), "epsilon", "epsilon"),  # 15: SD(XL)-Turbo's choice
        (NoiseSchedule("linear", 1000, 1e-4, 0.02), "v_prediction", "v_prediction"),
        (NoiseSchedule("linear", 1000, 1e-4, 0.02), "sample", "sample"),
    ],
)
def test_default_student_prediction_is_well_conditioned_at_the_first_step(
    schedule: NoiseSchedule, teacher: str, student: str
) -> None:
    objective = DDPM(schedule, prediction_type=teacher)
    assert objective.with_prediction_type(None).prediction_type == student
    assert objective.with_prediction_type("sample").prediction_type == "sample"  # an explicit choice stands


@pytest.fixture(scope="module")
def teacher_ckpt(class_ckpt: Path) -> Path:
    """The class-conditional teacher (conftest's, trained once per session)."""
    return class_ckpt


def _turbo(root: Path, teacher: Path, *extra: str) -> list[str]:
    return [f"output_root={root}", *TINY, "model=turbo", f"model.teacher={teacher}", "model.teacher_steps=2", *extra]


@pytest.fixture(scope="module")
def student_run(teacher_ckpt: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("student")
    metrics = ["metrics=fid", "metrics/features=random_conv", "metrics.every_n_steps=0", "metrics.num_samples=8"]
    metrics += ["metrics.batch_size=8", "metrics.cache_dir=null"]
    cfg = compose_config("train", _turbo(root, teacher_ckpt, "run_name=student", "trainer.max_steps=4", *metrics))
    return train_run(cfg), Path(cfg.run_dir)


def test_losses_discriminator_numbers_and_fid_at_1_2_4_steps_are_logged(student_run) -> None:
    import csv

    _, run_dir = student_run
    rows = list(csv.DictReader(next(run_dir.glob("csv/version_*/metrics.csv")).open()))
    logged = {key for row in rows for key, value in row.items() if value}
    for key in ("adversarial_loss", "distill_loss", "d_loss", "d_accuracy", "logits_real", "logits_fake", "r1"):
        assert f"train/{key}" in logged, key
    assert {"val/fid_1step", "val/fid_2steps", "val/fid_4steps", "val/shapes_both_1step"} <= logged
    accuracy = [float(row["train/d_accuracy"]) for row in rows if row.get("train/d_accuracy")]
    assert all(0 <= value <= 1 for value in accuracy)
    # each step count is judged on its own images (a copy of one number under three keys would be equal), and the R1
    # penalty is the discriminator's squared gradient norm on real data: never negative, not all zero
    fids = [
        [float(row[key]) for row in rows if row.get(key)]
        for key in ("val/fid_1step", "val/fid_2steps", "val/fid_4steps")
    ]
    assert all(values and min(values) > 0 for values in fids) and len({values[-1] for values in fids}) == 3
    r1 = [float(row["train/r1"]) for row in rows if row.get("train/r1")]
    assert min(r1) >= 0 and max(r1) > 0
    grid = next((run_dir / "samples").glob("final_step*.png"))
    assert Image.open(grid).width > 0


def test_teacher_and_frozen_backbone_are_bit_identical_student_moved(teacher_ckpt: Path, student_run) -> None:
    trainer, _ = student_run
    module = trainer.lightning_module
    reference = load_teacher(str(teacher_ckpt)).net.state_dict()
    for name, value in module.teacher.net.state_dict().items():
        assert torch.equal(value, reference[name]), name
    assert isinstance(module.discriminator.backbone, UNetEncoderFeatures)
    assert module.discriminator.backbone.unet is module.teacher.net  # LADD: the teacher is the feature network
    assert not any(p.requires_grad for p in module.teacher.parameters())
    moved = [name for name, value in module.net.state_dict().items() if not torch.equal(value, reference[name])]
    assert moved  # the student trained
    # The class-conditional teacher conditions the heads: its family's one-hot labels are projected.
    assert module.discriminator.condition_projection.in_features == 24


def test_generator_step_updates_only_the_student_and_discriminator_step_only_the_heads(
    student_run, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer, _ = student_run
    module = trainer.lightning_module
    monkeypatch.setattr(module, "log", lambda *args, **kwargs: None)
    monkeypatch.setattr(module, "log_dict", lambda *args, **kwargs: None)
    names = {id(p): n for n, p in module.named_parameters(remove_duplicate=False)}
    stepped: list[set[str]] = []
    for optimizer in module.optimizers():
        original = optimizer.optimizer.step

        def step(*args, original=original, **kwargs):
            stepped.append({names[id(p)] for p in module.parameters() if p.grad is not None})
            return original(*args, **kwargs)

        monkeypatch.setattr(optimizer.optimizer, "step", step)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    batch = next(iter(trainer.datamodule.train_dataloader()))
    module.training_step(batch, 0)
    student, discriminator = stepped
    assert student and all(name.startswith("net.") for name in student)
    assert discriminator and all(name.startswith("discriminator.") for name in discriminator)
    assert not any(name.startswith("discriminator.backbone.") for name in discriminator)  # frozen feature network
    after = dict(module.named_parameters())
    changed = {name for name, value in before.items() if not torch.equal(value, after[name])}
    assert changed and changed <= student | discriminator  # nothing outside the two optimisers moved
    assert not any(name.startswith(("teacher.", "discriminator.backbone.")) for name in changed)


def test_checkpoint_leaves_the_teacher_out_and_samples_in_one_step(student_run, tmp_path: Path) -> None:
    _, run_dir = student_run
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    checkpoint = load_checkpoint_file(ckpt)
    assert not any(k.startswith(("teacher.", "discriminator.backbone.unet.")) for k in checkpoint["state_dict"])
    assert checkpoint["lightdiff"]["method"] == "turbo"
    assert checkpoint["lightdiff"]["student_timesteps"] == [999, 749, 499, 249]

    out = sample_run(compose_config("sample", [f"ckpt={ckpt}", f"out={tmp_path / 'one'}", "num_images=3", "steps=1"]))
    ours = np.stack([np.asarray(Image.open(out / f"{i:06d}.png")) for i in range(3)])
    folder = sample_run(compose_config("sample", [f"ckpt={ckpt}", f"export={tmp_path / 'pipe'}"]))
    pipeline = DDIMPipeline.from_pretrained(folder)
    assert pipeline.scheduler.config.timestep_spacing == "trailing"
    # Plain diffusers, one step, the seeds sample.py used: labels cycle 0, 1, 2 (class-conditional teacher).
    student = load_denoiser(ckpt)
    generators = [torch.Generator().manual_seed(seed) for seed in range(3)]
    noise = torch.stack([torch.randn(3, 16, 16, generator=g) for g in generators])
    pipeline.scheduler.set_timesteps(1)
    (t,) = pipeline.scheduler.timesteps
    with torch.no_grad():
        output = pipeline.unet(noise, t, class_labels=torch.arange(3)).sample
    image = pipeline.scheduler.step(output, t, noise).prev_sample
    theirs = ((image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    assert np.abs(theirs.astype(int) - ours.astype(int)).max() <= 1  # PNG rounding
    assert student.scheduler_overrides == {"timestep_spacing": "trailing"}


def test_bad_teachers_and_timesteps_are_named(teacher_ckpt: Path, tmp_path: Path) -> None:
    autoencoder = compose_config(
        "train", [f"output_root={tmp_path}", *TINY, "model=autoencoder", "run_name=ae", "trainer.max_steps=1"]
    )
    train_run(autoencoder)
    with pytest.raises(ConfigError, match="model.teacher=.* is an autoencoder checkpoint"):
        train_run(compose_config("train", _turbo(tmp_path, Path(autoencoder.run_dir) / "checkpoints" / "last.ckpt")))
    with pytest.raises(ConfigError, match="model.teacher='nowhere/none' is neither a file"):
        train_run(compose_config("train", _turbo(tmp_path, Path("nowhere/none"))))
    with pytest.raises(ConfigError, match=r"model.student_timesteps=\[999, 1000\]: \[1000\] outside"):
        train_run(compose_config("train", _turbo(tmp_path, teacher_ckpt, "model.student_timesteps=[999,1000]")))
    missing = tmp_path / "no_dinov2"
    with pytest.raises(ConfigError, match="discriminator.backbone.model=.*no_dinov2.* cannot be loaded"):
        train_run(
            compose_config(
                "train",
                _turbo(tmp_path, teacher_ckpt, "discriminator=dinov2", f"discriminator.backbone.model={missing}"),
            )
        )


def test_epsilon_student_is_refused_where_ill_conditioned_and_the_default_predicts_v(tmp_path: Path) -> None:
    cfg = compose_config(
        "train",
        [
            f"output_root={tmp_path}",
            *TINY,
            "run_name=zsnr",
            "trainer.max_steps=1",
            "schedule.rescale_betas_zero_snr=true",
        ],
    )
    train_run(cfg)
    teacher = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError, match="zero terminal SNR.*student_prediction_type=null"):
        train_run(compose_config("train", _turbo(tmp_path, teacher, "model.student_prediction_type=epsilon")))
    # The default is a v-predicting student, well defined at T - 1: it trains, and its checkpoint says how it predicts.
    student = compose_config("train", _turbo(tmp_path, teacher, "run_name=v", "trainer.max_steps=2"))
    train_run(student)
    meta = load_checkpoint_file(Path(student.run_dir) / "checkpoints" / "last.ckpt")["lightdiff"]
    assert meta["objective"]["prediction_type"] == "v_prediction"
    assert meta["teacher_objective"]["prediction_type"] == "epsilon"


@pytest.mark.parametrize("backbone", ["dinov2", "patchgan"])
def test_other_discriminators_train(backbone: str, teacher_ckpt: Path, tmp_path: Path) -> None:
    folder = tmp_path / "tiny-dinov2"
    extra = tiny_dinov2_overrides(folder) if backbone == "dinov2" else ["discriminator=patchgan"]
    cfg = compose_config("train", _turbo(tmp_path, teacher_ckpt, f"run_name={backbone}", "trainer.max_steps=2", *extra))
    module = train_run(cfg).lightning_module
    assert_discriminator_heads_learnt(module)
    frozen_backbone = backbone == "dinov2"
    assert all(p.requires_grad != frozen_backbone for p in module.discriminator.backbone.parameters())
    trained = {id(p) for p in module.discriminator.head_parameters()}
    assert all((id(p) in trained) != frozen_backbone for p in module.discriminator.backbone.parameters())
    if frozen_backbone:  # the ViT is exactly the saved one after training steps
        saved = Dinov2Model.from_pretrained(folder).state_dict()
        assert all(torch.equal(v, saved[k]) for k, v in module.discriminator.backbone.vit.state_dict().items())


def test_latent_text_teacher_distils_and_exports(tmp_path: Path) -> None:
    """A text-conditioned latent teacher: frozen VAE and text encoder, guided teacher, text-conditioned heads."""
    from diffusers import StableDiffusionPipeline

    from .conftest import tiny_vae
    from .test_latent import _latent_overrides

    vae_dir = tmp_path / "vae"
    tiny_vae().save_pretrained(vae_dir)
    teacher_cfg = compose_config("train", _latent_overrides(tmp_path, vae_dir, "run_name=lt", "trainer.max_steps=2"))
    train_run(teacher_cfg)
    teacher = Path(teacher_cfg.run_dir) / "checkpoints" / "last.ckpt"
    cfg = compose_config("train", _turbo(tmp_path, teacher, "run_name=lt_student", "trainer.max_steps=2"))
    module = train_run(cfg).lightning_module
    assert module.discriminator.condition_projection.in_features == 16 and module.vae is not None  # text width
    reference = load_teacher(str(teacher))
    for part in ("vae", "conditioning"):
        mine, theirs = getattr(module, part).state_dict(), getattr(reference, part).state_dict()
        assert mine.keys() == theirs.keys(), part
        # frozen: every weight bit-identical (and the text family's tokenizer, its extra state, the same)
        assert all(
            torch.equal(value, theirs[name]) if torch.is_tensor(value) else value == theirs[name]
            for name, value in mine.items()
        ), part
    student = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    folder = sample_run(compose_config("sample", [f"ckpt={student}", f"export={tmp_path / 'sd'}"]))
    pipeline = StableDiffusionPipeline.from_pretrained(folder)
    assert pipeline.scheduler.config.timestep_spacing == "trailing"
    out = sample_run(
        compose_config(
            "sample",
            [
                f"ckpt={student}",
                f"out={tmp_path / 'one'}",
                "num_images=2",
                "steps=1",
                "prompt=a red circle",
                "guidance_scale=1",
            ],
        )
    )
    ours = np.stack([np.asarray(Image.open(out / f"{i:06d}.png")).astype(int) for i in range(2)])
    generators = [torch.Generator().manual_seed(seed) for seed in range(2)]
    theirs = pipeline(
        ["a red circle"] * 2, num_inference_steps=1, guidance_scale=1.0, generator=generators, output_type="np"
    ).images
    assert np.abs((theirs * 255).round().astype(int) - ours).max() <= 1  # plain diffusers, one step, same images


def test_a_diffusers_pipeline_folder_is_a_teacher(teacher_ckpt: Path, tmp_path: Path) -> None:
    folder = sample_run(compose_config("sample", [f"ckpt={teacher_ckpt}", f"export={tmp_path / 'teacher_pipe'}"]))
    cfg = compose_config("train", _turbo(tmp_path, folder, "run_name=from_folder", "trainer.max_steps=2"))
    module = train_run(cfg).lightning_module
    reference = load_teacher(str(teacher_ckpt)).net.state_dict()  # the folder holds the same (EMA) weights
    assert all(torch.equal(value, reference[name]) for name, value in module.teacher.net.state_dict().items())
    assert module.class_names == load_teacher(str(teacher_ckpt)).class_names


def test_turbo_trains_on_teacher_generated_data(text_ckpt: Path, tmp_path: Path) -> None:
    """LADD's option: distil on the teacher's own samples (sample.py writes an imagefolder with the prompts)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    folder = tmp_path / "teacher_samples"
    sample_run(
        compose_config(
            "sample", [f"ckpt={text_ckpt}", f"out={folder}", f"prompts_file={prompts}", "num_images=4", "steps=2"]
        )
    )
    overrides = _turbo(tmp_path, text_ckpt, "run_name=synthetic", "data=image_folder", f"data.root={folder}")
    cfg = compose_config("train", [o for o in overrides if not o.startswith("data.size=")])  # a folder has its size
    module = train_run(cfg).lightning_module
    assert sorted(set(module.trainer.datamodule.captions())) == ["a blue square", "a red circle"]
    # What the student was fed is the teacher's samples: every training item is one of sample.py's images, exactly
    # (or its mirror image: the folder's random_flip).
    dataset = module.trainer.datamodule.source_dataset
    written = {png.name: np.asarray(Image.open(png).convert("RGB")) for png in sorted(folder.glob("[0-9]*.png"))}
    assert len(dataset) == len(written) == 4
    for index in range(len(dataset)):
        pixels = ((dataset[index]["pixel_values"] / 2 + 0.5) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        assert any(
            np.array_equal(pixels, image) or np.array_equal(pixels, image[:, ::-1]) for image in written.values()
        )
    assert not any(np.array_equal(written["000000.png"], image) for image in list(written.values())[1:])  # 4 images
    teacher = load_teacher(str(text_ckpt)).net.state_dict()
    assert any(not torch.equal(value, teacher[name]) for name, value in module.net.state_dict().items())
