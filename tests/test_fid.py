"""FID / KID: feature networks, input ranges, the metric's behaviour on real shapes images, the training callback."""

from types import SimpleNamespace

import pytest
import torch
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from lightdiff.callbacks import FrechetDistance
from lightdiff.config import ConfigError
from lightdiff.data import ShapesDataset
from lightdiff.methods.preview import Preview
from lightdiff.metrics.features import InceptionFeatures, RandomConvFeatures, check_unit_range


def _shapes(count: int, seed: int) -> torch.Tensor:
    dataset = ShapesDataset(size=count, resolution=16, seed=seed)
    return torch.stack([dataset[i]["pixel_values"] for i in range(count)]) / 2 + 0.5  # [0, 1]


def _distances(real: torch.Tensor, fake: torch.Tensor) -> tuple[float, float]:
    features = RandomConvFeatures(seed=0)
    fid = FrechetInceptionDistance(feature=features, normalize=True)
    kid = KernelInceptionDistance(feature=features, normalize=True, subset_size=50)
    for metric in (fid, kid):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    return float(fid.compute()), float(kid.compute()[0])


def test_input_range_is_checked() -> None:
    with pytest.raises(TypeError, match="float images in \\[0, 1\\]"):
        check_unit_range(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="\\[-1, 1\\] data"):
        check_unit_range(torch.full((1, 3, 8, 8), -0.5))
    with pytest.raises(ValueError, match="\\(B, 3, H, W\\)"):
        check_unit_range(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="\\[0, 1\\]"):
        RandomConvFeatures()(torch.full((2, 3, 8, 8), 2.0))


def test_random_features_are_fixed_by_their_seed() -> None:
    images = _shapes(8, 0)
    a, b, other = RandomConvFeatures(seed=0), RandomConvFeatures(seed=0), RandomConvFeatures(seed=1)
    a.train()
    assert not a.training and not any(p.requires_grad for p in a.parameters())  # a fixed instrument
    assert torch.equal(a(images), b(images)) and a(images).shape == (8, a.num_features)
    assert not torch.allclose(a(images), other(images))


def test_fid_and_kid_are_zero_on_the_same_set_and_grow_with_degradation() -> None:
    real = _shapes(200, 0)
    same_fid, same_kid = _distances(real, real)
    assert abs(same_fid) < 1e-3 and abs(same_kid) < 5e-3  # KID's unbiased estimate scatters around 0
    fresh_fid, _ = _distances(real, _shapes(200, 1))  # other images of the same distribution
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(real.shape, generator=generator)
    degraded = [_distances(real, (real + sigma * noise).clamp(0, 1)) for sigma in (0.1, 0.2, 0.4)]
    fids, kids = [d[0] for d in degraded], [d[1] for d in degraded]
    assert fids[0] < fids[1] < fids[2] and fresh_fid < fids[1]
    assert kids[0] < kids[1] < kids[2]


def test_inception_features_name_what_to_install_or_provide(tmp_path) -> None:
    with pytest.raises(ConfigError, match="metrics.features.weights='.*missing.pth' is not a file"):
        InceptionFeatures(weights=str(tmp_path / "missing.pth"))
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="lightdiff\\[fid\\]"):
            InceptionFeatures()


class _Reconstructor(torch.nn.Module):
    """A method stand-in whose previews are data set images, optionally degraded."""

    def __init__(self, dataset: ShapesDataset, noise: float) -> None:
        super().__init__()
        self.dataset, self.noise = dataset, noise
        self.distance_prefix = "r"

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def preview(self, seeds, sampler, steps) -> Preview:
        images = torch.stack([self.dataset[s]["pixel_values"] for s in seeds]) / 2 + 0.5
        generator = torch.Generator().manual_seed(seeds[0])
        images = images + self.noise * torch.randn(images.shape, generator=generator)
        return Preview(images=images.clamp(0, 1))


def test_callback_scores_the_methods_images_against_the_data() -> None:
    dataset = ShapesDataset(size=120, resolution=16, seed=0)
    logged: list[dict] = []
    logger = SimpleNamespace(log_metrics=lambda metrics, step: logged.append({**metrics, "step": step}))
    trainer = SimpleNamespace(
        datamodule=SimpleNamespace(source_dataset=dataset), loggers=[logger], global_step=7, callbacks=[]
    )
    callback = FrechetDistance(RandomConvFeatures(), sampler=None, num_images=100, batch_size=30, kid_subset_size=50)
    exact = callback.evaluate(trainer, _Reconstructor(dataset, 0.0))
    noisy = callback.evaluate(trainer, _Reconstructor(dataset, 0.2))
    assert abs(exact["val/rfid"]) < 1e-3  # the first 100 images against themselves
    assert noisy["val/rfid"] > 1.0 and noisy["val/rkid"] > exact["val/rkid"]
    assert logged[1] == {**noisy, "step": 7}
    with pytest.raises(ValueError, match="metrics.num_images=2000 exceeds"):
        FrechetDistance(RandomConvFeatures(), sampler=None, num_images=2000).evaluate(
            trainer, _Reconstructor(dataset, 0.0)
        )
