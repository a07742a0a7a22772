"""model=few_step_finetune: LoRA on a frozen few-step base, the preservation term along the base's own trajectory,
training at the base's timesteps, the adapter checkpoint that samples as its base does, and the refusals."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from lightdiff.config import ConfigError
from lightdiff.diffusion import DDPM
from lightdiff.nets.denoiser import network_output
from lightdiff.nets.lora import adapter_parameters, adapters_disabled
from lightdiff.sample import run as sample_run
from lightdiff.sampling import generate
from lightdiff.train import run as train_run
from lightdiff.trained import load_checkpoint_file, load_denoiser

from .conftest import TINY, compose_config

OLD = ["a red circle", "a blue square"]  # captions the base draws, whose few-step images are kept
NEW = "a red triangle"


def _finetune(root: Path, base: Path, *extra: str) -> list[str]:
    return [
        f"output_root={root}",
        *TINY,
        "model=few_step_finetune",
        f"model.base={base}",
        "model.lora.rank=2",
        f"data.classes=[{NEW}]",
        f"model.preserve_prompts=[{','.join(OLD)}]",
        "model.preserve_batch_size=3",
        *extra,
    ]


@pytest.fixture(scope="module")
def finetuned(text_student_ckpt: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("finetune")
    overrides = ["run_name=ft", "trainer.max_steps=3", "model.lr=1e-2"]
    cfg = compose_config("train", _finetune(root, text_student_ckpt, *overrides))
    module = train_run(cfg).lightning_module
    return module, Path(cfg.run_dir) / "checkpoints" / "last.ckpt"


def test_the_trajectory_visited_is_the_samplers_own(text_ckpt: Path) -> None:
    """`generate(visit=...)` reports each step's network input, timestep and output: the first input is the seed's
    noise, and DDIM's last step lands exactly on the x_0 of its last visit (final alpha 1)."""
    model = load_denoiser(text_ckpt)
    scheduler = model.objective.scheduler(model.objective.default_sampler)
    visits = []
    latents = generate(
        model.net,
        scheduler,
        3,
        [0, 1],
        model.conditioning,
        {"label": None, "text": OLD},
        size=(8, 8),
        visit=lambda x, t, out: visits.append((x.clone(), t, out.clone())),
    )  # no VAE: the images are the latents / 2 + 0.5, clamped
    assert [int(t) for _, t, _ in visits] == scheduler.timesteps.tolist() and len(visits) == 3
    noise = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in (0, 1)])
    assert torch.equal(visits[0][0], noise * scheduler.init_noise_sigma)
    x, t, out = visits[-1]
    x0 = model.objective.predicted_x0(out, x, t.reshape(1).expand(2))
    assert torch.allclose(latents, (x0 / 2 + 0.5).clamp(0, 1), atol=1e-5)
    control = model.objective.predicted_x0(visits[0][2], visits[0][0], visits[0][1].reshape(1).expand(2))
    assert not torch.allclose(latents, (control / 2 + 0.5).clamp(0, 1), atol=1e-2)  # the first step's x_0 differs


def test_the_preservation_term_is_zero_on_the_base_and_measures_the_adapters(finetuned) -> None:
    module, _ = finetuned
    torch.manual_seed(0)
    trained = module.preservation_loss()
    assert float(trained) > 0  # three updates at 1e-2 moved the adapters
    saved = [p.detach().clone() for p in adapter_parameters(module.net)]
    with torch.no_grad():
        for name, parameter in module.net.named_parameters():
            if "lora_B" in name:
                parameter.zero_()  # B = 0: the adapted network is the base
    torch.manual_seed(0)
    assert float(module.preservation_loss()) == 0.0
    # by hand: the same prompts and seeds, the base's x_0 at the chosen visit against the adapted network's
    with torch.no_grad():
        for parameter, value in zip(adapter_parameters(module.net), saved, strict=True):
            parameter.copy_(value)
    torch.manual_seed(0)
    picks = torch.randint(len(OLD), (3,)).tolist()
    seeds = torch.randint(0, 2**31 - 1, (3,)).tolist()
    step = torch.randint(module.steps, (3,))
    inputs = {"label": None, "text": [OLD[i] for i in picks]}
    visits = []
    with torch.no_grad(), adapters_disabled(module.net):
        generate(
            module.net,
            module.student_scheduler(),
            module.steps,
            seeds,
            module.conditioning,
            inputs,
            vae=module.vae,
            size=(16, 16),
            visit=lambda x, t, out: visits.append((x, t, out)),
        )
    rows = range(3)  # row r at its own chosen step: its input, timestep and the base's x_0 there
    x = torch.stack([visits[int(step[r])][0][r] for r in rows])
    s = torch.stack([visits[int(step[r])][1] for r in rows])
    with torch.no_grad():
        base_x0 = module.objective.predicted_x0(torch.stack([visits[int(step[r])][2][r] for r in rows]), x, s)
        x0 = module.objective.predicted_x0(network_output(module.net, x, s, module.conditioning(inputs)), x, s)
    expected = float(sum((x0[r] - base_x0[r]).pow(2).mean() for r in rows) / 3)
    assert float(trained) == pytest.approx(expected, rel=1e-4)


def test_the_checkpoint_holds_adapters_and_samples_as_its_base(
    finetuned, text_student_ckpt: Path, tmp_path: Path
) -> None:
    module, ckpt = finetuned
    checkpoint = load_checkpoint_file(ckpt)
    net_keys = [k for k in checkpoint["state_dict"] if k.startswith("net.")]
    assert net_keys and all("lora_" in k for k in net_keys)
    assert not any(k.startswith("teacher.") for k in checkpoint["state_dict"])
    meta = checkpoint["lightdiff"]
    assert meta["method"] == "few_step_finetune" and meta["student_timesteps"] == [999, 749, 499, 249]
    base, tuned = load_denoiser(text_student_ckpt), load_denoiser(ckpt)
    assert tuned.scheduler_overrides == base.scheduler_overrides == {"timestep_spacing": "trailing"}
    assert tuned.student_steps == 4
    # one step through sample.py, then plain diffusers with the adapters on the exported base
    out = sample_run(
        compose_config(
            "sample",
            [f"ckpt={ckpt}", f"out={tmp_path / 'one'}", "num_images=2", "steps=1", f"prompt={NEW}", "guidance_scale=1"],
        )
    )
    ours = np.stack([np.asarray(Image.open(out / f"{i:06d}.png")).astype(int) for i in range(2)])
    folder = sample_run(compose_config("sample", [f"ckpt={ckpt}", f"export={tmp_path / 'sd'}"]))
    pipeline = StableDiffusionPipeline.from_pretrained(folder)
    pipeline.load_lora_weights(folder)  # the base plus the adapters in diffusers' LoRA format
    assert pipeline.scheduler.config.timestep_spacing == "trailing"
    generators = [torch.Generator().manual_seed(seed) for seed in range(2)]
    theirs = pipeline([NEW] * 2, num_inference_steps=1, guidance_scale=1.0, generator=generators, output_type="np")
    assert np.abs((theirs.images * 255).round().astype(int) - ours).max() <= 1
    base_out = sample_run(
        compose_config(
            "sample",
            [
                f"ckpt={text_student_ckpt}",
                f"out={tmp_path / 'base'}",
                "num_images=2",
                "steps=1",
                f"prompt={NEW}",
                "guidance_scale=1",
            ],
        )
    )
    before = np.stack([np.asarray(Image.open(base_out / f"{i:06d}.png")).astype(int) for i in range(2)])
    assert np.abs(before - ours).max() > 3  # the adapters changed the one-step images (control)


def test_task_timesteps_student_trains_only_where_the_base_samples(
    text_student_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[torch.Tensor] = []
    original = DDPM.example_at

    def spy(self, x0, noise, timesteps):
        seen.append(timesteps.clone())
        return original(self, x0, noise, timesteps)

    monkeypatch.setattr(DDPM, "example_at", spy)
    overrides = ["run_name=at_student", "model.task_timesteps=student", "model.preserve_weight=0"]
    train_run(compose_config("train", _finetune(tmp_path, text_student_ckpt, *overrides)))
    visited = torch.cat(seen)
    assert len(seen) == 2 and set(visited.tolist()) <= {999, 749, 499, 249}
    seen.clear()
    overrides = ["run_name=plain", "model.task_timesteps=all", "model.preserve_weight=0"]
    module = train_run(compose_config("train", _finetune(tmp_path, text_student_ckpt, *overrides))).lightning_module
    plain = set(torch.cat(seen).tolist())  # control: plain LoRA draws its timesteps from the whole schedule
    assert module.preserve_weight == 0 and plain - {999, 749, 499, 249}


def test_bad_settings_are_named(text_student_ckpt: Path, text_ckpt: Path, tmp_path: Path) -> None:
    cases = {
        "model.lora.rank": ["model.lora.rank=null"],
        "model.preserve_prompts": ["model.preserve_prompts=null"],
        "model.task_timesteps": ["model.task_timesteps=everywhere"],
        "model.consistency_weight": ["model.consistency_weight=1", "model.steps=1"],  # no earlier step to pull
    }
    for name, extra in cases.items():
        with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
            cfg = compose_config("train", _finetune(tmp_path, text_student_ckpt, f"run_name=bad{len(name)}", *extra))
            train_run(cfg)
    with pytest.raises(ConfigError, match=r"model\.steps"):  # a many-step model records no few-step sampling
        train_run(compose_config("train", _finetune(tmp_path, text_ckpt, "run_name=not_a_student")))
    # a LoRA student is the teacher + adapters: refused, with the way to a merged base
    lora_student = [f"output_root={tmp_path}", *TINY, "run_name=lora_student", "model=turbo"]
    lora_student += [f"model.teacher={text_ckpt}", "model.lora.rank=2", "model.teacher_steps=2"]
    train_run(compose_config("train", lora_student))
    with pytest.raises(ConfigError, match="export_fused=true"):
        base = tmp_path / "lora_student" / "checkpoints" / "last.ckpt"
        train_run(compose_config("train", _finetune(tmp_path, base, "run_name=on_lora")))
    assert not (tmp_path / "on_lora").exists()  # refused before anything is written


def test_resume_is_bit_identical(text_student_ckpt: Path, tmp_path: Path) -> None:
    """3 steps, stop, resume to 5 == 5 at once: the adapters and the optimiser's moments, with the preservation term's
    prompts, seeds and visited steps drawn from the run's restored random stream. Control: another seed differs."""

    def adapters(name: str, *legs: int, seed: int = 0) -> dict:
        for max_steps in legs:
            overrides = [f"run_name={name}", f"trainer.max_steps={max_steps}", "model.lr=1e-2", f"seed={seed}"]
            train_run(compose_config("train", _finetune(tmp_path, text_student_ckpt, *overrides)))
        checkpoint = load_checkpoint_file(tmp_path / name / "checkpoints" / "last.ckpt")
        assert checkpoint["global_step"] == legs[-1]
        state = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
        moments = checkpoint["optimizer_states"][0]["state"]
        return state | {f"adam.{i}.{k}": v for i, m in moments.items() for k, v in m.items() if torch.is_tensor(v)}

    at_once, resumed = adapters("once", 5), adapters("twice", 3, 5)
    assert at_once.keys() == resumed.keys() and all(torch.equal(at_once[k], resumed[k]) for k in at_once)
    other = adapters("other_seed", 5, seed=1)
    assert any(not torch.equal(at_once[k], other[k]) for k in at_once)


def test_the_consistency_term_pulls_earlier_steps_to_where_its_own_trajectory_lands(finetuned) -> None:
    """By hand: the adapted model's own 4-step trajectory from the same seeds, the x_0 of its last step as the target,
    the x_0 from an earlier step's input (the one drawn per prompt) against it."""
    module, _ = finetuned
    batch = {"text": [NEW, NEW, OLD[0]]}
    torch.manual_seed(0)
    measured = float(module.consistency_loss(batch))
    torch.manual_seed(0)
    seeds = torch.randint(0, 2**31 - 1, (3,)).tolist()
    step = torch.randint(module.steps - 1, (3,))
    assert int(step.max()) < module.steps - 1  # never the last step itself, whose x_0 is the target
    visits = []
    with torch.no_grad():
        generate(
            module.net, module.student_scheduler(), module.steps, seeds, module.conditioning, batch, vae=module.vae,
            size=(16, 16), visit=lambda x, t, out: visits.append((x, t.reshape(1).expand(3), out)),
        )  # fmt: skip
        x, t, out = visits[-1]
        landed = module.objective.predicted_x0(out, x, t)
        x = torch.stack([visits[int(step[r])][0][r] for r in range(3)])
        s = torch.stack([visits[int(step[r])][1][r] for r in range(3)])
        x0 = module.objective.predicted_x0(network_output(module.net, x, s, module.conditioning(batch)), x, s)
    assert measured == pytest.approx(float((x0 - landed).pow(2).mean()), rel=1e-4) and measured > 0
