"""FID / KID: feature networks, input ranges, the metric's behaviour on real shapes images, the training callback."""

from types import SimpleNamespace

import pytest
import torch
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from lightdiff.callbacks import FrechetDistance
from lightdiff.config import ConfigError
from lightdiff.contract import Preview
from lightdiff.data import ShapesDataset
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
    """A method stand-in (lightdiff.contract.TrainingMethod) whose previews are data set images, optionally degraded;
    it records the seeds it drew."""

    net = None
    class_names = None
    metric_steps = None
    distance_prefix = "r"

    def __init__(self, dataset: ShapesDataset, noise: float) -> None:
        super().__init__()
        self.dataset, self.noise = dataset, noise
        self.seeds_drawn: list[int] = []

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def preview(self, seeds, sampler, steps, prompts=None) -> Preview:
        self.seeds_drawn += list(seeds)
        images = torch.stack([self.dataset[s]["pixel_values"] for s in seeds]) / 2 + 0.5
        noise = torch.stack([torch.randn(images.shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds])
        labels = torch.tensor([self.dataset[s]["label"] for s in seeds])
        return Preview(images=(images + self.noise * noise).clamp(0, 1), labels=labels)


def _values(metrics: dict[str, float]) -> dict[str, float]:
    return {key: value for key, value in metrics.items() if key.startswith("val/")}  # without the timing


def _trainer(dataset: ShapesDataset, rank: int = 0, world_size: int = 1, identity: str = "") -> SimpleNamespace:
    logged: list[dict] = []
    logger = SimpleNamespace(log_metrics=lambda metrics, step: logged.append({**metrics, "step": step}), logged=logged)
    datamodule = SimpleNamespace(source_dataset=dataset, reference_identity=identity)
    return SimpleNamespace(
        datamodule=datamodule, loggers=[logger], global_step=7, callbacks=[], global_rank=rank, world_size=world_size
    )


def _callback(num_samples: int = 100, cache_dir=None, seed: int = 0) -> FrechetDistance:
    return FrechetDistance(
        RandomConvFeatures(seed=seed),
        None,
        num_samples=num_samples,
        batch_size=30,
        kid_subset_size=50,
        cache_dir=cache_dir,
    )


def test_callback_scores_the_methods_images_against_the_data() -> None:
    dataset = ShapesDataset(size=120, resolution=16, seed=0)
    trainer = _trainer(dataset)
    callback = _callback()
    exact = callback.evaluate(trainer, _Reconstructor(dataset, 0.0))
    noisy = callback.evaluate(trainer, _Reconstructor(dataset, 0.2))
    assert abs(exact["val/rfid"]) < 1e-3  # the first 100 images against themselves
    assert noisy["val/rfid"] > 1.0 and noisy["val/rkid"] > exact["val/rkid"]
    assert trainer.loggers[0].logged[1] == {**noisy, "step": 7}
    assert noisy["perf/fid_seconds"] > 0
    assert exact["val/shapes_both"] >= 0.95 and noisy["val/shapes_valid"] < exact["val/shapes_valid"]  # same images
    with pytest.raises(ValueError, match="metrics.num_samples=2000 exceeds"):
        _callback(num_samples=2000).evaluate(trainer, _Reconstructor(dataset, 0.0))


def test_callback_evaluates_each_step_count_of_a_list() -> None:
    dataset = ShapesDataset(size=120, resolution=16, seed=0)
    callback = FrechetDistance(RandomConvFeatures(), None, steps=[1, 4], num_samples=40, batch_size=20)
    method = _Reconstructor(dataset, 0.2)
    metrics = callback.evaluate(_trainer(dataset), method)
    distances = {"val/rfid_1step", "val/rkid_1step", "val/rfid_4steps", "val/rkid_4steps"}
    shapes = {
        f"val/shapes_{name}_{n}"
        for name in ("valid", "coverage", "shape", "color", "both")
        for n in ("1step", "4steps")
    }
    assert set(_values(metrics)) == distances | shapes
    assert method.seeds_drawn == list(range(40)) * 2  # the same seeds for each step count
    assert metrics["val/rfid_1step"] == pytest.approx(metrics["val/rfid_4steps"])  # this stand-in ignores steps
    with pytest.raises(ValueError, match="metrics.steps"):
        FrechetDistance(RandomConvFeatures(), None, steps=[0])


def test_reference_statistics_are_cached_and_invalidated(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    dataset = ShapesDataset(size=120, resolution=16, seed=0)
    trainer = _trainer(dataset, identity="shapes|seed=0")
    with caplog.at_level("INFO"):
        first = _callback(cache_dir=tmp_path).evaluate(trainer, _Reconstructor(dataset, 0.2))
    assert "cache miss" in caplog.text and len(list(tmp_path.glob("reference-*.pt"))) == 1
    caplog.clear()
    with caplog.at_level("INFO"):
        again = _callback(cache_dir=tmp_path).evaluate(trainer, _Reconstructor(dataset, 0.2))
    assert "cache hit" in caplog.text and _values(again) == pytest.approx(_values(first), rel=1e-9)
    _callback(cache_dir=tmp_path, seed=1).evaluate(trainer, _Reconstructor(dataset, 0.2))  # other features
    _callback(cache_dir=tmp_path, num_samples=90).evaluate(trainer, _Reconstructor(dataset, 0.2))  # other reference
    other_data = _trainer(dataset, identity="shapes|seed=1")
    _callback(cache_dir=tmp_path).evaluate(other_data, _Reconstructor(dataset, 0.2))
    assert len(list(tmp_path.glob("reference-*.pt"))) == 4


def _distributed_worker(rank: int, world_size: int, port: int, folder: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        dataset = ShapesDataset(size=120, resolution=16, seed=0)
        method = _Reconstructor(dataset, 0.2)
        callback = FrechetDistance(RandomConvFeatures(), None, num_samples=101, batch_size=16, kid_subset_size=101)
        metrics = callback.evaluate(_trainer(dataset, rank, world_size), method)
        torch.save({"metrics": metrics, "seeds": method.seeds_drawn}, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_give_the_single_process_result(tmp_path) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_distributed_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    seeds = ranks[0]["seeds"] + ranks[1]["seeds"]
    assert sorted(seeds) == list(range(101))  # every image once: no padded duplicates, none missing
    dataset = ShapesDataset(size=120, resolution=16, seed=0)
    single = FrechetDistance(RandomConvFeatures(), None, num_samples=101, batch_size=16, kid_subset_size=101)
    expected = single.evaluate(_trainer(dataset), _Reconstructor(dataset, 0.2))
    for rank in ranks:  # every rank gets the synchronised result
        assert _values(rank["metrics"]) == pytest.approx(_values(expected), rel=1e-6)


def test_fid_callback_does_not_change_training(tiny_train_config) -> None:
    import csv
    from pathlib import Path

    from lightdiff.train import run

    def losses(*extra: str) -> list[str]:
        cfg = tiny_train_config(*extra, "trainer.max_steps=3")
        run(cfg)
        rows = csv.DictReader(next(Path(cfg.run_dir).glob("csv/version_*/metrics.csv")).open())
        return [row["train/loss"] for row in rows if row.get("train/loss")]

    plain = losses("run_name=plain")
    with_fid = losses(
        "run_name=fid",
        "metrics=fid",
        "metrics/features=random_conv",
        "metrics.every_n_steps=2",
        "metrics.num_samples=8",
        "metrics.batch_size=8",
        "metrics.steps=2",
        "metrics.cache_dir=null",
    )
    assert len(plain) == 3 and with_fid == plain  # evaluating at step 2 leaves step 3's loss untouched
