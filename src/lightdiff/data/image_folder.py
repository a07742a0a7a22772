"""Image folders in the Hugging Face `imagefolder` convention, and `datasets.load_dataset` data sets.

A folder holds images and, optionally, `metadata.jsonl` with one {"file_name": ..., "text": ...} (or "label")
object a line, so the output of `sample.py` is itself a valid training set.

Editing pairs: a line with "source_file_name" (one file, or a list of them for several references) pairs its image
(the target) with the source(s) the instruction in "text" edits; every line then has both. A source has its
target's size and goes through the same crop and flip, so the pair stays aligned pixel for pixel (and in its
target's bucket); the items carry it as "source_pixel_values" ((3, H, W), or (K, 3, H, W) for K references).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path, PurePosixPath

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from lightdiff.config import NonNegativeInt
from lightdiff.data.buckets import Bucket, BucketSpec, bucket_sizes, nearest_bucket, smaller_than_every_bucket
from lightdiff.data.datamodule import ImageDataModule, plain
from lightdiff.data.transforms import ImageTransform, to_rgb

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def too_many_pixels(image: Image.Image) -> str | None:
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


def open_rgb(path: Path) -> Image.Image:
    """Decode fully (not only the header) so a truncated file fails here, with its name; the size is checked
    from the header first, so a decompression bomb is never decoded."""
    try:
        with Image.open(path) as image:
            reason = too_many_pixels(image)
            if reason is None:
                image.load()
                return to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:  # the warning under -W error
        reason = str(error)
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from error
    raise _refused(path, reason)


def _outside(root: Path, path: Path) -> bool:
    """Whether `path` (a symlink, once resolved) lies outside `root` (resolved)."""
    return not path.resolve().is_relative_to(root)


def image_paths(root: Path) -> list[Path]:
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


def _label(value: object, where: str) -> int:
    """A class label from metadata.jsonl: a non-negative integer (2.0 is 2); anything else is refused, naming the
    line, since truncating it (2.7 -> 2, true -> 1) would silently train on another class."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{where}: label={value!r} is not a class index (an integer >= 0)")
    return value


def read_metadata(root: Path) -> dict[str, dict]:
    """metadata.jsonl's records by file name, every line checked: JSON, UTF-8, a relative `file_name` listed once,
    and labels on every line or none."""
    metadata_path = root / "metadata.jsonl"
    if not metadata_path.exists():
        return {}
    records: dict[str, dict] = {}
    lines_of: dict[str, int] = {}
    for line_number, raw in enumerate(metadata_path.read_bytes().splitlines(), start=1):
        where = f"{metadata_path}:{line_number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(
                f"{where}: not UTF-8 (byte {raw[error.start]:#04x} at column {error.start + 1}); "
                "metadata.jsonl must be UTF-8 text"
            ) from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            name = str(record["file_name"])
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{where}: not a JSON object with 'file_name': {error}") from error
        # Names are relative to the root, as in Hugging Face's imagefolder; an absolute name or `..` reaches out.
        if PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
            raise ValueError(
                f"{where}: file_name={name!r} points outside data.root={str(root)!r}; "
                "file names must be relative paths inside the data folder"
            )
        if name in records:
            raise ValueError(f"{where}: file_name={name!r} is listed again (first on line {lines_of[name]})")
        if "source_file_name" in record:
            record["source_is_list"] = isinstance(record["source_file_name"], list)  # a list: (K, 3, H, W) items
            record["source_file_name"] = _source_names(record["source_file_name"], where, root)
        if "label" in record:
            record["label"] = _label(record["label"], where)
        records[name], lines_of[name] = record, line_number
    paired = _every_line_or_none(records, lines_of, metadata_path, "source_file_name", "pair their image with a source")
    for name in paired:
        if not str(records[name].get("text", "")).strip():
            raise ValueError(
                f"{metadata_path}:{lines_of[name]}: file_name={name!r} pairs a source without an instruction: "
                "an editing pair needs its 'text'"
            )
    forms = {(records[name]["source_is_list"], len(records[name]["source_file_name"])) for name in paired}
    if len(forms) > 1:  # a batch stacks the sources: one form for all
        shown = ", ".join(f"{count} in a list" if listed else "one name" for listed, count in sorted(forms))
        raise ValueError(f"{metadata_path}: lines give their sources as {shown}; give every line the same form")
    _every_line_or_none(records, lines_of, metadata_path, "label", "have one")
    return records


def _every_line_or_none(
    records: dict[str, dict], lines_of: dict[str, int], metadata_path: Path, key: str, having: str
) -> list[str]:
    """The names whose line has `key`: every line's, or none's (a ValueError naming the first line without it)."""
    having_it = [name for name, record in records.items() if key in record]
    if having_it and len(having_it) != len(records):
        without = next(name for name in records if key not in records[name])
        raise ValueError(
            f"{metadata_path}:{lines_of[without]}: file_name={without!r} has no {key}, while {len(having_it)} other "
            f"line(s) {having} (line {lines_of[having_it[0]]}); give every line a {key} or none"
        )
    return having_it


def _source_names(value: object, where: str, root: Path) -> list[str]:
    """A line's source file names (one, or a list for several references), each relative and inside the root."""
    names = value if isinstance(value, list) else [value]
    if not names or not all(isinstance(name, str) and name for name in names):
        raise ValueError(f"{where}: source_file_name={value!r} is not a file name or a list of them")
    for name in names:
        if PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
            raise ValueError(
                f"{where}: source_file_name={name!r} points outside data.root={str(root)!r}; "
                "file names must be relative paths inside the data folder"
            )
    return names


def _scan_key(root: Path, paths: list[Path]) -> str:
    """What the scan of these files depends on: their names, sizes and modification times (nothing is read)."""
    digest = hashlib.sha256(str(root.resolve()).encode())
    for path in paths:
        stat = path.stat()
        digest.update(f"{path.relative_to(root).as_posix()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def scan_images(
    root: Path, paths: list[Path], cache_dir: Path | None
) -> tuple[dict[Path, str], dict[Path, tuple[int, int]]]:
    """Every image of `paths` that cannot be decoded into RGB, with the reason, and the (height, width) of every other
    one (what aspect-ratio buckets are assigned by): each file is decoded once, and the answer is cached in
    `cache_dir` under the folder's file list, sizes and modification times, so a resume (or any later run on an
    unchanged folder) does not read a large folder again."""
    cache_file = cache_dir / f"scan-{_scan_key(root, paths)}.json" if cache_dir is not None else None
    if cache_file is not None and cache_file.is_file():
        cached = json.loads(cache_file.read_text())
        if "sizes" in cached:  # scans from before sizes were recorded are made again
            bad = {root / name: reason for name, reason in cached["unreadable"].items()}
            return bad, {root / name: (int(h), int(w)) for name, (h, w) in cached["sizes"].items()}
    bad: dict[Path, str] = {}
    sizes: dict[Path, tuple[int, int]] = {}
    for path in paths:
        try:
            width, height = open_rgb(path).size
            sizes[path] = (height, width)
        except ValueError as error:
            bad[path] = str(error)
    if cache_file is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        record: dict[str, object] = {"root": str(root.resolve()), "files": len(paths)}
        record["unreadable"] = {path.relative_to(root).as_posix(): reason for path, reason in bad.items()}
        record["sizes"] = {path.relative_to(root).as_posix(): list(size) for path, size in sizes.items()}
        temporary = cache_file.with_suffix(".tmp")
        temporary.write_text(json.dumps(record, indent=1) + "\n")
        temporary.replace(cache_file)  # complete or absent, as every cache
    return bad, sizes


def without_bad_files(paths: list[Path], bad: dict[Path, str], kind: str, root: str) -> tuple[list[Path], list[Path]]:
    # kind: what the files are and why they are left out ("unreadable image", "unusable clip")
    """(the paths kept, those skipped): each skipped file logged with its reason (data.skip_bad=true), and a
    FileNotFoundError when none is left."""
    skipped = [path for path in paths if path in bad]
    for path in skipped:
        log.warning("skipping %s", bad[path])
    if skipped:
        log.warning("skipped %d %s(s) under %s", len(skipped), kind, root)
    kept = [path for path in paths if path not in bad]
    if not kept:
        raise FileNotFoundError(f"every file under data.root={root!r} is an {kind}")
    return kept, skipped


def file_records(paths: list[Path], metadata: dict[str, dict], root: Path) -> tuple[list[dict], int]:
    """(the metadata.jsonl record of each kept file, empty without one; the number of classes their labels name): what
    an image folder and a video folder share."""
    records = [metadata.get(path.relative_to(root).as_posix(), {}) for path in paths]
    labels = [record["label"] for record in records if "label" in record]
    return records, max(labels) + 1 if labels else 0


def captions_of(records: list[dict]) -> list[str]:
    return [str(record["text"]) for record in records if record.get("text")]


class ImageFolderDataset(Dataset):
    """Every image below `root`, or, when `root/metadata.jsonl` exists, the images it lists with their captions."""

    def __init__(
        self,
        root: str,  # folder of images (searched recursively)
        resolution: int,  # output side in pixels
        center_crop: bool = True,  # centre crop; false takes a random crop
        random_flip: bool = False,  # horizontal flip with probability 1/2
        skip_bad: bool = False,  # skip (and count) unreadable images instead of failing
        scan_cache_dir: str | None = None,  # where the start-up scan's answer is kept per folder state (None: not kept)
        buckets: BucketSpec | None = None,  # aspect-ratio buckets (data/buckets.py); None: square crops at resolution
    ) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"data.root={root!r} is not a folder")
        self.resolution = resolution
        self.transform = ImageTransform(resolution, center_crop, random_flip)
        paths = image_paths(self.root)
        if not paths:
            raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under data.root={root!r}")
        metadata = read_metadata(self.root)
        if metadata:
            # As in Hugging Face's imagefolder: metadata.jsonl, when present, lists the data set (sample.py's
            # grid.png beside the samples is not a sample).
            listed = {p.relative_to(self.root).as_posix(): p for p in paths}
            missing = [name for name in metadata if name not in listed]
            if missing:
                raise FileNotFoundError(f"{self.root / 'metadata.jsonl'} lists missing image(s): {missing[:5]}")
            paths = [listed[name] for name in sorted(metadata)]
            sources = {name for record in metadata.values() for name in record.get("source_file_name", [])}
            missing = sorted(name for name in sources if name not in listed)
            if missing:
                raise FileNotFoundError(
                    f"{self.root / 'metadata.jsonl'} pairs images with missing source(s): {missing[:5]}"
                )
        # Scanned once up front (every image decoded, or the cached answer for an unchanged folder): an unreadable
        # image fails here, before a run writes anything, and every worker and rank agrees on index -> file.
        source_paths = sorted({self.root / n for r in metadata.values() for n in r.get("source_file_name", [])})
        scanned = sorted(set(paths) | set(source_paths))
        bad, sizes = scan_images(self.root, scanned, Path(scan_cache_dir).expanduser() if scan_cache_dir else None)
        for path in paths:  # a pair whose source cannot be read, or is of another size, cannot be aligned
            for name in metadata.get(path.relative_to(self.root).as_posix(), {}).get("source_file_name", []):
                source = self.root / name
                if source in bad:
                    bad[path] = f"{path}: its source {bad[source]}"
                elif path in sizes and sizes[source] != sizes[path]:
                    bad[path] = (
                        f"{path} is {sizes[path][0]}x{sizes[path][1]} (height x width), its source {source} "
                        f"{sizes[source][0]}x{sizes[source][1]}: a pair is cropped alike, so both need one size"
                    )
        targets = set(paths)  # a bad source counts through its target (above); a set: one lookup per file
        bad = {path: reason for path, reason in bad.items() if path in targets}
        self.buckets: list[Bucket] | None = bucket_sizes(buckets, resolution) if buckets is not None else None
        if self.buckets is not None:  # an image that would be enlarged for every bucket has no place in training
            for path in paths:
                if path in sizes and smaller_than_every_bucket(*sizes[path], self.buckets):
                    bad[path] = (
                        f"{path} is {sizes[path][0]}x{sizes[path][1]} (height x width), smaller than every bucket"
                    )

        if bad and not skip_bad:
            reasons = "\n  ".join(list(bad.values())[:10])
            more = f"\n  and {len(bad) - 10} more" if len(bad) > 10 else ""
            raise ValueError(
                f"{len(bad)} of {len(paths)} images under data.root={root!r} cannot be read"
                + (f" or are smaller than every bucket of data.buckets={self.buckets}" if self.buckets else "")
                + f":\n  {reasons}{more}\nfix or remove them, or set data.skip_bad=true to train without them"
            )
        paths, self.skipped = without_bad_files(paths, bad, "unreadable image", root)
        self.paths = paths
        # the bucket of each image: the nearest in aspect ratio (BucketBatchSampler draws each batch from one)
        self.bucket_of = [nearest_bucket(*sizes[p], self.buckets) for p in paths] if self.buckets else None
        self.records, self.num_classes = file_records(paths, metadata, self.root)

    def __len__(self) -> int:
        return len(self.paths)

    def captions(self) -> list[str]:
        return captions_of(self.records)

    def __getitem__(self, index: int) -> dict[str, object]:
        record = self.records[index]
        size = self.buckets[self.bucket_of[index]] if self.bucket_of is not None else None
        before = torch.random.get_rng_state()  # a pair's sources take the target's crop and flip
        pixels, size_and_crop = self.transform(open_rgb(self.paths[index]), size)
        item = {
            "pixel_values": pixels,
            "size_and_crop": size_and_crop,  # (original h, w, crop top, left, target h, w): SDXL's time_ids
            "label": record.get("label", -1),  # checked when metadata.jsonl was read: an int >= 0 on every line
            "text": str(record.get("text", "")),
        }
        if "source_file_name" in record:
            after, sources = torch.random.get_rng_state(), []
            for name in record["source_file_name"]:
                torch.random.set_rng_state(before)
                sources.append(self.transform(open_rgb(self.root / name), size)[0])
            torch.random.set_rng_state(after)
            item["source_pixel_values"] = torch.stack(sources) if record["source_is_list"] else sources[0]
        return item


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
        buckets: BucketSpec | None = None,  # aspect-ratio buckets (data/buckets.py); None: square crops at resolution
        source_column: str | None = None,  # editing pairs: the column of each target's source image (or images)
    ) -> None:
        import datasets  # imported here: pyarrow start-up costs a second that shapes runs should not pay

        self.dataset = datasets.load_dataset(name, split=split, cache_dir=cache_dir)
        columns = self.dataset.column_names
        for key, column in (
            ("image_column", image_column),
            ("caption_column", caption_column),
            ("label_column", label_column),
            ("source_column", source_column),
        ):
            if column is not None and column not in columns:
                raise KeyError(f"data.{key}={column!r} is not a column of {name!r}; columns: {columns}")
        self.name = name
        self.image_column, self.caption_column, self.label_column = image_column, caption_column, label_column
        self.source_column = source_column
        if source_column is not None:
            if caption_column is None:
                raise ValueError(f"data.source_column={source_column!r}: editing pairs need their instruction column "
                                 "(data.caption_column)")  # fmt: skip
            targets, sources = self._image_sizes(), self._image_sizes(source_column)
            for row, (target, source) in enumerate(zip(targets, sources)):
                if any(size != target for size in source):
                    raise ValueError(
                        f"row {row} of {name!r}: the target is {target[0]}x{target[1]} (height x width), its source "
                        f"{source[0][0]}x{source[0][1]}: a pair is cropped alike, so both need one size"
                    )
        self.resolution = resolution
        self.transform = ImageTransform(resolution, center_crop, random_flip)
        self.num_classes = 0
        if label_column is not None:
            feature = self.dataset.features[label_column]
            self.num_classes = int(getattr(feature, "num_classes", 0) or max(self.dataset[label_column]) + 1)
        self.buckets: list[Bucket] | None = bucket_sizes(buckets, resolution) if buckets is not None else None
        self.bucket_of: list[int] | None = None
        if self.buckets is not None:
            sizes = self._image_sizes()
            small = [row for row, size in enumerate(sizes) if smaller_than_every_bucket(*size, self.buckets)]
            if small:
                raise ValueError(
                    f"{len(small)} image(s) of {name!r} are smaller than every bucket of data.buckets={self.buckets}: "
                    f"rows {small[:10]} ({sizes[small[0]][0]}x{sizes[small[0]][1]}, ...); give smaller buckets"
                )
            self.bucket_of = [nearest_bucket(*size, self.buckets) for size in sizes]

    def _image_sizes(self, column: str | None = None) -> list:
        """(height, width) of every row's image (of `column`, the image column by default; a list of them per row for
        a column of several images), read from the file headers (nothing is decoded)."""
        import datasets

        column = column or self.image_column
        rows = self.dataset
        feature = rows.features[column]
        if isinstance(feature, datasets.Image):
            rows = rows.cast_column(column, datasets.Image(decode=False))  # {"bytes", "path"}: the encoded file

        def size(value: object) -> tuple[int, int]:
            if isinstance(value, dict):
                value = io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]
            with value if isinstance(value, Image.Image) else Image.open(value) as image:
                return image.height, image.width

        sizes = []
        for row in rows.select_columns([column]):
            value = row[column]
            sizes.append([size(v) for v in value] if isinstance(value, list) else size(value))
        return sizes if column == self.image_column else [s if isinstance(s, list) else [s] for s in sizes]

    def __len__(self) -> int:
        return len(self.dataset)

    def captions(self) -> list[str]:
        return [str(text) for text in self.dataset[self.caption_column]] if self.caption_column else []

    def __getitem__(self, index: int) -> dict[str, object]:
        row = self.dataset[index]
        try:
            image = row[self.image_column]
            image = image if isinstance(image, Image.Image) else Image.open(image)
            reason = too_many_pixels(image)  # `datasets` opens images lazily: nothing is decoded yet
            if reason is not None:
                raise _refused(f"{index} of {self.name!r}", reason)
            size = self.buckets[self.bucket_of[index]] if self.bucket_of is not None else None
            before = torch.random.get_rng_state()  # a pair's sources take the target's crop and flip
            pixels, size_and_crop = self.transform(image, size)
            item = {
                "pixel_values": pixels,
                "size_and_crop": size_and_crop,
                "label": int(row[self.label_column]) if self.label_column else -1,
                "text": str(row[self.caption_column]) if self.caption_column else "",
            }
            if self.source_column is not None:
                after, value = torch.random.get_rng_state(), row[self.source_column]
                sources = []
                for source in value if isinstance(value, list) else [value]:
                    torch.random.set_rng_state(before)
                    opened = source if isinstance(source, Image.Image) else Image.open(source)
                    reason = too_many_pixels(opened)
                    if reason is not None:
                        raise _refused(f"{index}'s source of {self.name!r}", reason)
                    sources.append(self.transform(opened, size)[0])
                torch.random.set_rng_state(after)
                item["source_pixel_values"] = torch.stack(sources) if isinstance(value, list) else sources[0]
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as error:
            raise ValueError(f"cannot read image {index} of {self.name!r}: {error}") from error
        return item


class ImageFolderDataModule(ImageDataModule):
    """A folder of images with optional metadata.jsonl (`data=image_folder data.root=DIR`)."""

    def __init__(
        self,
        root: str,  # the image folder
        resolution: int = 32,  # output side in pixels
        center_crop: bool = True,  # centre crop; false takes a random crop
        random_flip: bool = True,  # horizontal flip
        skip_bad: bool = False,  # skip (and count) unreadable images instead of stopping
        scan_cache_dir: str | None = None,  # where the start-up scan's answer is kept per folder state (None: not kept)
        batch_size: int = 64,  # per-device batch size
        num_workers: NonNegativeInt = 2,  # loader processes
        pin_memory: bool = True,  # page-locked batches
        persistent_workers: bool = True,  # keep workers between epochs
        cache_latents: bool = False,  # latent models: encode once through the VAE, train from the cache
        latent_cache_dir: str = "outputs/latent_cache",  # where latent caches are kept
        buckets: BucketSpec | None = None,  # aspect-ratio buckets (data/buckets.py); None: square crops at resolution
        val_root: str | None = None,  # a held-out image folder for val/loss (centre-cropped, not flipped)
    ) -> None:
        dataset = ImageFolderDataset(
            root, resolution, center_crop, random_flip, skip_bad, scan_cache_dir, plain(buckets)
        )
        held_out = ImageFolderDataset(val_root, resolution, True, False, skip_bad, scan_cache_dir) if val_root else None
        newest = max(path.stat().st_mtime_ns for path in dataset.paths)
        identity = f"image_folder|{dataset.root.resolve()}|files={len(dataset)}|newest={newest}|resolution={resolution}"
        if dataset.buckets is not None:
            identity += f"|buckets={dataset.buckets}"
        super().__init__(
            dataset,
            batch_size,
            num_workers,
            pin_memory,
            persistent_workers,
            cache_latents,
            latent_cache_dir,
            identity,
            random_views=random_flip or not center_crop,
            val_dataset=held_out,
        )
