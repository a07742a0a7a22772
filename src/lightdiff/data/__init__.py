"""Data sets and the DataModules that serve them."""

from lightdiff.data.datamodule import (
    HFDataModule,
    ImageDataModule,
    ImageFolderDataModule,
    MovingShapesDataModule,
    ShapesDataModule,
    ShardsDataModule,
    VideoFolderDataModule,
)
from lightdiff.data.image_folder import HFImageDataset, ImageFolderDataset
from lightdiff.data.moving_shapes import MovingShapesDataset
from lightdiff.data.shapes import ShapesDataset
from lightdiff.data.transforms import ImageTransform
from lightdiff.data.video_folder import VideoFolderDataset

__all__ = [
    "HFDataModule",
    "HFImageDataset",
    "ImageDataModule",
    "ImageFolderDataModule",
    "ImageFolderDataset",
    "ImageTransform",
    "MovingShapesDataModule",
    "MovingShapesDataset",
    "ShapesDataModule",
    "ShapesDataset",
    "ShardsDataModule",
    "VideoFolderDataModule",
    "VideoFolderDataset",
]
