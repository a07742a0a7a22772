"""Image folders (imagefolder convention), HF datasets from a local folder, transforms, bad files."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightdiff.data import HFDataModule, ImageFolderDataModule, ImageTransform
from lightdiff.data.shapes import pil_to_tensor


def _write_folder(root: Path, count: int = 6, size: tuple[int, int] = (40, 24)) -> None:
    root.mkdir(parents=True, exist_ok=True)
    with (root / "metadata.jsonl").open("w") as metadata:
        for i in range(count):
            array = np.full((size[1], size[0], 3), 30 * i, dtype=np.uint8)
            Image.fromarray(array).save(root / f"{i:03d}.png")
            metadata.write(json.dumps({"file_name": f"{i:03d}.png", "text": f"image {i}", "label": i % 3}) + "\n")


def test_image_folder_reads_captions_labels_and_resizes(tmp_path: Path) -> None:
    _write_folder(tmp_path / "images")
    data = ImageFolderDataModule(
        root=str(tmp_path / "images"), resolution=16, random_flip=False, batch_size=2, num_workers=0
    )
    item = data.dataset[4]
    assert item["pixel_values"].shape == (3, 16, 16)
    assert item["text"] == "image 4" and item["label"] == 1
    assert item["pixel_values"].mean().item() == pytest.approx(120 / 127.5 - 1, abs=0.01)
    assert data.num_classes == 3
    batch = next(iter(data.train_dataloader()))
    assert batch["pixel_values"].shape == (2, 3, 16, 16) and len(batch["text"]) == 2


def test_corrupt_image_is_named_or_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "images"
    _write_folder(root)
    (root / "002.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ValueError, match=r"1 of 6 images .* cannot be read:\n  cannot read image .*002.png"):
        ImageFolderDataModule(root=str(root), resolution=16, batch_size=2, num_workers=0)  # found at start-up
    with caplog.at_level(logging.WARNING):
        skipping = ImageFolderDataModule(root=str(root), resolution=16, batch_size=2, num_workers=0, skip_bad=True)
    assert len(skipping.dataset) == 5 and [p.name for p in skipping.dataset.skipped] == ["002.png"]
    assert "skipped 1 unreadable image" in caplog.text
    assert [r["text"] for r in skipping.dataset.records][2] == "image 3"  # captions stay with their files


def test_missing_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolderDataModule(root=str(tmp_path / "nowhere"), resolution=16)


def test_hf_datasets_local_imagefolder(tmp_path: Path) -> None:
    _write_folder(tmp_path / "images")
    data = HFDataModule(
        name=str(tmp_path / "images"),
        resolution=8,
        caption_column="text",
        batch_size=2,
        num_workers=0,
        random_flip=False,
    )
    assert len(data.dataset) == 6
    texts = sorted(data.dataset[i]["text"] for i in range(6))
    assert texts == [f"image {i}" for i in range(6)]
    assert data.dataset[0]["pixel_values"].shape == (3, 8, 8)
    with pytest.raises(KeyError, match="caption_column='caption'"):
        HFDataModule(name=str(tmp_path / "images"), resolution=8, caption_column="caption", batch_size=2)


def test_transform_crops_and_flips() -> None:
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, :20] = 255  # left half white
    image = Image.fromarray(array)
    centre, record = ImageTransform(10, center_crop=True)(image)
    assert centre.shape == (3, 10, 10)
    assert record.tolist() == [20, 40, 0, 5, 10, 10]  # original size, the crop in the 10 x 20 resized image, target
    assert centre[:, :, 0].mean() > 0.9 and centre[:, :, -1].mean() < -0.9  # the crop straddles the edge
    torch.manual_seed(0)
    flips = [ImageTransform(10, random_flip=True)(image)[0][0, 0, 0].item() for _ in range(20)]
    assert min(flips) < -0.9 and max(flips) > 0.9  # both orientations occur
    crops = {tuple(ImageTransform(10, center_crop=False)(image)[0][0, 0].tolist()) for _ in range(20)}
    assert len(crops) > 1  # random crops differ


def test_size_and_crop_record_is_the_crop_actually_taken() -> None:
    """SDXL's time_ids come from this record: the crop it names must be where the pixels came from, in the image as
    the model sees it (mirrored when flipped), for random crops of a non-square target."""
    height, width = 24, 40
    y, x = np.mgrid[0:height, 0:width]
    array = np.stack([x * 6, y * 10, (x + y) % 7 * 30], axis=-1).astype(np.uint8)  # every position distinct
    full = pil_to_tensor(Image.fromarray(array))
    transform = ImageTransform(8, center_crop=False, random_flip=True)
    torch.manual_seed(0)
    seen = set()
    for target_h, target_w in ((24, 32), (20, 40)) * 15:  # the image covers both at scale 1: crops only
        pixels, record = transform(Image.fromarray(array), size=(target_h, target_w))
        assert record.tolist()[:2] == [height, width] and record.tolist()[4:] == [target_h, target_w]
        top, left = record.tolist()[2:4]
        unflipped = full[:, top : top + target_h, left : left + target_w]
        flipped = full.flip(-1)[:, top : top + target_h, left : left + target_w]
        # exactly one frame holds the pixels (every column differs), so a record in the wrong frame would fail here
        assert torch.equal(pixels, flipped) != torch.equal(pixels, unflipped)
        seen.add((torch.equal(pixels, flipped), top, left))
    assert {flip for flip, _, _ in seen} == {True, False} and len(seen) > 5
