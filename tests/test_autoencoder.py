"""The autoencoder stage: adversarial math, the PatchGAN, a tiny run through the real config, export."""

import csv
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL

from lightdiff.config import build
from lightdiff.diffusion.adversarial import adaptive_weight, hinge_discriminator_loss, hinge_generator_loss, psnr
from lightdiff.nets.discriminator import PatchDiscriminator
from lightdiff.sample import run as sample_run
from lightdiff.train import run as train_run
from lightdiff.trained import load_autoencoder, load_checkpoint_file

from .conftest import TINY, compose_config


def test_hinge_losses_pinned() -> None:
    real, fake = torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.0])
    # relu(1 - [2, 0]) = [0, 1] and relu(1 + [-2, 0]) = [0, 1]: 0.5 * (0.5 + 0.5)
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(0.5)
    assert hinge_discriminator_loss(torch.tensor([5.0]), torch.tensor([-5.0])).item() == 0.0  # confident and right
    assert hinge_generator_loss(fake).item() == pytest.approx(1.0)


def test_adaptive_weight_is_the_gradient_norm_ratio() -> None:
    layer = torch.nn.Parameter(torch.ones(3))
    a, b = torch.tensor([3.0, 0.0, 4.0]), torch.tensor([0.0, 1.0, 0.0])
    weight = adaptive_weight((layer * a).sum(), (layer * b).sum(), layer)
    assert weight.item() == pytest.approx(5.0 / (1.0 + 1e-4))  # |a| / (|b| + 1e-4)
    assert not weight.requires_grad
    tiny = adaptive_weight((layer * a).sum(), (layer * b * 1e-9).sum(), layer, max_weight=100.0)
    assert tiny.item() == 100.0  # clamped


def test_psnr_pinned() -> None:
    reference = torch.zeros(2, 3, 4, 4)
    assert psnr(reference + 0.2, reference)[0].item() == pytest.approx(20.0, abs=1e-4)  # 10 log10(4 / 0.04)


def test_patch_discriminator_saves_and_loads(tmp_path: Path) -> None:
    torch.manual_seed(0)
    critic = PatchDiscriminator(base_channels=8, num_layers=2).eval()
    images = torch.randn(2, 3, 16, 16)
    logits = critic(images)
    assert logits.shape == (2, 1, 2, 2)  # one logit per patch
    critic.save_pretrained(tmp_path / "critic")
    loaded = PatchDiscriminator.from_pretrained(tmp_path / "critic").eval()
    assert torch.equal(loaded(images), logits)


@pytest.fixture(scope="module")
def autoencoder_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ae")
    tiny = [o for o in TINY if not o.startswith(("trainer.max_steps", "callbacks.checkpoint"))]
    cfg = compose_config(
        "train",
        [
            f"output_root={root}",
            *tiny,
            "model=autoencoder",
            "run_name=ae",
            "trainer.max_steps=10",
            "model.disc_start=2",
            "metrics=fid",
            "metrics/features=random_conv",
            "metrics.every_n_steps=0",
            "metrics.num_samples=16",
            "metrics.batch_size=8",
        ],
    )
    train_run(cfg)
    return Path(cfg.run_dir)


def test_rfid_and_rkid_of_reconstructions_are_logged(autoencoder_run: Path) -> None:
    with next(autoencoder_run.glob("csv/version_*/metrics.csv")).open() as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("val/rfid")]
    assert len(rows) == 1 and rows[0]["step"] == "10"  # every_n_steps=0: once, at the end
    assert 0 < float(rows[0]["val/rfid"]) < 1e4 and rows[0]["val/rkid"] != ""
    assert "val/fid" not in rows[0]  # the autoencoder's numbers are named as reconstruction metrics


class _ConstantDistance(torch.nn.Module):
    """A stand-in perceptual distance: 0.25 per image, with one (frozen) parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.25))

    def forward(self, reconstructions: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        return self.scale.expand(len(images))


def test_perceptual_loss_is_added_per_pixel_and_stays_frozen() -> None:
    cfg = compose_config(
        "train",
        ["model=autoencoder", "model.perceptual_loss={_target_:torch.nn.L1Loss}", "model.perceptual_weight=2.0"],
    )
    data = build(cfg.data)
    assert isinstance(build(cfg.model, data=data).perceptual_loss, torch.nn.L1Loss)  # the config path builds it

    plain = build(compose_config("train", ["model=autoencoder"]).model, data=data)
    weighted = build(compose_config("train", ["model=autoencoder", "model.perceptual_weight=2.0"]).model, data=data)
    weighted.perceptual_loss = _ConstantDistance().requires_grad_(False)
    images, reconstructions = torch.zeros(2, 3, 16, 16), torch.full((2, 3, 16, 16), 0.5)
    base = plain._pixel_loss(images, reconstructions)
    assert base.item() == pytest.approx(0.5 * 3 * 16 * 16)  # L1 summed per image
    # + weight 2 x distance 0.25 on each of the 768 pixel values of an image
    assert weighted._pixel_loss(images, reconstructions).item() == pytest.approx(base.item() + 2 * 0.25 * 768)
    frozen = build(
        compose_config(
            "train",
            ["model=autoencoder", "model.perceptual_loss={_target_:torch.nn.Linear,in_features:2,out_features:2}"],
        ).model,
        data=data,
    )
    assert not any(p.requires_grad for p in frozen.perceptual_loss.parameters())


def test_discriminator_switches_on_after_disc_start(autoencoder_run: Path) -> None:
    with next(autoencoder_run.glob("csv/version_*/metrics.csv")).open() as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("train/rec_loss")]
    # 2 autoencoder-only batches (1 step each), then 2 steps per batch: global steps 1, 2, 4, 6, 8, 10
    assert [r["train/d_loss"] == "" for r in rows] == [True, True, False, False, False, False]
    weighted = [float(r["train/d_weight"]) for r in rows if r["train/d_weight"]]
    assert all(w >= 0 for w in weighted) and len(weighted) == 4
    accuracies = [float(r["train/d_accuracy"]) for r in rows if r["train/d_accuracy"]]
    assert all(0.0 <= a <= 1.0 for a in accuracies)


def test_checkpoint_holds_both_networks_and_the_scaling_factor(autoencoder_run: Path) -> None:
    checkpoint = load_checkpoint_file(autoencoder_run / "checkpoints" / "last.ckpt")
    assert checkpoint["lightdiff"]["method"] == "autoencoder"
    assert any(k.startswith("vae.") for k in checkpoint["state_dict"])
    assert any(k.startswith("discriminator.") for k in checkpoint["state_dict"])
    assert len(checkpoint["optimizer_states"]) == 2
    factor = checkpoint["lightdiff"]["vae_config"]["scaling_factor"]
    assert factor != pytest.approx(0.18215) and 0 < factor < 100  # 1 / std of latents of training data
    grid = next((autoencoder_run / "samples").glob("final_step*.png"))
    assert grid.stat().st_size > 0


def test_export_gives_a_diffusers_autoencoder_with_the_same_outputs(autoencoder_run: Path, tmp_path: Path) -> None:
    ckpt = autoencoder_run / "checkpoints" / "last.ckpt"
    folder = sample_run(compose_config("sample", [f"ckpt={ckpt}", f"export={tmp_path / 'vae'}"]))
    exported = AutoencoderKL.from_pretrained(folder).eval()
    original = load_autoencoder(ckpt)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        a = exported.decode(exported.encode(images).latent_dist.mode()).sample
        b = original.decode(original.encode(images).latent_dist.mode()).sample
    assert torch.equal(a, b)
    assert exported.config.scaling_factor == original.config.scaling_factor
    with pytest.raises(ValueError, match="is an autoencoder"):
        sample_run(compose_config("sample", [f"ckpt={ckpt}", f"out={tmp_path / 'images'}"]))
    lora = tmp_path / "adapters.safetensors"
    with pytest.raises(ValueError, match="takes no adapters"):  # checked before the file is even opened
        sample_run(compose_config("sample", [f"ckpt={ckpt}", f"export={tmp_path / 'vae2'}", f"lora={lora}"]))
    assert not (tmp_path / "vae2").exists()
    kohya = tmp_path / "vae.safetensors"
    with pytest.raises(ValueError, match="export_format=diffusers"):  # a kohya LoRA file is no way to write a VAE
        sample_run(compose_config("sample", [f"ckpt={ckpt}", f"export={kohya}", "export_format=kohya"]))
    assert not kohya.exists()
