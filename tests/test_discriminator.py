"""The distillation discriminators learn: each backbone separates real shapes from clearly fake images in a few
steps, and LADD's noise levels leave the teacher backbone something to see (with a negative control at the levels
lightdiff drew before, where it did not)."""

from pathlib import Path

import pytest
import torch
from transformers import Dinov2Config, Dinov2Model

from lightdiff.data.shapes import pil_to_tensor, shapes_sample
from lightdiff.diffusion import DDPM, NoiseSchedule
from lightdiff.diffusion.adversarial import hinge_discriminator_loss
from lightdiff.nets.families import Condition
from lightdiff.nets.feature_discriminator import (
    FeatureDiscriminator,
    PatchFeatures,
    UNetEncoderFeatures,
    ViTFeatures,
)

from .conftest import tiny_unet

LINEAR = DDPM(NoiseSchedule("linear", 1000, 1e-4, 0.02))
COSINE = DDPM(NoiseSchedule("squaredcos_cap_v2", 1000))
LADD_MEDIAN_FLOW_TIME = torch.sigmoid(torch.tensor(1.0)).item()  # LADD's logit-normal(1, 1): median t = 0.73


def snr(objective: DDPM, steps: torch.Tensor) -> torch.Tensor:
    alpha_bar = objective.alphas_cumprod[steps]
    return alpha_bar / (1 - alpha_bar)


@pytest.mark.parametrize("objective", [LINEAR, COSINE], ids=["linear", "cosine"])
def test_discriminator_noise_levels_have_ladds_signal_to_noise_ratios(objective: DDPM) -> None:
    torch.manual_seed(0)
    flow_snr = ((1 - LADD_MEDIAN_FLOW_TIME) / LADD_MEDIAN_FLOW_TIME) ** 2  # 0.135 on x_t = (1 - t) x_0 + t eps
    median_step = objective.high_noise_timesteps(1, 1.0, 0.0, "cpu")  # std 0: the median draw itself
    assert snr(objective, median_step).item() == pytest.approx(flow_snr, rel=0.05)
    steps = objective.high_noise_timesteps(20000, 1.0, 1.0, "cpu")
    assert steps.min() >= 0 and steps.max() <= 999
    # P(N(1, 1) > 0) = 84% of the draws are noisier than SNR 1 (flow time 0.5), on any schedule.
    assert 0.82 < (snr(objective, steps) < 1).float().mean() < 0.86
    # What lightdiff drew before, round(sigmoid(n) (T - 1)), is 30x noisier on the linear schedule (the bug).
    if objective is LINEAR:
        assert snr(objective, torch.tensor([730])).item() < flow_snr / 25


REAL = torch.stack([pil_to_tensor(shapes_sample(0, index, 16)[0]) for index in range(96)])


def _separation_after_training(
    discriminator: FeatureDiscriminator, view, noise_levels, eval_levels, steps: int = 30, fake_is_real: bool = False
) -> float:
    """Train the heads `steps` times on real shapes vs grey images (hinge), then P(D(real) > D(fake)) on held-out
    images (AUC of the per-image mean logit: free of the threshold, which drifts while a GAN trains)."""
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(discriminator.head_parameters(), lr=1e-3, betas=(0.0, 0.99))
    condition = Condition()

    def fake_of(real: torch.Tensor) -> torch.Tensor:
        return real[torch.randperm(len(real))] if fake_is_real else torch.zeros_like(real)

    for _ in range(steps):
        real = REAL[torch.randint(0, 64, (16,))]
        levels = noise_levels(16)
        loss = hinge_discriminator_loss(
            discriminator(view(real, levels), levels, condition),
            discriminator(view(fake_of(real), levels), levels, condition),
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        real, levels = REAL[64:], eval_levels(32)
        logits_real = discriminator(view(real, levels), levels, condition).mean(dim=1)
        logits_fake = discriminator(view(fake_of(real), levels), levels, condition).mean(dim=1)
    return (logits_real[:, None] > logits_fake[None, :]).float().mean().item()


def _teacher_discriminator() -> FeatureDiscriminator:
    return FeatureDiscriminator(UNetEncoderFeatures(tiny_unet(16)), head_channels=32)


def _noised(real: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    return LINEAR.noised(real, torch.randn_like(real), levels)


def _clean(real: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    return real


def _ladd_levels(size: int) -> torch.Tensor:
    return LINEAR.high_noise_timesteps(size, 1.0, 1.0, "cpu")


def _median_ladd_level(size: int) -> torch.Tensor:
    return LINEAR.high_noise_timesteps(size, 1.0, 0.0, "cpu")


def _clean_levels(size: int) -> torch.Tensor:
    return torch.zeros(size, dtype=torch.long)


def test_teacher_feature_discriminator_separates_real_from_fake_at_ladds_noise_levels() -> None:
    separation = _separation_after_training(_teacher_discriminator(), _noised, _ladd_levels, _median_ladd_level)
    assert separation > 0.85
    # Negative controls: the same heads at the median level lightdiff drew before (step 730, SNR 0.0045) stay near
    # chance, and with nothing to tell apart (fakes are real images) so does the measure itself.
    old_levels = lambda size: torch.full((size,), 730)  # noqa: E731
    assert _separation_after_training(_teacher_discriminator(), _noised, old_levels, old_levels) < 0.7
    nothing = _separation_after_training(
        _teacher_discriminator(), _noised, _ladd_levels, _median_ladd_level, fake_is_real=True
    )
    assert 0.3 < nothing < 0.7


def test_patchgan_discriminator_separates_real_from_fake() -> None:
    discriminator = FeatureDiscriminator(PatchFeatures(in_channels=3, base_channels=16), head_channels=32)
    assert _separation_after_training(discriminator, _clean, _clean_levels, _clean_levels) > 0.95


def test_vit_discriminator_separates_real_from_fake(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=4, image_size=16
    )
    Dinov2Model(config).save_pretrained(tmp_path / "tiny-dinov2")
    backbone = ViTFeatures(str(tmp_path / "tiny-dinov2"), layers=(1, 2), image_size=16)
    discriminator = FeatureDiscriminator(backbone, head_channels=32)
    assert _separation_after_training(discriminator, _clean, _clean_levels, _clean_levels) > 0.95
