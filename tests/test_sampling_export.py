"""sample.py: determinism, metadata, samplers; export to a diffusers pipeline that reproduces the images."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDPMPipeline
from hydra.utils import instantiate
from PIL import Image

from lightdiff.config import ConfigError
from lightdiff.data import ImageFolderDataModule
from lightdiff.sample import run as sample_run
from lightdiff.sampling import generate, to_uint8
from lightdiff.trained import load_denoiser

from .conftest import assert_reproduced, compose_config, pipeline_images


@pytest.fixture(scope="module")
def trained(pixel_ckpt: Path, class_ckpt: Path) -> dict[str, Path]:
    """One unconditional and one class-conditional tiny model (conftest: trained once per session)."""
    return {"uncond": pixel_ckpt, "class": class_ckpt}


class _Payload:
    """Unpickling this calls Path.touch: what a malicious checkpoint would do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.path,))


def _sample(ckpt: Path, out: Path, *overrides: str) -> Path:
    return sample_run(compose_config("sample", [f"ckpt={ckpt}", f"out={out}", "num_images=6", "steps=4", *overrides]))


def _pixels(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("0*.png"))])


def assert_same_to_one_level(a: np.ndarray, b: np.ndarray) -> None:
    """uint8 images equal to within one 8-bit level on at most 0.1% of their values. Image i's noise depends on its
    seed alone, but a batched convolution sums in an order that depends on the batch size (and the CPU's kernels), so
    a value on a rounding boundary may land one level apart: seen on one pixel of 4,608 on another 2-core machine."""
    assert a.shape == b.shape
    difference = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert difference.max() <= 1, f"images differ by up to {difference.max()} levels"
    assert (difference > 0).mean() <= 1e-3, f"{(difference > 0).mean():.2%} of the values differ"


def test_same_seed_same_images_any_batch_size(trained: dict[str, Path], tmp_path: Path) -> None:
    a = _pixels(_sample(trained["uncond"], tmp_path / "a", "seed=5"))
    b = _pixels(_sample(trained["uncond"], tmp_path / "b", "seed=5", "batch_size=4"))  # batches of 4 and 2
    c = _pixels(_sample(trained["uncond"], tmp_path / "c", "seed=6"))
    assert a.shape == (6, 16, 16, 3)
    assert_same_to_one_level(a, b)
    assert_same_to_one_level(a[1:], c[:5])  # image i depends on seed + i only (here in another batch position)
    # Negative control: other seeds are far outside the tolerance, and so is one level everywhere.
    with pytest.raises(AssertionError):
        assert_same_to_one_level(a, c)
    with pytest.raises(AssertionError, match="of the values differ"):
        assert_same_to_one_level(a, np.clip(a.astype(np.int16) + 1, 0, 255).astype(np.uint8))


def test_metadata_and_grid(trained: dict[str, Path], tmp_path: Path) -> None:
    out = _sample(trained["class"], tmp_path / "s", "sampler=ddim", "eta=0.5", "label=9")
    records = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in records] == [f"{i:06d}.png" for i in range(6)]
    assert [r["seed"] for r in records] == list(range(6))
    assert {r["label"] for r in records} == {9} and {r["text"] for r in records} == {"a green square"}
    assert records[0]["sampler"] == "DDIMScheduler" and records[0]["steps"] == 4 and records[0]["eta"] == 0.5
    assert Image.open(out / "grid.png").size == (3 * 16, 2 * 16)
    # the output folder is itself a training set, captions and labels included
    data = ImageFolderDataModule(root=str(out), resolution=16, batch_size=2, num_workers=0)
    assert len(data.dataset) == 6 and data.dataset[0]["text"] == "a green square" and data.dataset[0]["label"] == 9


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm", "euler"])
def test_every_sampler_is_deterministic(sampler: str, trained: dict[str, Path], tmp_path: Path) -> None:
    first = _pixels(_sample(trained["uncond"], tmp_path / "1", f"sampler={sampler}"))
    second = _pixels(_sample(trained["uncond"], tmp_path / "2", f"sampler={sampler}"))
    assert np.array_equal(first, second)


def test_ddim_eta_changes_images(trained: dict[str, Path], tmp_path: Path) -> None:
    deterministic = _pixels(_sample(trained["uncond"], tmp_path / "0", "eta=0.0"))
    stochastic = _pixels(_sample(trained["uncond"], tmp_path / "1", "eta=1.0"))
    assert not np.array_equal(deterministic, stochastic)
    with pytest.raises(ValueError, match="only the ddim sampler takes eta"):
        _sample(trained["uncond"], tmp_path / "2", "sampler=euler", "eta=0.5")


def test_to_uint8_clips_a_decoders_overshoot() -> None:
    # A VAE decodes a black background to about -0.01: cast unclipped it wraps around to white (the negative control).
    images = torch.tensor([-0.01, 0.0, 0.5, 1.0, 1.02]).reshape(1, 1, 5, 1).expand(1, 3, 5, 1)
    assert to_uint8(images)[0, :, 0, 0].tolist() == [0, 0, 128, 255, 255]
    assert (images.movedim(-3, -1).numpy() * 255).round().astype(np.uint8)[0, 0, 0, 0] != 0


def test_eta_refused_where_the_step_ignores_it() -> None:
    """CogVideoXDDIMScheduler.step takes `eta` and ignores it: eta=1 would be recorded in metadata.jsonl and change
    nothing, so it is refused (model=video's sampler); DDIMScheduler's eta is honoured."""
    from diffusers import CogVideoXDDIMScheduler, DDIMScheduler

    from lightdiff.sampling import check_eta

    cogvideox = CogVideoXDDIMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True)
    cogvideox.set_timesteps(10)
    sample, output, t = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4), cogvideox.timesteps[3]
    steps = [
        cogvideox.step(output, t, sample, eta=eta, generator=torch.Generator().manual_seed(0)).prev_sample
        for eta in (0.0, 1.0)
    ]
    # the premise: if diffusers ever honours eta here, this fails and the entry in _STEP_IGNORES_ETA must go
    assert torch.equal(steps[0], steps[1])
    with pytest.raises(ValueError, match="eta=1.0 has no meaning for CogVideoXDDIMScheduler"):
        check_eta(cogvideox, 1.0)
    assert check_eta(cogvideox, 0.0) is False  # eta=0 is what it does anyway
    ddim = DDIMScheduler()
    ddim.set_timesteps(10)
    honoured = [
        ddim.step(output, ddim.timesteps[3], sample, eta=eta, generator=torch.Generator().manual_seed(0)).prev_sample
        for eta in (0.0, 1.0)
    ]
    assert check_eta(ddim, 1.0) is True and not torch.equal(honoured[0], honoured[1])  # negative control


@pytest.mark.parametrize(("sampler", "pipeline_class"), [("ddim", DDIMPipeline), ("ddpm", DDPMPipeline)])
def test_export_round_trip_with_plain_diffusers(
    sampler: str, pipeline_class: type, trained: dict[str, Path], tmp_path: Path
) -> None:
    folder = sample_run(
        compose_config("sample", [f"ckpt={trained['uncond']}", f"export={tmp_path / 'pipe'}", f"sampler={sampler}"])
    )
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"

    denoiser = load_denoiser(trained["uncond"])
    assert denoiser.uses_ema
    sampler_factory = instantiate(compose_config("sample", ["ckpt=unused", f"sampler={sampler}"]).sampler)
    scheduler = denoiser.objective.scheduler(sampler_factory)
    seeds = [0, 1, 2]
    ours = generate(denoiser.net, scheduler, 10, seeds, denoiser.conditioning, {})
    theirs = pipeline_images(pipeline_class.from_pretrained(folder), None, 3, rounded=False, num_inference_steps=10)
    assert_reproduced(ours, theirs, 1e-5)

    # sample.py reads the exported folder too and gives the checkpoint's images
    from_ckpt = _pixels(_sample(trained["uncond"], tmp_path / "ckpt", f"sampler={sampler}"))
    from_export = _pixels(_sample(folder, tmp_path / "export", f"sampler={sampler}"))
    assert np.array_equal(from_ckpt, from_export)


def test_raw_weights_differ_from_ema(trained: dict[str, Path]) -> None:
    ema, raw = load_denoiser(trained["uncond"]), load_denoiser(trained["uncond"], use_ema=False)
    assert ema.uses_ema and not raw.uses_ema
    assert any(not torch.equal(a, b) for a, b in zip(ema.net.parameters(), raw.net.parameters()))


def test_class_conditional_export_keeps_class_names(trained: dict[str, Path], tmp_path: Path) -> None:
    folder = sample_run(compose_config("sample", [f"ckpt={trained['class']}", f"export={tmp_path / 'pipe'}"]))
    denoiser = load_denoiser(folder)
    assert denoiser.net.config.num_class_embeds == 24
    assert denoiser.class_names[9] == "a green square"


def test_bad_inputs_are_named(trained: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        _sample(tmp_path / "nope.ckpt", tmp_path / "o")
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.ckpt"):
        _sample(garbage, tmp_path / "o")
    # a pickle that would create a file when unpickled is refused, and the file is never made
    payload_target = tmp_path / "pwned"
    torch.save({"lightdiff": _Payload(payload_target)}, tmp_path / "crafted.ckpt")
    with pytest.raises(ValueError, match="crafted.ckpt"):
        _sample(tmp_path / "crafted.ckpt", tmp_path / "o")
    assert not payload_target.exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.png").write_bytes(b"earlier result")
    with pytest.raises(ValueError, match="out=.*full.* is not empty"):
        _sample(trained["uncond"], tmp_path / "full")
    assert (tmp_path / "full" / "keep.png").read_bytes() == b"earlier result"
    with pytest.raises(ValueError, match="label=3"):
        _sample(trained["uncond"], tmp_path / "o", "label=3")
    with pytest.raises(ValueError, match="label=30"):
        _sample(trained["class"], tmp_path / "o", "label=30")


def test_sample_py_variety_sees_a_collapsed_model() -> None:
    """sample.py's `variety` on shapes: other data images keep recall and the data's spread within a class; the same
    classes drawn as one image each, repeated (right about every prompt, no variety), lose both (the control)."""
    from lightdiff.data import ShapesDataset
    from lightdiff.sample import image_variety

    reference = ShapesDataset(size=240, resolution=16, seed=0)

    def uint8(dataset: ShapesDataset, indices: list[int]) -> np.ndarray:
        images = torch.stack([dataset[i]["pixel_values"] for i in indices]).clamp(-1, 1) / 2 + 0.5
        return (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)

    other = ShapesDataset(size=240, resolution=16, seed=1)
    labels = [int(other[i]["label"]) for i in range(240)]
    fresh = image_variety(reference, uint8(other, list(range(240))), labels, 240)
    first_of_class = {label: labels.index(label) for label in labels}
    collapsed = image_variety(reference, uint8(other, [first_of_class[label] for label in labels]), labels, 240)
    assert fresh["recall"] > 0.8 and 0.8 < fresh["diversity"] < 1.25
    assert collapsed["recall"] < 0.3 and collapsed["diversity"] == 0.0


def test_sample_with_metrics_writes_metrics_json(trained: dict[str, Path], tmp_path: Path) -> None:
    fid_options = ["metrics=fid", "metrics/features=random_conv", "metrics.num_samples=16", "metrics.batch_size=8"]

    def sample(out: str, *extra: str) -> dict:
        overrides = [f"out={tmp_path / out}", "num_images=8", "steps=2", *fid_options, *extra]
        folder = sample_run(compose_config("sample", [f"ckpt={trained['class']}", *overrides]))
        return json.loads((folder / "metrics.json").read_text())

    cache = f"metrics.cache_dir={tmp_path / 'fid_cache'}"
    metrics = sample("a", cache)  # the reference data is the run's own (its config.yaml): shapes at 16 px
    assert metrics["fid"] > 0 and math.isfinite(metrics["kid"]) and metrics["num_images"] == 8
    assert metrics["reference_data"].startswith("shapes|") and "resolution=16" in metrics["reference_data"]
    assert 0 <= metrics["shapes"]["both"] <= 1 and "coverage" in metrics["shapes"]  # class labels were judged
    assert set(metrics["variety"]) >= {"precision", "recall"}  # the collapse diagnostics (test below)
    assert len(list((tmp_path / "fid_cache").glob("reference-*.pt"))) == 1
    again = sample("b", cache)
    assert again["fid"] == pytest.approx(metrics["fid"], rel=1e-9)  # same seeds, cached reference
    assert again["kid"] == pytest.approx(metrics["kid"], rel=1e-9)  # KID subsets from a fixed seed
    other = sample("c", cache, "data=shapes", "data.resolution=16", "data.seed=5", "data.size=64")
    assert other["reference_data"] != metrics["reference_data"] and "seed=5" in other["reference_data"]

    exported = sample_run(compose_config("sample", [f"ckpt={trained['uncond']}", f"export={tmp_path / 'pipe'}"]))
    with pytest.raises(ConfigError, match="give data="):  # an exported folder has no run config beside it
        sample_run(
            compose_config("sample", [f"ckpt={exported}", f"out={tmp_path / 'd'}", "num_images=2", *fid_options])
        )

    run_dir = tmp_path / "forged_run"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(trained["uncond"], run_dir / "checkpoints" / "last.ckpt")
    (run_dir / "config.yaml").write_text("data:\n  _target_: os.system\n  command: touch pwned\n")
    with pytest.raises(ConfigError, match="names no lightdiff data module"):  # a _target_ read from a file is refused
        sample_run(
            compose_config(
                "sample",
                [
                    f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}",
                    f"out={tmp_path / 'e'}",
                    "num_images=2",
                    *fid_options,
                ],
            )
        )
    assert not Path("pwned").exists()
