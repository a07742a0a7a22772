"""One LightningDataModule for every image data set: the data set is the config's choice, loading is shared."""

from __future__ import annotations

import pytorch_lightning as pl
from torch.utils.data import DataLoader, Dataset

from lightdiff.data.image_folder import HFImageDataset, ImageFolderDataset
from lightdiff.data.shapes import ShapesDataset


class ImageDataModule(pl.LightningDataModule):
    """Serves batches {"pixel_values": (B, 3, H, W) in [-1, 1], "label": (B,), "text": list[str]}."""

    def __init__(
        self,
        dataset: Dataset,  # a lightdiff image data set (shapes, image folder, HF)
        batch_size: int = 64,  # per-device batch size
        num_workers: int = 0,  # loader processes; 0 loads in the training process
        pin_memory: bool = False,  # page-locked batches for faster host-to-GPU copies
        persistent_workers: bool = False,  # keep workers alive between epochs (needs num_workers > 0)
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size} must be positive")
        if len(dataset) < batch_size:
            raise ValueError(f"the data set has {len(dataset)} images, fewer than data.batch_size={batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0

    @property
    def num_classes(self) -> int:
        """Number of class labels the data set provides (0 when it has none)."""
        return int(getattr(self.dataset, "num_classes", 0))

    @property
    def resolution(self) -> int:
        """Side in pixels of every image served."""
        return int(self.dataset.resolution)

    def captions(self) -> list[str]:
        """Every caption of the data set (with repeats), e.g. to build a tokenizer; empty if it has none."""
        return list(self.dataset.captions())

    @property
    def class_names(self) -> list[str] | None:
        return getattr(self.dataset, "class_names", None)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,  # a constant batch size keeps images/s and the loss scale comparable
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
        )


class ShapesDataModule(ImageDataModule):
    """The embedded shapes data set (`data=shapes`)."""

    def __init__(
        self,
        resolution: int = 32,  # image side in pixels
        size: int = 50_000,  # images per epoch
        seed: int = 0,  # data seed: image i is a pure function of (seed, i)
        random_flip: bool = False,  # horizontal flip
        batch_size: int = 64,  # per-device batch size
        num_workers: int = 0,  # loader processes
        pin_memory: bool = False,  # page-locked batches
        persistent_workers: bool = False,  # keep workers between epochs
    ) -> None:
        dataset = ShapesDataset(size=size, resolution=resolution, seed=seed, random_flip=random_flip)
        super().__init__(dataset, batch_size, num_workers, pin_memory, persistent_workers)


class ImageFolderDataModule(ImageDataModule):
    """A folder of images with optional metadata.jsonl (`data=image_folder data.root=DIR`)."""

    def __init__(
        self,
        root: str,  # the image folder
        resolution: int = 32,  # output side in pixels
        center_crop: bool = True,  # centre crop; false takes a random crop
        random_flip: bool = True,  # horizontal flip
        skip_bad: bool = False,  # skip (and count) unreadable images instead of stopping at the first
        batch_size: int = 64,  # per-device batch size
        num_workers: int = 2,  # loader processes
        pin_memory: bool = True,  # page-locked batches
        persistent_workers: bool = True,  # keep workers between epochs
    ) -> None:
        dataset = ImageFolderDataset(root, resolution, center_crop, random_flip, skip_bad)
        super().__init__(dataset, batch_size, num_workers, pin_memory, persistent_workers)


class HFDataModule(ImageDataModule):
    """A data set read by `datasets.load_dataset` (`data=hf data.name=HUB_ID_OR_FOLDER`)."""

    def __init__(
        self,
        name: str,  # hub id or local folder
        resolution: int = 32,  # output side in pixels
        split: str = "train",  # split to train on
        image_column: str = "image",  # column of images
        caption_column: str | None = None,  # column of captions, if any
        label_column: str | None = None,  # column of integer labels, if any
        center_crop: bool = True,  # centre crop; false takes a random crop
        random_flip: bool = True,  # horizontal flip
        cache_dir: str | None = None,  # `datasets` download cache
        batch_size: int = 64,  # per-device batch size
        num_workers: int = 2,  # loader processes
        pin_memory: bool = True,  # page-locked batches
        persistent_workers: bool = True,  # keep workers between epochs
    ) -> None:
        dataset = HFImageDataset(
            name, resolution, split, image_column, caption_column, label_column, center_crop, random_flip, cache_dir
        )
        super().__init__(dataset, batch_size, num_workers, pin_memory, persistent_workers)
