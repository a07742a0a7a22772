"""Data sets and the DataModules that serve them."""

from lightdiff.data.datamodule import ImageDataModule
from lightdiff.data.hf_stream import HFDataModule
from lightdiff.data.image_folder import HFImageDataset, ImageFolderDataModule, ImageFolderDataset
from lightdiff.data.moving_shapes import MovingShapesDataModule, MovingShapesDataset
from lightdiff.data.shapes import ShapesDataModule, ShapesDataset
from lightdiff.data.shapes_edit import ShapesEditDataModule, ShapesEditDataset
from lightdiff.data.shard_stream import ShardsDataModule
from lightdiff.data.transforms import ImageTransform
from lightdiff.data.video_folder import VideoFolderDataModule, VideoFolderDataset

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
    "ShapesEditDataModule",
    "ShapesEditDataset",
    "ShapesDataset",
    "ShardsDataModule",
    "VideoFolderDataModule",
    "VideoFolderDataset",
]
