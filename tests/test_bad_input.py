"""Bad input never half-done (issue 23): every value and file is checked before anything is written, a refused
command leaves the run, `out/` or export folder byte-for-byte as it was, and no end-of-run failure costs a result.

Each test names the point of the issue it covers; each asserts the message names the key, file or line.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lightdiff.data.image_folder as image_folder
import lightdiff.files as files
from lightdiff.callbacks.samples import SampleGrid
from lightdiff.config import ConfigError
from lightdiff.data import ImageFolderDataModule
from lightdiff.data.image_folder import ImageFolderDataset
from lightdiff.files import remove_orphaned_temporaries, save_atomically
from lightdiff.sample import run as sample_run
from lightdiff.train import run as train_run
from lightdiff.trained import load_trained

from .conftest import TINY, compose_config


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden ones too) by relative path -> sha256 of its bytes; {} when it is absent."""
    if not folder.exists():
        return {}
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _image_folder(root: Path, count: int = 8, labels: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with (root / "metadata.jsonl").open("w") as metadata:
        for i in range(count):
            Image.new("RGB", (16, 16), (20 * i, 100, 200)).save(root / f"{i:03d}.png")
            record = {"file_name": f"{i:03d}.png", "text": f"image {i}"} | ({"label": i % 2} if labels else {})
            metadata.write(json.dumps(record) + "\n")
    return root


def _image_folder_run(tmp_path: Path, root: Path, *overrides: str):
    """The tiny run's config (conftest.TINY) training on the image folder `root`."""
    tiny = [o for o in TINY if not o.startswith("data.size")]  # shapes only
    data = ["data=image_folder", f"data.root={root}", "data.num_workers=0", "data.resolution=16"]
    data.append(f"data.scan_cache_dir={tmp_path / 'scans'}")
    return compose_config("train", [f"output_root={tmp_path}", *tiny, *data, *overrides])


def _rewrite_metadata(root: Path, edit) -> None:
    """Rewrite metadata.jsonl with `edit(records)` applied (a list of dicts, one a line)."""
    records = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in edit(records)))


# ----- 1. a failing end-of-run callback never costs the final checkpoint -------------------------------------------


def test_final_num_images_zero_means_no_final_round(tiny_train_config) -> None:
    cfg = tiny_train_config("callbacks.samples.final_num_images=0")
    train_run(cfg)
    run_dir = Path(cfg.run_dir)
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2
    assert not list((run_dir / "samples").glob("final_*")) if (run_dir / "samples").exists() else True


def test_a_failing_end_of_run_callback_keeps_the_final_checkpoint(tiny_train_config, monkeypatch) -> None:
    def broken(self, trainer, pl_module, count, prefix):
        raise RuntimeError("the final grid failed")

    monkeypatch.setattr(SampleGrid, "_sample_and_log", broken)
    cfg = tiny_train_config("trainer.max_steps=3", "callbacks.checkpoint.every_n_train_steps=2")
    with pytest.raises(RuntimeError, match="the final grid failed"):
        train_run(cfg)
    # Step 3 is not a multiple of the checkpoint interval: only the final save can have written it.
    checkpoint = torch.load(Path(cfg.run_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 3


def test_samples_callback_values_are_checked_before_training(tiny_train_config) -> None:
    cfg = tiny_train_config("callbacks.samples.final_num_images=-1")
    with pytest.raises(ConfigError, match=r"callbacks.samples.final_num_images=-1 must be >= 0"):
        train_run(cfg)
    assert not Path(cfg.run_dir).exists()


# ----- 2, 3 and 8: sample.py checks every value first and replaces an output folder whole -------------------------


@pytest.fixture(scope="module")
def earlier_samples(pixel_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("earlier") / "samples"
    sample_run(compose_config("sample", [f"ckpt={pixel_ckpt}", f"out={out}", "num_images=3", "steps=2"]))
    return out


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("steps=0", "steps=0 must be at least 1"),
        ("num_images=0", "num_images=0 must be at least 1"),
        ("batch_size=-2", "batch_size=-2 must be at least 1"),
        ("eta=-1", "eta=-1 must be >= 0"),
        ("guidance_scale=nan", "guidance_scale=nan must be a finite number"),
    ],
)
def test_a_refused_sample_command_leaves_the_out_folder_as_it_was(
    override: str, named: str, earlier_samples: Path, pixel_ckpt: Path
) -> None:
    before = snapshot(earlier_samples)
    cfg = compose_config("sample", [f"ckpt={pixel_ckpt}", f"out={earlier_samples}", "overwrite=true", override])
    with pytest.raises(ConfigError, match=named):
        sample_run(cfg)
    assert snapshot(earlier_samples) == before and before  # metadata.jsonl not truncated, nothing added


def test_overwrite_replaces_samples_only_once_the_new_ones_are_complete(
    pixel_ckpt: Path, tmp_path: Path, monkeypatch
) -> None:
    out = tmp_path / "samples"
    sample_run(compose_config("sample", [f"ckpt={pixel_ckpt}", f"out={out}", "num_images=4", "steps=2"]))
    before = snapshot(out)
    import lightdiff.drawing as drawing_module

    real_generate = drawing_module.generate
    calls = []

    def fails_on_the_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory in the second batch")
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(drawing_module, "generate", fails_on_the_second_batch)
    cfg = [f"ckpt={pixel_ckpt}", f"out={out}", "num_images=2", "batch_size=1", "steps=2", "overwrite=true"]
    with pytest.raises(RuntimeError, match="second batch"):
        sample_run(compose_config("sample", cfg))
    assert snapshot(out) == before  # the earlier 4 samples, whole
    assert [p.name for p in tmp_path.iterdir()] == ["samples"]  # no partial folder left beside it
    monkeypatch.setattr(drawing_module, "generate", real_generate)
    sample_run(compose_config("sample", cfg))
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png", "grid.png", "metadata.jsonl"]
    assert len((out / "metadata.jsonl").read_text().splitlines()) == 2  # no line of the earlier 4 is left


def test_overwrite_never_replaces_a_folder_with_files_sample_py_did_not_write(pixel_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    before = snapshot(out)
    with pytest.raises(ConfigError, match=r"out=.*mine.* holds what sample.py did not write \(notes.txt\)"):
        sample_run(compose_config("sample", [f"ckpt={pixel_ckpt}", f"out={out}", "overwrite=true", "steps=2"]))
    with pytest.raises(ConfigError, match=r"export=.*mine.* holds what sample.py did not write"):
        sample_run(compose_config("sample", [f"ckpt={pixel_ckpt}", f"export={out}", "overwrite=true"]))
    assert snapshot(out) == before


def test_out_naming_a_file_is_refused(pixel_ckpt: Path, tmp_path: Path) -> None:
    (tmp_path / "file.png").write_bytes(b"not a folder")
    with pytest.raises(ConfigError, match=r"out=.*file.png.* is a file, not a folder"):
        sample_run(compose_config("sample", [f"ckpt={pixel_ckpt}", f"out={tmp_path / 'file.png'}", "steps=2"]))
    assert (tmp_path / "file.png").read_bytes() == b"not a folder"


def test_a_text_file_as_ckpt_is_named(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("101 things to try\n")
    with pytest.raises(ValueError, match=r"notes.txt is not a checkpoint: neither torch.save's archive nor a pickle"):
        sample_run(compose_config("sample", [f"ckpt={notes}", f"out={tmp_path / 'out'}"]))
    assert not (tmp_path / "out").exists()


def test_an_export_folder_holds_one_export(pixel_ckpt: Path, tmp_path: Path) -> None:
    """A DiT export overwritten by a UNet export must not keep `transformer/`: sample.py would read the old DiT."""
    dit_run = compose_config("train", [f"output_root={tmp_path}", *TINY, "run_name=dit", "net=dit_tiny"])
    train_run(dit_run)
    dit_ckpt = Path(dit_run.run_dir) / "checkpoints" / "last.ckpt"
    folder = tmp_path / "export"
    sample_run(compose_config("sample", [f"ckpt={dit_ckpt}", f"export={folder}"]))
    assert (folder / "transformer").is_dir()
    sample_run(compose_config("sample", [f"ckpt={pixel_ckpt}", f"export={folder}", "overwrite=true"]))
    assert not (folder / "transformer").exists()
    fresh = tmp_path / "fresh"
    sample_run(compose_config("sample", [f"ckpt={pixel_ckpt}", f"export={fresh}"]))
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) == sorted(
        p.relative_to(fresh).as_posix() for p in fresh.rglob("*")
    )
    assert type(load_trained(folder).net).__name__ == "UNet2DModel"


# ----- 4, 6 and 8: a refused run or resume changes nothing in the run folder --------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("finished")
    overrides = [f"output_root={root}", *TINY, "run_name=done"]
    train_run(compose_config("train", overrides))
    return root / "done", overrides


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("model.lr=-1", r"model.lr=-1(\.0)? does not fit .*a finite number > 0"),
        ("model.lr=nan", r"model.lr=nan does not fit .*a finite number > 0"),
        ("trainer.max_steps=-5", r"trainer.max_steps=-5 must be a positive number of optimiser steps"),
        ("trainer.max_steps=0", r"trainer.max_steps=0 must be a positive number of optimiser steps"),
        ("net.block_out_channels=[16,32,32]", r"resuming from .*last.ckpt: the checkpoint does not fit the model"),
        ("callbacks.samples.steps=0", r"callbacks.samples.steps=0 must be >= 1"),
    ],
)
def test_a_refused_resume_leaves_the_run_folder_byte_for_byte(
    override: str, named: str, finished_run: tuple[Path, list[str]]
) -> None:
    run_dir, overrides = finished_run
    before = snapshot(run_dir)
    with pytest.raises((ConfigError, ValueError), match=named):
        train_run(compose_config("train", [*overrides, "trainer.max_steps=4", override]))
    assert snapshot(run_dir) == before  # config.yaml and configs/ not touched, train.log untouched


def test_the_resume_check_would_catch_a_changed_config(finished_run: tuple[Path, list[str]]) -> None:
    """Negative control for the snapshot comparison above: an accepted resume with a changed key does change
    config.yaml (and appends it to configs/, beside the first start's)."""
    run_dir, overrides = finished_run
    before = snapshot(run_dir)
    train_run(compose_config("train", [*overrides, "trainer.max_steps=3"]))
    after = snapshot(run_dir)
    assert after["config.yaml"] != before["config.yaml"] and "configs/001.yaml" in after
    assert after["configs/000.yaml"] == before["configs/000.yaml"]


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("data.resolution=15", r"data.resolution=15 must be a multiple of 4: the net \(UNet2DModel\)"),
        ("trainer.max_steps=0", r"trainer.max_steps=0 must be a positive number"),
    ],
)
def test_a_refused_fresh_run_writes_nothing(override: str, named: str, tiny_train_config) -> None:
    cfg = tiny_train_config(override)
    with pytest.raises(ConfigError, match=named):
        train_run(cfg)
    assert not Path(cfg.run_dir).exists()


def test_an_unreadable_image_stops_the_run_before_anything_is_written(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "images")
    (root / "005.png").write_bytes(b"\x89PNG\r\n\x1a\n cut off")
    cfg = _image_folder_run(tmp_path, root)
    with pytest.raises(ValueError, match=r"1 of 8 images .* cannot be read:\n  cannot read image .*005.png"):
        train_run(cfg)
    assert not Path(cfg.run_dir).exists()


# ----- 5 and 7: images and labels are converted correctly or refused, naming the file and line ---------------------


def test_a_sixteen_bit_png_is_scaled_to_eight_bits(tmp_path: Path) -> None:
    root = tmp_path / "grey16"
    root.mkdir()
    ramp = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    Image.fromarray(ramp).save(root / "ramp.png")
    assert Image.open(root / "ramp.png").mode == "I;16"
    pixels = ImageFolderDataset(str(root), resolution=16)[0]["pixel_values"]  # in [-1, 1]
    eight_bit = np.round((pixels[0].numpy() + 1) * 127.5)
    expected = np.round(ramp / 257.0)
    assert np.abs(eight_bit - expected).max() <= 1  # a ramp, not 99.5% white
    assert (eight_bit == 255).mean() < 0.01
    # Negative control: Pillow's own conversion clips it, which is what the data set must not do.
    assert (np.asarray(Image.open(root / "ramp.png").convert("RGB"))[..., 0] == 255).mean() > 0.9


@pytest.mark.parametrize(
    ("label", "problem"),
    [(2.7, "label=2.7"), (True, "label=True"), ("3", "label='3'"), (-1, "label=-1"), ([1], r"label=\[1\]")],
)
def test_a_label_that_is_not_a_class_index_is_refused_naming_the_line(label, problem: str, tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "images")
    _rewrite_metadata(root, lambda records: [*records[:3], records[3] | {"label": label}, *records[4:]])
    with pytest.raises(ValueError, match=rf"metadata.jsonl:4: {problem} is not a class index"):
        ImageFolderDataset(str(root), resolution=16)


def test_an_integral_float_label_is_its_integer(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "images")
    _rewrite_metadata(root, lambda records: [r | {"label": float(r["label"])} for r in records])
    dataset = ImageFolderDataset(str(root), resolution=16)
    assert [dataset[i]["label"] for i in range(4)] == [0, 1, 0, 1] and dataset.num_classes == 2


def test_a_line_without_a_label_among_labelled_ones_is_refused(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "images")
    _rewrite_metadata(
        root, lambda records: [{k: v for k, v in r.items() if k != "label" or i != 5} for i, r in enumerate(records)]
    )
    with pytest.raises(ValueError, match=r"metadata.jsonl:6: file_name='005.png' has no label, while 7 other"):
        ImageFolderDataset(str(root), resolution=16)


def test_a_duplicated_file_name_is_refused_naming_both_lines(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "images")
    _rewrite_metadata(root, lambda records: [*records, records[2] | {"text": "another caption"}])
    with pytest.raises(ValueError, match=r"metadata.jsonl:9: file_name='002.png' is listed again \(first on line 3\)"):
        ImageFolderDataset(str(root), resolution=16)


def test_non_utf8_metadata_names_the_file_and_line_not_its_bytes(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "images", count=400)
    text = (root / "metadata.jsonl").read_bytes().splitlines(keepends=True)
    text[6] = text[6].replace(b"image 6", b"image \xff6")
    (root / "metadata.jsonl").write_bytes(b"".join(text))
    with pytest.raises(ValueError, match=r"metadata.jsonl:7: not UTF-8 \(byte 0xff at column \d+\)") as error:
        ImageFolderDataset(str(root), resolution=16)
    assert len(str(error.value)) < 300  # not the whole file's bytes


# ----- 6: the start-up scan is cached by the folder's file list and times -----------------------------------------


def test_the_scan_is_cached_until_a_file_changes(tmp_path: Path, monkeypatch) -> None:
    root = _image_folder(tmp_path / "images")
    cache = tmp_path / "scans"
    opened = []
    real_open = image_folder.open_rgb
    monkeypatch.setattr(image_folder, "open_rgb", lambda path: opened.append(path.name) or real_open(path))
    ImageFolderDataset(str(root), resolution=16, scan_cache_dir=str(cache))
    assert len(opened) == 8  # every image decoded once
    opened.clear()
    ImageFolderDataset(str(root), resolution=16, scan_cache_dir=str(cache))
    assert opened == []  # unchanged folder: the cached answer
    (root / "003.png").write_bytes(b"\x89PNG\r\n\x1a\n now broken")
    with pytest.raises(ValueError, match=r"003.png"):
        ImageFolderDataset(str(root), resolution=16, scan_cache_dir=str(cache))
    assert len(opened) == 8  # the changed folder was scanned again


# ----- 9: a full disk, killed saves and pruning after a fallback ---------------------------------------------------

_FILE_SIZE_LIMIT = """
import resource, signal, sys, torch
from lightdiff.files import save_atomically
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the limit then gives EFBIG, as a full disk gives ENOSPC
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
save_atomically({"weights": torch.ones(1_000_000)}, sys.argv[1])
"""


def test_a_save_that_runs_out_of_space_names_the_file_and_keeps_the_previous_one(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    save_atomically({"weights": torch.zeros(10)}, path)
    result = subprocess.run([sys.executable, "-c", _FILE_SIZE_LIMIT, str(path)], capture_output=True, text=True)
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert f"File too large while writing {path}; the previous checkpoint {path} is intact" in last_line
    assert torch.load(path, weights_only=True)["weights"].equal(torch.zeros(10))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # the partial temporary file is gone


def test_no_space_left_on_device_is_said_so(tmp_path: Path, monkeypatch) -> None:
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, handle):
            self.handle, self.written = handle, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 1000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.handle.write(data)

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    monkeypatch.setattr(files.os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)))
    path = tmp_path / "step0000010.ckpt"
    with pytest.raises(OSError, match=rf"No space left on device while writing {path}; no earlier"):
        save_atomically({"weights": torch.ones(100_000)}, path)
    assert list(tmp_path.iterdir()) == []


def test_orphaned_temporaries_of_a_killed_save_are_removed_on_the_next_start(
    finished_run: tuple[Path, list[str]], caplog
) -> None:
    run_dir, overrides = finished_run
    orphan = run_dir / "checkpoints" / ".last.ckpt.k1ll3d.tmp"
    orphan.write_bytes(b"")
    other = run_dir / "checkpoints" / "notes.tmp"  # not one of save_atomically's: left alone
    other.write_text("mine")
    with caplog.at_level(logging.WARNING):
        train_run(compose_config("train", [*overrides, "trainer.max_steps=5"]))
    assert not orphan.exists() and other.read_text() == "mine"
    assert "partial checkpoint left by a process killed" in caplog.text
    assert remove_orphaned_temporaries(run_dir / "checkpoints") == []


# ----- 10: skipped images are in train.log and logged as a metric --------------------------------------------------


def test_skipped_images_are_counted_in_train_log_and_the_metrics(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "images")
    (root / "006.png").write_bytes(b"GIF89a nothing")
    cfg = _image_folder_run(tmp_path, root, "data.skip_bad=true")
    train_run(cfg)
    run_dir = Path(cfg.run_dir)
    log_text = (run_dir / "train.log").read_text()
    assert "skipped 1 unreadable image(s)" in log_text and "006.png" in log_text
    metrics = next(run_dir.rglob("metrics.csv")).read_text().splitlines()
    column = metrics[0].split(",").index("data/skipped_images")
    assert [row.split(",")[column] for row in metrics[1:] if row.split(",")[column]] == ["1.0"]


def test_data_module_reports_no_skips_without_skip_bad(tmp_path: Path) -> None:
    data = ImageFolderDataModule(
        root=str(_image_folder(tmp_path / "images")), resolution=16, batch_size=2, num_workers=0
    )
    assert data.source_dataset.skipped == []
