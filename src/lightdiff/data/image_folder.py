"""Image folders in the Hugging Face `imagefolder` convention, and `datasets.load_dataset` data sets.

A folder holds images and, optionally, `metadata.jsonl` with one {"file_name": ..., "text": ...} (or "label")
object a line, so the output of `sample.py` is itself a valid training set.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path, PurePosixPath

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from lightdiff.data.transforms import ImageTransform

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def _too_many_pixels(image: Image.Image) -> str | None:
    """Why an opened (header-only) image is refused as a possible decompression bomb, or None. Pillow itself only
    warns between MAX_IMAGE_PIXELS and twice that, and a warning does not stop the decoding."""
    limit = Image.MAX_IMAGE_PIXELS
    width, height = image.size
    if limit is not None and width * height > limit:
        return f"{width}x{height} = {width * height} pixels is above PIL.Image.MAX_IMAGE_PIXELS={limit}"
    return None


def _refused(name: object, reason: str) -> ValueError:
    return ValueError(
        f"refusing image {name}: {reason} (a possible decompression bomb; resize it, or raise "
        "PIL.Image.MAX_IMAGE_PIXELS if the file is trusted)"
    )


def _open_rgb(path: Path) -> Image.Image:
    """Decode fully (not only the header) so a truncated file fails here, with its name; the size is checked
    from the header first, so a decompression bomb is never decoded."""
    try:
        with Image.open(path) as image:
            reason = _too_many_pixels(image)
            if reason is None:
                image.load()
                return image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:  # the warning under -W error
        reason = str(error)
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from error
    raise _refused(path, reason)


def _outside(root: Path, path: Path) -> bool:
    """Whether `path` (a symlink, once resolved) lies outside `root` (resolved)."""
    return not path.resolve().is_relative_to(root)


def _scan(root: Path) -> list[Path]:
    """The images below `root`. A symlink, to a file or a folder, that leads out of the root is refused: a data
    folder someone else prepared must not make training read (or a sample grid show) files elsewhere."""
    resolved_root = root.resolve()
    paths = []
    for path in root.rglob("*"):  # rglob lists a folder symlink without entering it; it is checked here
        is_image = path.suffix.lower() in IMAGE_SUFFIXES
        if path.is_symlink() and (is_image or path.is_dir()) and _outside(resolved_root, path):
            raise ValueError(
                f"{path} is a symlink to {path.resolve()}, outside data.root={str(root)!r} ({resolved_root}); "
                "copy the files in, or make data.root the folder that holds them"
            )
        if is_image and path.is_file():
            paths.append(path)
    return sorted(paths)


def _read_metadata(root: Path) -> dict[str, dict]:
    metadata_path = root / "metadata.jsonl"
    if not metadata_path.exists():
        return {}
    records: dict[str, dict] = {}
    for line_number, line in enumerate(metadata_path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            name = str(record["file_name"])
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{metadata_path}:{line_number}: not a JSON object with 'file_name': {error}") from error
        # Names are relative to the root, as in Hugging Face's imagefolder; an absolute name or `..` reaches out.
        if PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
            raise ValueError(
                f"{metadata_path}:{line_number}: file_name={name!r} points outside data.root={str(root)!r}; "
                "file names must be relative paths inside the data folder"
            )
        records[name] = record
    return records


class ImageFolderDataset(Dataset):
    """Every image below `root`, or, when `root/metadata.jsonl` exists, the images it lists with their captions."""

    def __init__(
        self,
        root: str,  # folder of images (searched recursively)
        resolution: int,  # output side in pixels
        center_crop: bool = True,  # centre crop; false takes a random crop
        random_flip: bool = False,  # horizontal flip with probability 1/2
        skip_bad: bool = False,  # skip (and count) unreadable images instead of failing on the first
    ) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"data.root={root!r} is not a folder")
        self.resolution = resolution
        self.transform = ImageTransform(resolution, center_crop, random_flip)
        paths = _scan(self.root)
        if not paths:
            raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under data.root={root!r}")
        metadata = _read_metadata(self.root)
        if metadata:
            # As in Hugging Face's imagefolder: metadata.jsonl, when present, lists the data set (sample.py's
            # grid.png beside the samples is not a sample).
            listed = {p.relative_to(self.root).as_posix(): p for p in paths}
            missing = [name for name in metadata if name not in listed]
            if missing:
                raise FileNotFoundError(f"{self.root / 'metadata.jsonl'} lists missing image(s): {missing[:5]}")
            paths = [listed[name] for name in sorted(metadata)]
        self.skipped: list[Path] = []
        if skip_bad:
            # Checked once up front so that every worker and rank agrees on the index -> file mapping.
            readable = []
            for path in paths:
                try:
                    _open_rgb(path)
                    readable.append(path)
                except ValueError as error:
                    self.skipped.append(path)
                    log.warning("skipping %s", error)
            paths = readable
            if self.skipped:
                log.warning("skipped %d unreadable image(s) under %s", len(self.skipped), self.root)
            if not paths:
                raise FileNotFoundError(f"every image under data.root={root!r} is unreadable")
        self.paths = paths
        relative = [p.relative_to(self.root).as_posix() for p in paths]
        self.records = [metadata.get(name, {}) for name in relative]
        labels = [r["label"] for r in self.records if "label" in r]
        self.num_classes = max(int(label) for label in labels) + 1 if labels else 0

    def __len__(self) -> int:
        return len(self.paths)

    def captions(self) -> list[str]:
        return [str(record["text"]) for record in self.records if record.get("text")]

    def __getitem__(self, index: int) -> dict[str, object]:
        record = self.records[index]
        return {
            "pixel_values": self.transform(_open_rgb(self.paths[index])),
            "label": int(record.get("label", -1)),
            "text": str(record.get("text", "")),
        }


class HFImageDataset(Dataset):
    """A data set read by `datasets.load_dataset` (a hub id on a connected machine, or a local folder)."""

    def __init__(
        self,
        name: str,  # hub id (e.g. huggan/smithsonian_butterflies_subset) or local folder / script
        resolution: int,  # output side in pixels
        split: str = "train",  # split to train on
        image_column: str = "image",  # column holding PIL images
        caption_column: str | None = None,  # column holding captions, if any
        label_column: str | None = None,  # column holding integer class labels, if any
        center_crop: bool = True,  # centre crop; false takes a random crop
        random_flip: bool = False,  # horizontal flip with probability 1/2
        cache_dir: str | None = None,  # where `datasets` caches downloads
    ) -> None:
        import datasets  # imported here: pyarrow start-up costs a second that shapes runs should not pay

        self.dataset = datasets.load_dataset(name, split=split, cache_dir=cache_dir)
        columns = self.dataset.column_names
        for key, column in (
            ("image_column", image_column),
            ("caption_column", caption_column),
            ("label_column", label_column),
        ):
            if column is not None and column not in columns:
                raise KeyError(f"data.{key}={column!r} is not a column of {name!r}; columns: {columns}")
        self.name = name
        self.image_column, self.caption_column, self.label_column = image_column, caption_column, label_column
        self.resolution = resolution
        self.transform = ImageTransform(resolution, center_crop, random_flip)
        self.num_classes = 0
        if label_column is not None:
            feature = self.dataset.features[label_column]
            self.num_classes = int(getattr(feature, "num_classes", 0) or max(self.dataset[label_column]) + 1)

    def __len__(self) -> int:
        return len(self.dataset)

    def captions(self) -> list[str]:
        return [str(text) for text in self.dataset[self.caption_column]] if self.caption_column else []

    def __getitem__(self, index: int) -> dict[str, object]:
        row = self.dataset[index]
        try:
            image = row[self.image_column]
            image = image if isinstance(image, Image.Image) else Image.open(image)
            reason = _too_many_pixels(image)  # `datasets` opens images lazily: nothing is decoded yet
            if reason is not None:
                raise _refused(f"{index} of {self.name!r}", reason)
            pixels = self.transform(image)
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as error:
            raise ValueError(f"cannot read image {index} of {self.name!r}: {error}") from error
        return {
            "pixel_values": pixels,
            "label": int(row[self.label_column]) if self.label_column else -1,
            "text": str(row[self.caption_column]) if self.caption_column else "",
        }
