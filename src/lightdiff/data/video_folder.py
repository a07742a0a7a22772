"""Video folders (`data=video_folder`): clips as video files (mp4, webm, mov, mkv, avi, gif) or as folders of frame
images, with captions in `metadata.jsonl` as in Hugging Face's videofolder / imagefolder convention, so `sample.py`'s
output of a video model is itself a valid training set.

Each clip is decoded once at start-up (diffusers' `load_video`, imageio's ffmpeg for video files, PIL for gifs): an
unreadable file or a clip shorter than `num_frames` frames (at `frame_stride`) stops the run before anything is
written, naming the file, or with `data.skip_bad=true` is skipped and counted (train.log, `data/skipped_images`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from lightdiff.config import NonNegativeInt
from lightdiff.data.datamodule import ImageDataModule
from lightdiff.data.image_folder import (
    IMAGE_SUFFIXES,
    captions_of,
    file_records,
    open_rgb,
    read_metadata,
    without_bad_files,
)
from lightdiff.data.transforms import ImageTransform, to_rgb

VIDEO_SUFFIXES = {".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif"}


def frame_paths(folder: Path) -> list[Path]:
    """The frame images of a frame folder, in name order."""
    return sorted(path for path in folder.iterdir() if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)


def read_clip(path: Path) -> list[Image.Image]:
    """Every frame of a video file or frame folder, RGB; a ValueError naming the file where it cannot be read."""
    if path.is_dir():
        return [open_rgb(frame) for frame in frame_paths(path)]
    from diffusers.utils import load_video

    try:
        return [to_rgb(frame) for frame in load_video(str(path))]
    except Exception as error:  # imageio / ffmpeg / PIL errors of every kind
        raise ValueError(f"cannot read video {path}: {error}") from error


def _clips(root: Path) -> list[Path]:
    """Video files anywhere below `root`, and folders that hold frame images directly."""
    found = [path for path in root.rglob("*") if path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES]
    found += [path for path in root.rglob("*") if path.is_dir() and frame_paths(path)]
    return sorted(found)


class VideoFolderDataset(Dataset):
    """Clips below `root` (or those `metadata.jsonl` lists, with their captions); items are {"pixel_values":
    (num_frames, 3, H, W) in [-1, 1], "label", "text"}: the first `num_frames` frames `frame_stride` apart, each
    resized and centre-cropped to `resolution` (the same crop for every frame of a clip)."""

    def __init__(
        self,
        root: str,  # folder of clips
        resolution: int,  # frame side in pixels
        num_frames: int,  # frames per clip
        frame_stride: int = 1,  # take every frame_stride-th frame (2: half the frame rate)
        skip_bad: bool = False,  # skip (and count) unreadable or too short clips instead of failing
    ) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"data.root={root!r} is not a folder")
        if num_frames < 1 or frame_stride < 1:
            raise ValueError(f"data.num_frames={num_frames} and data.frame_stride={frame_stride} must be positive")
        self.resolution, self.num_frames, self.frame_stride = resolution, num_frames, frame_stride
        self.transform = ImageTransform(resolution, center_crop=True, random_flip=False)
        metadata = read_metadata(self.root)
        if metadata:  # it lists the data set, as in imagefolder
            paths = [self.root / name for name in sorted(metadata)]
            missing = [str(path.relative_to(self.root)) for path in paths if not path.exists()]
            if missing:
                raise FileNotFoundError(f"{self.root / 'metadata.jsonl'} lists missing clip(s): {missing[:5]}")
        else:
            paths = _clips(self.root)
        if not paths:
            raise FileNotFoundError(
                f"no clips ({', '.join(sorted(VIDEO_SUFFIXES))} files or frame folders) under data.root={root!r}"
            )
        needed = (num_frames - 1) * frame_stride + 1
        bad: dict[Path, str] = {}
        for path in paths:  # decoded once up front: every rank and worker agrees on index -> clip
            try:
                frames = read_clip(path)
            except ValueError as error:
                bad[path] = str(error)
                continue
            count, sizes = len(frames), sorted({frame.size for frame in frames})
            if len(sizes) > 1:  # each frame would be cropped on its own: the clip would jump between framings
                shown = ", ".join(f"{width}x{height}" for width, height in sizes[:4])
                bad[path] = f"{path}: its frames are not all one size ({shown}): a clip's frames must share one size"
                continue
            if count < needed:
                bad[path] = (
                    f"{path} has {count} frames, fewer than data.num_frames={num_frames} at data.frame_stride="
                    f"{frame_stride} ({needed} frames)"
                )
        if bad and not skip_bad:
            reasons = "\n  ".join(list(bad.values())[:10])
            raise ValueError(
                f"{len(bad)} of {len(paths)} clips under data.root={root!r} cannot be used:\n  {reasons}\n"
                "fix or remove them, or set data.skip_bad=true to train without them"
            )
        self.paths, self.skipped = without_bad_files(paths, bad, "unusable clip", root)
        self.records, self.num_classes = file_records(self.paths, metadata, self.root)

    def __len__(self) -> int:
        return len(self.paths)

    def captions(self) -> list[str]:
        return captions_of(self.records)

    def __getitem__(self, index: int) -> dict[str, object]:
        frames = read_clip(self.paths[index])[: (self.num_frames - 1) * self.frame_stride + 1 : self.frame_stride]
        record = self.records[index]
        return {
            "pixel_values": torch.stack([self.transform(frame)[0] for frame in frames]),
            "label": record.get("label", -1),
            "text": str(record.get("text", "")),
        }


class VideoFolderDataModule(ImageDataModule):
    """A folder of clips (video files or frame folders) with optional metadata.jsonl captions
    (`data=video_folder data.root=DIR`)."""

    def __init__(
        self,
        root: str,  # the folder of clips
        resolution: int = 32,  # frame side in pixels (resized, centre-cropped)
        num_frames: int = 9,  # frames per clip: the first ones, frame_stride apart
        frame_stride: int = 1,  # every frame_stride-th frame
        skip_bad: bool = False,  # skip (and count) unreadable or too short clips instead of stopping
        batch_size: int = 16,  # per-device batch size (clips)
        num_workers: NonNegativeInt = 2,  # loader processes
        pin_memory: bool = True,  # page-locked batches
        persistent_workers: bool = True,  # keep workers between epochs
        cache_latents: bool = False,  # model=video: encode the clips once through the VAE, train from the cache
        latent_cache_dir: str = "outputs/latent_cache",  # where latent caches are kept
    ) -> None:
        dataset = VideoFolderDataset(root, resolution, num_frames, frame_stride, skip_bad)
        newest = max(path.stat().st_mtime_ns for path in dataset.paths)
        identity = (
            f"video_folder|{dataset.root.resolve()}|clips={len(dataset)}|newest={newest}|resolution={resolution}"
            f"|num_frames={num_frames}|frame_stride={frame_stride}"
        )
        super().__init__(
            dataset, batch_size, num_workers, pin_memory, persistent_workers, cache_latents, latent_cache_dir, identity
        )
