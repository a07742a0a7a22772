"""Aspect-ratio buckets: the bucket list, one bucket per batch on every rank, exact resume, image folders and HF data
sets, the variable-aspect shapes data, the latent cache per bucket, and the errors that name the bad key or file."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightdiff.config import ConfigError
from lightdiff.data import HFDataModule, ImageFolderDataModule, ShapesDataModule
from lightdiff.data.buckets import bucket_sizes, generated_buckets, nearest_bucket
from lightdiff.data.sampler import BucketBatchSampler
from lightdiff.train import run
from lightdiff.trained import load_checkpoint_file

from .conftest import TINY, compose_config
from .test_exact_resume import _assert_same_state

# Variable-aspect shapes (pictures of 1:2, 1:1 and 2:1) in the three buckets of area <= 16 x 16 with sides multiples
# of 4: (20, 12), (16, 16), (12, 20).
BUCKETED = ["data.aspect_ratios=[0.5,1.0,2.0]", "data.buckets={step: 4}"]


def test_generated_buckets_have_equal_area_sides_on_the_step_and_both_orientations() -> None:
    buckets = generated_buckets(1024 * 1024, 64)
    assert (1024, 1024) in buckets and (832, 1216) in buckets and (1216, 832) in buckets  # SDXL's published sizes
    for height, width in buckets:
        assert height % 64 == 0 and width % 64 == 0
        assert 0.85 * 1024 * 1024 <= height * width <= 1024 * 1024
        assert max(height, width) <= 2 * min(height, width)
        assert (width, height) in buckets
    assert bucket_sizes({"step": 4}, resolution=16) == [(20, 12), (16, 16), (12, 20)]  # max_area: resolution^2
    assert bucket_sizes([[16, 16], [8, 32], [16, 16]], resolution=16) == [(16, 16), (8, 32)]
    assert [nearest_bucket(h, w, [(20, 12), (16, 16), (12, 20)]) for h, w in ((40, 20), (30, 33), (10, 30))] == [
        0,
        1,
        2,
    ]
    for bad, message in (
        ([[16, 0]], r"\[16, 0\] is not a \[height, width\] pair"),
        ([[16]], r"\[16\] is not"),
        ({"max_area": 64}, "takes step"),
        ({"step": 4, "area": 3}, "unknown: \\['area'\\]"),
        ({"step": 64, "max_area": 100}, "give no bucket"),
    ):
        with pytest.raises(ConfigError, match=message):
            bucket_sizes(bad, resolution=16)


def test_every_batch_is_one_bucket_split_over_ranks_and_resumable() -> None:
    generator = torch.Generator().manual_seed(0)
    bucket_of = torch.randint(3, (100,), generator=generator).tolist()
    one = BucketBatchSampler(bucket_of, batch_size=8, seed=5)
    ranks = [BucketBatchSampler(bucket_of, batch_size=4, seed=5, rank=r, world_size=2) for r in range(2)]
    whole, shares = one.epoch_batches(), [r.epoch_batches() for r in ranks]
    assert len(whole) == one.batches_per_epoch == sum(bucket_of.count(b) // 8 for b in range(3))
    for batch, first, second in zip(whole, *shares):
        assert len({bucket_of[i] for i in batch}) == 1  # one bucket
        assert first + second == batch  # the two ranks' shares are the one-process global batch
    used = [i for batch in whole for i in batch]
    assert len(used) == len(set(used))  # no image twice in an epoch
    assert {bucket_of[batch[0]] for batch in whole} == {0, 1, 2}  # buckets interleaved, not one after the other
    stream = list(itertools.islice(iter(one), 3 * one.batches_per_epoch))
    resumed = BucketBatchSampler(bucket_of, batch_size=8, seed=5)
    resumed.resume_from(one.batches_per_epoch + 3)  # one epoch and three batches in
    assert (
        list(itertools.islice(iter(resumed), one.batches_per_epoch))
        == stream[one.batches_per_epoch + 3 : 2 * one.batches_per_epoch + 3]
    )
    assert stream[: one.batches_per_epoch] != stream[one.batches_per_epoch : 2 * one.batches_per_epoch]  # reshuffled
    with pytest.raises(ValueError, match="no bucket holds a global batch"):
        BucketBatchSampler([0, 1, 2, 0], batch_size=2, seed=0, world_size=2)


def _images(root: Path, sizes: list[tuple[int, int]]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for index, (height, width) in enumerate(sizes):
        array = np.full((height, width, 3), 40 * (index % 6), dtype=np.uint8)
        Image.fromarray(array).save(root / f"{index:03d}.png")
    return root


def test_image_folder_batches_come_at_their_buckets_size_with_crops_recorded(tmp_path: Path) -> None:
    root = _images(tmp_path / "images", [(40, 20)] * 4 + [(32, 32)] * 4 + [(20, 44)] * 4)
    module = ImageFolderDataModule(
        str(root), resolution=16, buckets={"step": 4}, batch_size=2, num_workers=0, random_flip=False
    )
    module.order_seed = 0
    batches = list(itertools.islice(iter(module.train_dataloader()), 6))
    sizes = sorted({tuple(batch["pixel_values"].shape[-2:]) for batch in batches})
    assert sizes == [(12, 20), (16, 16), (20, 12)]
    for batch in batches:
        height, width = batch["pixel_values"].shape[-2:]
        assert (batch["size_and_crop"][:, 4:] == torch.tensor([height, width])).all()  # the target is the bucket
    tall = next(b for b in batches if b["pixel_values"].shape[-2:] == (20, 12))
    assert tall["size_and_crop"][0, :2].tolist() == [40, 20]  # each image's original size
    # An image smaller than every bucket stops the data set before training, naming the file ...
    _images(tmp_path / "small", [(40, 20)] * 3 + [(8, 8)])
    with pytest.raises(ValueError, match="003.png is 8x8 .*smaller than every bucket"):
        ImageFolderDataModule(str(tmp_path / "small"), resolution=16, buckets={"step": 4}, batch_size=2)
    # ... or is left out and counted with data.skip_bad=true
    skipping = ImageFolderDataModule(
        str(tmp_path / "small"), resolution=16, buckets={"step": 4}, batch_size=2, skip_bad=True
    )
    assert [path.name for path in skipping.source_dataset.skipped] == ["003.png"]


def test_hf_data_sets_take_buckets_too(tmp_path: Path) -> None:
    root = _images(tmp_path / "images", [(40, 20)] * 2 + [(20, 44)] * 2)
    module = HFDataModule(name=str(root), resolution=16, buckets=[[20, 12], [12, 20]], batch_size=2, num_workers=0)
    assert module.source_dataset.bucket_of == [0, 0, 1, 1]
    assert module.source_dataset[3]["pixel_values"].shape == (3, 12, 20)
    with pytest.raises(ValueError, match="smaller than every bucket"):
        HFDataModule(name=str(root), resolution=16, buckets=[[48, 48]], batch_size=2)


def test_variable_aspect_shapes_centre_cropped_or_bucketed() -> None:
    cropped = ShapesDataModule(resolution=16, size=30, aspect_ratios=[0.5, 2.0], batch_size=2)
    item = cropped.source_dataset[0]
    assert item["pixel_values"].shape == (3, 16, 16)
    original_h, original_w, top, left, _, _ = item["size_and_crop"].tolist()
    assert {original_h, original_w} == {45, 23} and (top, left) != (0, 0)  # 2x the side of the equal-area square
    bucketed = ShapesDataModule(resolution=16, size=30, aspect_ratios=[0.5, 2.0], buckets={"step": 4}, batch_size=2)
    dataset = bucketed.source_dataset
    for index in range(30):
        height, width = dataset.picture_size(index)
        expected = (20, 12) if height > width else (12, 20)
        assert tuple(dataset[index]["pixel_values"].shape[-2:]) == expected
    assert bucketed.identity != cropped.identity  # caches of the two never mix


def _bucketed_run(root: Path, name: str, *extra: str) -> Path:
    cfg = compose_config(
        "train",
        [f"output_root={root}", *TINY, f"run_name={name}", "data.size=24", "callbacks.samples.every_n_steps=0"]
        + [*BUCKETED, *extra],
    )
    run(cfg)
    return Path(cfg.run_dir) / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def bucketed_whole(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return load_checkpoint_file(_bucketed_run(tmp_path_factory.mktemp("whole"), "whole", "trainer.max_steps=8"))


def test_a_bucketed_pixel_run_resumes_bit_identical(bucketed_whole: dict, tmp_path: Path, monkeypatch) -> None:
    """Stopped at step 3 and resumed to 8 (an epoch is 5 batches here): the same weights, EMA and optimiser state."""
    _bucketed_run(tmp_path, "cut", "trainer.max_steps=3")
    _assert_same_state(bucketed_whole, load_checkpoint_file(_bucketed_run(tmp_path, "cut", "trainer.max_steps=8")))
    # negative control: a sampler that forgets its position is caught
    monkeypatch.setattr(BucketBatchSampler, "resume_from", lambda self, batches_seen: None)
    _bucketed_run(tmp_path, "forgets", "trainer.max_steps=3")
    with pytest.raises(AssertionError, match="weights differ"):
        _assert_same_state(
            bucketed_whole, load_checkpoint_file(_bucketed_run(tmp_path, "forgets", "trainer.max_steps=8"))
        )


def test_buckets_that_do_not_fit_the_network_are_named_before_the_run_folder(tmp_path: Path) -> None:
    cfg = compose_config(
        "train",
        [
            f"output_root={tmp_path}",
            *TINY,
            "run_name=x",
            "data.aspect_ratios=[0.5,2]",
            "data.buckets=[[16,16],[10,26]]",
        ],
    )
    with pytest.raises(ConfigError, match=r"data.buckets: 10x26 .* not a multiple of 4"):
        run(cfg)
    assert not (tmp_path / "x").exists()


def test_latent_cache_per_bucket_with_sdxl_text_states(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """data.cache_latents with buckets: latents of each bucket's size, both encoders' states and the pooled vector
    cached (frozen encoders of a pipeline), size / crop ids kept; the run trains from the cache: the VAE encodes each
    of the 24 pictures once (building the cache), and none in the training steps."""
    from diffusers import AutoencoderKL

    from .conftest import count_encoded, tiny_vae
    from .test_sdxl import _family, _pipeline

    encoded = count_encoded(monkeypatch, AutoencoderKL)

    folder = tmp_path / "sdxl"
    _pipeline(_family()).save_pretrained(folder)
    tiny_vae()  # the pipeline's VAE is this one
    cfg = compose_config(
        "train",
        [
            f"output_root={tmp_path}",
            *TINY,
            "run_name=cached",
            "model=latent",
            f"model.pretrained={folder}",
            "model.load_pretrained_unet=true",
            "model.vae=null",
            "data.cache_latents=true",
            f"data.latent_cache_dir={tmp_path / 'cache'}",
            "data.size=24",
            *BUCKETED,
        ],
    )
    module = run(cfg).lightning_module
    assert sum(encoded) == 24 and module.trainer.global_step == 2  # steps that encoded on the fly would add theirs
    dataset = module.trainer.datamodule.dataset
    shapes = {tuple(dataset[i]["latent_moments"].shape) for i in range(24)}
    assert shapes == {(8, 10, 6), (8, 8, 8), (8, 6, 10)}  # moments (2C) of 20x12, 16x16 and 12x20 pictures
    item = dataset[0]
    assert item["text_states"].shape == (8 + 1, 32)  # 8 tokens of 16 + 16 wide states, then the pooled row
    assert item["size_and_crop"][4:].tolist() == [2 * s for s in item["latent_moments"].shape[1:]]
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2  # latents and text states


def test_cut_by_border_tells_a_cut_shape_from_one_touching_the_edge() -> None:
    from lightdiff.data.shapes import draw_shape
    from lightdiff.metrics.shapes import cut_by_border, touches_border

    touching = np.asarray(draw_shape("square", "red", 8, 0, 4, 16))  # whole, its left side on the border
    cut = np.asarray(draw_shape("circle", "blue", 10, -5, 3, 16))  # half of it outside the picture
    inside = np.asarray(draw_shape("triangle", "green", 8, 4, 4, 16))
    empty = np.zeros((16, 16, 3), dtype=np.uint8)
    assert cut_by_border(np.stack([touching, cut, inside, empty])).tolist() == [False, True, False, False]
    assert touches_border(np.stack([touching, cut, inside, empty])).tolist() == [True, True, False, False]
