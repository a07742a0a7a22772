"""WebDataset shards (`data=shards`, `python -m lightdiff.data.shard`): written shards read back equal their source;
ranks and loader workers split the samples, each once per epoch; a stopped run resumes at the sample (with a
negative control); bad samples and unreadable shards are skipped and counted, or stop the run naming them."""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from lightdiff.config import ConfigError
from lightdiff.data import ImageFolderDataModule, ShardsDataModule
from lightdiff.data.image_folder import ImageFolderDataset
from lightdiff.data.shard import main as shard_main
from lightdiff.data.shard_stream import ShardHead, ShardStream, read_shard, shard_urls
from lightdiff.data.streams import STREAM_STATE
from lightdiff.data.transforms import ImageTransform
from lightdiff.nets.families import ConditioningSettings, family_of
from lightdiff.train import run
from lightdiff.trained import load_checkpoint_file

from .conftest import KILLABLE, REPO, compose_config, losses_by_step
from .test_bad_input import snapshot

COUNT, PER_SHARD = 32, 4  # 8 shards


def _folder(root: Path, count: int = COUNT) -> Path:
    """`count` images told apart by colour and caption ("image i"), label i mod 3, of varied sizes."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with (root / "metadata.jsonl").open("w") as metadata:
        for i in range(count):
            array = rng.integers(0, 256, size=(20 + i % 5, 18 + i % 3, 3), dtype=np.uint8)
            array[0, 0] = (i, 255 - i, 7)
            Image.fromarray(array).save(root / f"{i:03d}.png")
            metadata.write(json.dumps({"file_name": f"{i:03d}.png", "text": f"image {i}", "label": i % 3}) + "\n")
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(the source folder, the data.urls pattern of its shards)."""
    root = tmp_path_factory.mktemp("shards")
    folder = _folder(root / "images")
    shard_main([str(folder), str(root / "shards"), "--max-count", str(PER_SHARD)])
    return folder, f"{root}/shards/train-{{000000..{COUNT // PER_SHARD - 1:06d}}}.tar"


def _index(caption: str) -> int:
    return int(caption.removeprefix("image "))


def test_shards_read_back_equal_their_source(shards: tuple[Path, str], tmp_path: Path) -> None:
    folder, urls = shards
    paths = shard_urls(urls)
    assert len(paths) == COUNT // PER_SHARD and all(Path(p).is_file() for p in paths)
    transform = ImageTransform(16, center_crop=True, random_flip=False)
    source = ImageFolderDataset(str(folder), 16, random_flip=False)
    head = ShardHead(paths, transform, "txt", COUNT)
    assert len(head) == COUNT
    for i in range(COUNT):  # written in the folder's order: the same pixels, captions, labels and size records
        expected, actual = source[i], head[i]
        assert torch.equal(actual["pixel_values"], expected["pixel_values"]), f"pixels of sample {i} differ"
        assert torch.equal(actual["size_and_crop"], expected["size_and_crop"])
        assert (actual["text"], actual["label"]) == (expected["text"], expected["label"])
    raw = read_shard(paths[1])
    assert [sample["__key__"] for sample in raw] == [f"{i:09d}" for i in range(4, 8)]
    assert raw[0]["png"] == (folder / "004.png").read_bytes()  # the file's own bytes, not re-encoded
    assert json.loads(raw[0]["json"]) == {"width": 18 + 4 % 3, "height": 20 + 4 % 5, "file_name": "004.png", "label": 1}

    # From a Hugging Face data set (the same folder through datasets' imagefolder): decoded, stored as PNG, equal.
    shard_main([f"hf:{folder}", str(tmp_path / "hf"), "--caption-column", "text", "--label-column", "label"])
    from_hf = ShardHead(sorted(str(p) for p in (tmp_path / "hf").glob("*.tar")), transform, "txt", COUNT)
    for i in range(COUNT):
        assert torch.equal(from_hf[i]["pixel_values"], source[i]["pixel_values"])
        assert (from_hf[i]["text"], from_hf[i]["label"]) == (source[i]["text"], source[i]["label"])

    with pytest.raises(FileExistsError, match="already holds shards"):  # never written over
        shard_main([str(folder), str(tmp_path / "hf")])


def _captions(urls: list[str], rank: int, world_size: int, workers: int, batches: int) -> list[list[int]]:
    stream = ShardStream(urls, ImageTransform(8), 4, seed=5, rank=rank, world_size=world_size, num_streams=workers)
    loader = DataLoader(stream, batch_size=None, num_workers=workers)
    return [[_index(text) for text in batch["text"]] for batch in itertools.islice(loader, batches)]


def test_ranks_and_workers_split_every_epoch_once(shards: tuple[Path, str]) -> None:
    urls = shard_urls(shards[1])
    # 2 ranks x 2 workers: each of the 4 streams reads 2 shards (8 samples, 2 batches) per epoch
    per_rank = [_captions(urls, rank, 2, 2, batches=8) for rank in range(2)]
    epochs = [[i for rank in per_rank for batch in rank[start : start + 4] for i in batch] for start in (0, 4)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(COUNT)), "an epoch must see every sample once, over both ranks"
    assert epochs[0] != epochs[1]  # reshuffled
    assert not set(per_rank[0][0]) & set(per_rank[1][0])  # step 0's global batch: two disjoint halves
    # negative control: two processes that both think they are rank 0 read the same samples
    assert _captions(urls, 0, 2, 2, batches=4) == per_rank[0][:4]
    with pytest.raises(ValueError, match="8 shard\\(s\\) for 2 rank\\(s\\) x 8 loader stream"):
        ShardStream(urls, ImageTransform(8), 4, seed=0, world_size=2, num_streams=8)


SHARD_RUN = [
    "logger=csv",
    "data=shards",
    "data.resolution=16",
    "data.batch_size=3",
    "data.num_workers=2",
    "data.reference_size=8",
    "callbacks.samples.every_n_steps=0",
    "callbacks.samples.steps=2",
    "callbacks.samples.num_images=4",
    "callbacks.samples.final_num_images=4",
    "callbacks.checkpoint.every_n_train_steps=1",
    "trainer.log_every_n_steps=1",
]


def _train(root: Path, urls: str, name: str, steps: int) -> dict:
    cfg = compose_config(
        "train",
        [f"output_root={root}", f"run_name={name}", f'data.urls="{urls}"', f"trainer.max_steps={steps}", *SHARD_RUN],
    )
    run(cfg)
    return load_checkpoint_file(Path(cfg.run_dir) / "checkpoints" / "last.ckpt")


@pytest.fixture(scope="module")
def uninterrupted(shards: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _train(tmp_path_factory.mktemp("whole"), shards[1], "whole", 7)


@pytest.fixture(scope="module")
def stopped(shards: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The run stopped after 3 steps (its folder and last checkpoint), once: each test below resumes a copy."""
    root = tmp_path_factory.mktemp("stopped")
    return root / "cut", _train(root, shards[1], "cut", 3)


def _weights_equal(expected: dict, actual: dict) -> bool:
    return all(torch.equal(value, actual["state_dict"][key]) for key, value in expected["state_dict"].items())


def test_a_stopped_run_resumes_at_the_sample(
    shards: tuple[Path, str], uninterrupted: dict, stopped: tuple[Path, dict], tmp_path: Path
) -> None:
    """Stopped after 3 steps (stream 1's turn next, mid-shard) and resumed to 7: bit-identical to never stopping."""
    state = stopped[1]["ShardsDataModule"]
    assert state["batches_seen"] == 3 and state["num_streams"] == 2 and state["world_size"] == 1
    # stream 0 served batches 0 and 2 (6 samples: its first shard and 2 of its second), stream 1 batch 1 (3 samples)
    positions = state["ranks"][0]["positions"]
    assert positions == {0: {"cursor": [0, 1, 2], "pending": []}, 1: {"cursor": [0, 0, 3], "pending": []}}
    shutil.copytree(stopped[0], tmp_path / "cut")
    resumed = _train(tmp_path, shards[1], "cut", 7)
    assert resumed["global_step"] == uninterrupted["global_step"] == 7
    assert _weights_equal(uninterrupted, resumed)


def test_negative_control_resume_without_stream_positions(
    shards: tuple[Path, str],
    uninterrupted: dict,
    stopped: tuple[Path, dict],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    shutil.copytree(stopped[0], tmp_path / "cut")
    monkeypatch.setattr(ShardsDataModule, "load_state_dict", lambda self, state: None)  # streams start over
    assert not _weights_equal(uninterrupted, _train(tmp_path, shards[1], "cut", 7))


def test_resume_with_other_workers_is_refused(
    shards: tuple[Path, str], stopped: tuple[Path, dict], tmp_path: Path
) -> None:
    shutil.copytree(stopped[0], tmp_path / "cut")
    cfg = compose_config(
        "train",
        [f"output_root={tmp_path}", "run_name=cut", f'data.urls="{shards[1]}"', "trainer.max_steps=4", *SHARD_RUN]
        + ["data.num_workers=1"],
    )
    before = snapshot(Path(cfg.run_dir))
    for _ in range(2):  # refused before the folder is touched: its config (and history) stay the first run's
        with pytest.raises(ConfigError, match="1 rank\\(s\\) x 2 loader stream\\(s\\); this run has 1 x 1"):
            run(cfg)
    assert snapshot(Path(cfg.run_dir)) == before


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_bad_samples_and_shards_are_skipped_and_counted(
    shards: tuple[Path, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = shard_urls(shards[1])
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        png = Path(shards[0] / "000.png").read_bytes()
        _add(tar, "a.png", png[: len(png) // 2])  # truncated image
        _add(tar, "a.txt", b"truncated")
        _add(tar, "b.png", png)  # no caption
        _add(tar, "c.txt", b"no image")
        _add(tar, "d.png", png)
        _add(tar, "d.txt", b"image 0")
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"this is not a tar file" * 100)
    urls = [str(bad), str(garbage), *good[:2]]
    stream = ShardStream(urls, ImageTransform(8), 3, seed=0, shard_retries=1)
    with caplog.at_level(logging.WARNING):
        batches = list(itertools.islice(iter(stream), 3))  # 9 good samples: d + the two good shards' 8
    assert sorted(_index(text) for batch in batches for text in batch["text"]) == sorted([0, *range(8)])
    skipped_samples = sum(batch[STREAM_STATE]["skipped_samples"] for batch in batches)
    skipped_shards = sum(batch[STREAM_STATE]["skipped_shards"] for batch in batches)
    assert (skipped_samples, skipped_shards) == (3, 1)
    log = caplog.text
    assert f"sample 'a' of shard {bad}: cannot decode its png" in log
    assert f"sample 'b' of shard {bad} has no caption (txt)" in log
    assert f"sample 'c' of shard {bad} has no image" in log
    assert f"skipping shard {garbage}" in log and "retrying" in log

    strict = ShardStream([str(bad)], ImageTransform(8), 3, seed=0, skip_bad=False)
    with pytest.raises(ValueError, match=f"sample '.' of shard {bad}"):
        next(iter(strict))
    strict = ShardStream([str(garbage)], ImageTransform(8), 3, seed=0, skip_bad=False, shard_retries=0)
    with pytest.raises(OSError, match=f"cannot read shard {garbage}"):
        next(iter(strict))


def test_the_first_shard_must_open_before_anything_is_written(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(OSError, match="cannot read shard .*missing-000.tar: no such file"):
        ShardsDataModule(urls=str(tmp_path / "missing-{000..003}.tar"), resolution=8, batch_size=2)
    assert "retrying" not in caplog.text  # a local file that is not there is named at once, not retried for seconds
    with pytest.raises(ValueError, match="names no shard"):
        ShardsDataModule(urls=[], resolution=8)


def test_shards_serve_what_an_image_folder_serves(shards: tuple[Path, str]) -> None:
    folder, urls = shards
    data = ShardsDataModule(urls=urls, resolution=16, batch_size=4, num_workers=0, reference_size=COUNT)
    same = ImageFolderDataModule(root=str(folder), resolution=16, random_flip=False, batch_size=4, num_workers=0)
    assert sorted(data.captions()) == sorted(same.captions())
    batch = next(iter(data.train_dataloader()))
    assert batch["pixel_values"].shape == (4, 3, 16, 16) and batch["label"].dtype == torch.long
    assert set(batch) == {"pixel_values", "size_and_crop", "label", "text", STREAM_STATE}


def _train_ddp(root: Path, urls: str, name: str, steps: int, *extra: str) -> dict:
    overrides = [o for o in SHARD_RUN if not o.startswith(("data.num_workers", "logger"))]
    command = [sys.executable, "train.py", f"output_root={root}", f"run_name={name}", f'data.urls="{urls}"']
    command += [*overrides, "logger=csv", "data.num_workers=0", f"trainer.max_steps={steps}", *extra]
    command += ["trainer=ddp_cpu", "trainer.devices=2"]
    environment = {**os.environ, "WANDB_MODE": "offline"}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    return load_checkpoint_file(root / name / "checkpoints" / "last.ckpt")


@pytest.mark.slow  # two DDP launches of two gloo processes each
def test_two_ranks_read_their_own_shards_and_resume_at_the_sample(shards: tuple[Path, str], tmp_path: Path) -> None:
    whole = _train_ddp(tmp_path, shards[1], "whole", 6, "callbacks.checkpoint.save_top_k=-1")  # keeps every step's
    state = whole["ShardsDataModule"]
    assert state["world_size"] == 2 and state["batches_seen"] == 6
    # each rank's one stream read 6 batches of 3 = 18 samples of its 4 shards of 4: epoch 1, sample 2 of its first
    expected = [
        ShardStream(shard_urls(shards[1]), ImageTransform(16), 3, 0, rank, 2).shards_of(0, 0) for rank in (0, 1)
    ]
    assert not set(expected[0]) & set(expected[1])
    assert [rank["positions"] for rank in state["ranks"]] == [{0: {"cursor": [1, 0, 2], "pending": []}}] * 2
    # resumed from the uninterrupted run's step-3 checkpoint, mid-epoch, as a run preempted there would be
    halfway = tmp_path / "whole" / "checkpoints" / "step0000003.ckpt"
    assert load_checkpoint_file(halfway)["ShardsDataModule"]["batches_seen"] == 3
    resumed = _train_ddp(tmp_path, shards[1], "cut", 6, f"ckpt_path={halfway}")
    assert _weights_equal(whole, resumed)


def test_held_out_shards_and_folders_serve_validation_batches(shards: tuple[Path, str]) -> None:
    folder, urls = shards
    data = ShardsDataModule(urls=urls, resolution=16, batch_size=4, num_workers=0, val_urls=urls, val_size=6)
    batches = list(data.val_dataloader())
    assert [len(batch["text"]) for batch in batches] == [4, 2]  # the first 6 samples in URL order, fixed
    assert [text for batch in batches for text in batch["text"]] == [f"image {i}" for i in range(6)]
    same = ImageFolderDataModule(root=str(folder), resolution=16, batch_size=4, num_workers=0, val_root=str(folder))
    held_out = next(iter(same.val_dataloader()))
    assert torch.equal(held_out["pixel_values"], batches[0]["pixel_values"])  # centre-cropped, never flipped
    assert ShardsDataModule(urls=urls, resolution=16, batch_size=4, num_workers=0).val_dataloader() == []


def _hf_captions(folder: Path, rank: int, world_size: int, workers: int, batches: int, buffer: int = 1) -> list:
    import datasets

    from lightdiff.data.hf_stream import HFStream

    source = datasets.load_dataset(str(folder), split="train", streaming=True)
    stream = HFStream(
        source, ImageTransform(8), 4, 5, rank, world_size, workers, "image", "text", "label", buffer, True
    )
    loader = DataLoader(stream, batch_size=None, num_workers=workers)
    return [[_index(text) for text in batch["text"]] for batch in itertools.islice(loader, batches)]


def test_hf_streaming_splits_every_epoch_once(shards: tuple[Path, str]) -> None:
    folder = shards[0]
    per_rank = [_hf_captions(folder, rank, 2, 2, batches=8) for rank in range(2)]  # 32 examples, 4 streams of 8
    epochs = [[i for rank in per_rank for batch in rank[start : start + 4] for i in batch] for start in (0, 4)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(COUNT)), "an epoch must see every example once, over both ranks"
    assert not set(per_rank[0][0]) & set(per_rank[1][0])


HF_RUN = [
    "data=hf",
    "data.streaming=true",
    "data.shuffle_buffer=1",
    "data.caption_column=text",
    "data.random_flip=false",
    "data.reference_size=8",
]


def _train_hf(root: Path, folder: Path, name: str, steps: int) -> dict:
    overrides = [o for o in SHARD_RUN if o != "data=shards" and not o.startswith("data.reference_size")]
    cfg = compose_config(
        "train",
        [f"output_root={root}", f"run_name={name}", f"data.name={folder}", f"trainer.max_steps={steps}"]
        + [*overrides, *HF_RUN],
    )
    run(cfg)
    return load_checkpoint_file(Path(cfg.run_dir) / "checkpoints" / "last.ckpt")


def test_a_stopped_hf_stream_resumes_at_the_sample(shards: tuple[Path, str], tmp_path: Path) -> None:
    whole = _train_hf(tmp_path, shards[0], "whole", 7)
    stopped = _train_hf(tmp_path, shards[0], "cut", 3)
    positions = stopped["HFDataModule"]["ranks"][0]["positions"]
    assert sorted(positions) == [0, 1] and positions[0]["epoch"] == 0  # datasets' own state per stream
    resumed = _train_hf(tmp_path, shards[0], "cut", 7)
    assert _weights_equal(whole, resumed)


def test_a_shuffle_buffer_holds_at_most_its_size_and_serves_a_replayable_permutation() -> None:
    """buffered_draws: every member once, never more than `size` read and not yet served, the same order for the same
    seed (what a resumed stream replays) and another for another seed (the control: the draws are random)."""
    import random

    from lightdiff.data.shard_stream import buffered_draws

    def drawn(size: int, seed: int) -> tuple[list[int], int]:
        read = served = most = 0

        def members() -> Iterator[dict]:
            nonlocal read
            for index in range(40):
                read += 1
                yield {"index": index}

        order = []
        for member in buffered_draws(members(), size, random.Random(seed)):
            most = max(most, read - served)
            served += 1
            order.append(member["index"])
        return order, most

    order, most = drawn(5, 0)
    assert sorted(order) == list(range(40)) and most <= 5
    assert order != list(range(40)) and order[0] < 5  # shuffled, and the first draw is one of the first 5 read
    assert drawn(5, 0)[0] == order and drawn(5, 1)[0] != order
    whole, most = drawn(1000, 0)  # a buffer larger than the shard: a permutation of all of it
    assert sorted(whole) == list(range(40)) and most == 40


def test_resuming_with_another_shuffle_buffer_is_refused(shards: tuple[Path, str]) -> None:
    """Positions within a shard depend on the buffer: a checkpoint made with another one (or before buffers, when
    shards were read whole: no key, = null) is refused by name."""
    module = ShardsDataModule(urls=shards[1], resolution=16, reference_size=4, shuffle_buffer=1000)
    layout = {"world_size": 1, "num_streams": 2, "batches_seen": 3, "ranks": []}
    module.check_resume({**layout, "shuffle_buffer": 1000}, world_size=1)
    with pytest.raises(ConfigError, match=r"made with data.shuffle_buffer=null; this run says 1000"):
        module.check_resume(layout, world_size=1)
    with pytest.raises(ConfigError, match=r"made with data.shuffle_buffer=4; .* resume with data.shuffle_buffer=4"):
        module.check_resume({**layout, "shuffle_buffer": 4}, world_size=1)


@pytest.mark.parametrize("shuffle_buffer", [None, 2])  # each shard whole; a buffer smaller than a shard (4 samples)
def test_bucketed_shards_batch_one_bucket_and_resume_with_waiting_samples(
    tmp_path: Path, shuffle_buffer: int | None
) -> None:
    folder = tmp_path / "aspects"
    folder.mkdir()
    sizes = [(16, 32), (32, 16), (24, 24)]  # (height, width): wide, tall, square
    with (folder / "metadata.jsonl").open("w") as metadata:
        for i in range(24):
            height, width = sizes[i % 3]
            array = np.full((height, width, 3), 10 * i, dtype=np.uint8)
            Image.fromarray(array).save(folder / f"{i:03d}.png")
            metadata.write(json.dumps({"file_name": f"{i:03d}.png", "text": f"image {i}"}) + "\n")
    shard_main([str(folder), str(tmp_path / "shards"), "--max-count", "4"])
    urls = shard_urls(f"{tmp_path}/shards/train-{{000000..000005}}.tar")
    buckets = [(8, 16), (16, 8), (12, 12)]

    def stream() -> ShardStream:
        return ShardStream(urls, ImageTransform(12), 3, seed=1, buckets=buckets, shuffle_buffer=shuffle_buffer)

    batches = list(itertools.islice(iter(stream()), 12))  # 24 images a epoch, 8 batches: into the second epoch
    for batch in batches:  # one bucket a batch, each image in the bucket of its own aspect ratio
        shape = tuple(batch["pixel_values"].shape[-2:])
        assert shape in buckets
        assert all(
            sizes[_index(text) % 3] == {(8, 16): (16, 32), (16, 8): (32, 16), (12, 12): (24, 24)}[shape]
            for text in batch["text"]
        )
    states = [batch[STREAM_STATE]["position"] for batch in batches]
    waiting = next(k for k, state in enumerate(states[:8]) if state["pending"])  # samples left waiting after batch k
    resumed = stream()
    resumed.start = {0: states[waiting]}
    again = list(itertools.islice(iter(resumed), 12 - waiting - 1))
    for expected, actual in zip(batches[waiting + 1 :], again, strict=True):
        assert expected["text"] == actual["text"]
        assert torch.equal(expected["pixel_values"], actual["pixel_values"])
    # negative control: resumed from the cursor alone, the waiting samples are lost and the batches differ
    forgetful = stream()
    forgetful.start = {0: {"cursor": states[waiting]["cursor"], "pending": []}}
    lost = list(itertools.islice(iter(forgetful), 12 - waiting - 1))
    assert [b["text"] for b in lost] != [b["text"] for b in batches[waiting + 1 :]]


def test_shards_with_latents_train_a_latent_model_without_encoding(shards: tuple[Path, str], tmp_path: Path) -> None:
    from diffusers import AutoencoderKL

    from .conftest import tiny_vae

    folder = shards[0]
    tiny_vae().save_pretrained(tmp_path / "vae")
    shard_main(
        [str(folder), str(tmp_path / "latents"), "--max-count", "8", "--vae", str(tmp_path / "vae")]
        + ["--resolution", "16"]
    )
    urls = f"{tmp_path}/latents/train-{{000000..000003}}.tar"
    raw = read_shard(shard_urls(urls)[0])[2]
    stored = torch.from_numpy(np.load(io.BytesIO(raw["moments.npy"])))
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae")
    pixels = ImageFolderDataset(str(folder), 16, random_flip=False)[2]["pixel_values"]
    with torch.no_grad():
        expected = vae.encode(pixels[None]).latent_dist.parameters[0]
    assert stored.dtype == torch.float16 and torch.allclose(stored.float(), expected, atol=2e-3)

    def train(name: str, vae_dir: Path) -> Path:
        cfg = compose_config(
            "train",
            [f"output_root={tmp_path}", f"run_name={name}", f'data.urls="{urls}"', "trainer.max_steps=2", *SHARD_RUN]
            + ["model=latent", f"model.vae={vae_dir}", "data.cache_latents=true", "data.num_workers=0"],
        )
        run(cfg)
        return Path(cfg.run_dir)

    served: list[set[str]] = []
    original = ShardsDataModule.on_before_batch_transfer
    try:
        ShardsDataModule.on_before_batch_transfer = lambda self, batch, index: (
            served.append(set(batch)) or original(self, batch, index)
        )
        train("stored", tmp_path / "vae")
    finally:
        ShardsDataModule.on_before_batch_transfer = original
    assert served and all("latent_moments" in keys and "pixel_values" not in keys for keys in served)
    other = tiny_vae()
    with torch.no_grad():
        other.decoder.conv_out.bias.add_(1)  # another VAE: different weights
    other.save_pretrained(tmp_path / "other_vae")
    with pytest.raises(ConfigError, match="stores latents of another VAE or resolution"):
        train("other", tmp_path / "other_vae")


def test_shards_are_read_over_http_as_from_disk(shards: tuple[Path, str]) -> None:
    """https:// and http:// shards go through webdataset's own opener (curl): the same samples as from the disk."""
    import http.server
    import threading
    from functools import partial

    shard_folder = Path(shard_urls(shards[1])[0]).parent
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(shard_folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        remote = f"http://127.0.0.1:{server.server_address[1]}/train-{{000000..000007}}.tar"
        transform = ImageTransform(16)
        over_http = ShardHead(shard_urls(remote), transform, "txt", COUNT)
        local = ShardHead(shard_urls(shards[1]), transform, "txt", COUNT)
        assert len(over_http) == COUNT
        assert all(torch.equal(over_http[i]["pixel_values"], local[i]["pixel_values"]) for i in range(COUNT))
        with pytest.raises(OSError, match="cannot read shard http://127.0.0.1:.*/missing.tar"):
            read_shard(remote.replace("train-{000000..000007}", "missing"), retries=0)
    finally:
        server.shutdown()


def test_s3_shards_are_streamed_through_the_aws_command_line(
    shards: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """s3:// shards are piped from `aws s3 cp URL -`, as webdataset's documentation reads them. Offline, a stand-in
    `aws` on PATH serves s3://bucket/KEY from a folder and logs its arguments: the same samples as from the disk, and
    the command line a real AWS CLI gets. (A real bucket is untested here: no network.)"""
    shard_folder = Path(shard_urls(shards[1])[0]).parent
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "bin" / "aws"
    fake.parent.mkdir()
    fake.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {calls}\n'
        '[ "$1 $2 $4" = "s3 cp -" ] || exit 2\n'
        f'exec cat "{shard_folder}/${{3#s3://bucket/}}"\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    transform = ImageTransform(16)
    from_s3 = ShardHead(shard_urls("s3://bucket/train-{000000..000007}.tar"), transform, "txt", COUNT)
    local = ShardHead(shard_urls(shards[1]), transform, "txt", COUNT)
    assert [item["text"] for item in from_s3] == [item["text"] for item in local]
    assert all(torch.equal(from_s3[i]["pixel_values"], local[i]["pixel_values"]) for i in range(COUNT))
    assert calls.read_text().splitlines()[0] == "s3 cp s3://bucket/train-000000.tar -"
    with pytest.raises(OSError, match="cannot read shard s3://bucket/missing.tar"):
        read_shard("s3://bucket/missing.tar", retries=0)


@pytest.mark.slow  # a training subprocess killed with SIGKILL
def test_sigkill_then_resume_continues_at_the_sample(
    shards: tuple[Path, str], uninterrupted: dict, tmp_path: Path
) -> None:
    overrides = [f"output_root={tmp_path}", "run_name=killed", f'data.urls="{shards[1]}"', "trainer.max_steps=7"]
    code = KILLABLE.format(repo=str(REPO), overrides=[*overrides, *SHARD_RUN])
    checkpoints = tmp_path / "killed" / "checkpoints"
    child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "WANDB_MODE": "offline"})
    try:
        deadline = time.monotonic() + 300
        while not (checkpoints / "step0000003.ckpt").exists():
            assert child.poll() is None and time.monotonic() < deadline, "the child run did not reach step 3"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    killed_at = load_checkpoint_file(checkpoints / "last.ckpt")
    assert killed_at["global_step"] < 7, "killed too late to prove anything"
    resumed = _train(tmp_path, shards[1], "killed", 7)
    # The same samples at every step: the same stream positions at the end and the same loss at every step. (Not
    # compared bit for bit: the killed child process may sum floats in another order than this one, 1e-7 apart.)
    assert resumed["ShardsDataModule"] == uninterrupted["ShardsDataModule"]
    whole_losses = losses_by_step(next(tmp_path.parent.glob("whole*/whole")))
    resumed_losses = losses_by_step(tmp_path / "killed")
    after_the_kill = range(killed_at["global_step"] + 1, 7)  # (the child's last steps may not have reached its CSV)
    assert set(after_the_kill) <= set(resumed_losses) and sorted(whole_losses) == list(range(7))
    assert all(loss == pytest.approx(whole_losses[step], rel=1e-5) for step, loss in resumed_losses.items())


def _sd_pipeline(folder: Path, captions: list[str]) -> Path:
    """A tiny Stable Diffusion pipeline folder (CLIP text encoder of width 16)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from lightdiff.nets.text import build_caption_tokenizer, text_encoder_from_scratch

    from .conftest import tiny_cond_unet, tiny_vae

    tokenizer = build_caption_tokenizer(captions, vocab_size=300, model_max_length=8)
    StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=text_encoder_from_scratch(tokenizer, hidden_size=16, num_hidden_layers=1, num_attention_heads=2),
        tokenizer=tokenizer,
        unet=tiny_cond_unet(16),
        scheduler=DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(folder)
    return folder


def test_shards_with_text_states_train_without_encoding_a_caption(shards: tuple[Path, str], tmp_path: Path) -> None:
    """`--text-encoder PIPELINE` stores each caption's states under the pipeline's frozen encoder; a run with that
    pipeline and data.cache_latents=true trains from them, encoding no caption (negative control: shards without
    them encode every caption); shards of another encoder are refused."""
    from transformers import CLIPTextModel

    from lightdiff.methods.diffusion import DiffusionTraining
    from lightdiff.nets.families import load_denoiser

    folder = shards[0]
    captions = [f"image {i}" for i in range(COUNT)]
    pipeline = _sd_pipeline(tmp_path / "pipeline", captions)
    written = {}
    for name, text in (("with_text", ["--text-encoder", str(pipeline)]), ("latents_only", [])):
        shard_main(
            [str(folder), str(tmp_path / name), "--max-count", "8", "--vae", str(pipeline / "vae"), "--resolution"]
            + ["16", *text]
        )
        written[name] = f"{tmp_path}/{name}/train-{{000000..000003}}.tar"
    net = load_denoiser(str(pipeline))
    family = family_of(net).pretrained_conditioning(str(pipeline), net, ConditioningSettings(), "p")
    for raw in read_shard(shard_urls(written["with_text"])[1]):
        stored = torch.from_numpy(np.load(io.BytesIO(raw["text.npy"])))
        with torch.no_grad():
            expected = family.encode([raw["txt"].decode()])[0]
        assert stored.dtype == torch.float16 and stored.shape == expected.shape == (8, 16)
        torch.testing.assert_close(stored.float(), expected, atol=5e-3, rtol=1e-2)
        assert json.loads(raw["json"])["text_states"] == {"encoder": family.cache_fingerprint(), "caption": "txt"}

    def train(name: str, urls: str, model: Path) -> list[int]:
        """The batch sizes the text encoder was called with inside training steps."""
        calls: list[int] = []
        in_step = [False]
        encoder_forward, training_step = CLIPTextModel.forward, DiffusionTraining.training_step

        def counted_forward(self, input_ids=None, *args, **kwargs):
            if in_step[0]:
                calls.append(len(input_ids))
            return encoder_forward(self, input_ids, *args, **kwargs)

        def step(self, batch, index):
            in_step[0] = True
            try:
                return training_step(self, batch, index)
            finally:
                in_step[0] = False

        cfg = compose_config(
            "train",
            [f"output_root={tmp_path}", f"run_name={name}", f'data.urls="{urls}"', "trainer.max_steps=2", *SHARD_RUN]
            + ["model=latent", f"model.pretrained={model}", "model.vae=null", "model.load_pretrained_unet=true"]
            + ["data.cache_latents=true", "data.num_workers=0", "model.cond_drop_prob=0.0"],
        )
        try:
            CLIPTextModel.forward, DiffusionTraining.training_step = counted_forward, step
            run(cfg)
        finally:
            CLIPTextModel.forward, DiffusionTraining.training_step = encoder_forward, training_step
        return calls

    assert set(train("stored", written["with_text"], pipeline)) == {1}  # only the empty prompt (dropped captions')
    assert 3 in train("encoded", written["latents_only"], pipeline)  # negative control: every batch's captions
    other = shutil.copytree(pipeline, tmp_path / "other")  # the same VAE (the latents stay valid), another encoder
    encoder = CLIPTextModel.from_pretrained(other / "text_encoder")
    with torch.no_grad():
        encoder.final_layer_norm.bias.add_(0.1)
    encoder.save_pretrained(other / "text_encoder")
    with pytest.raises(ConfigError, match="stores text states of another text encoder"):
        train("other", written["with_text"], other)
