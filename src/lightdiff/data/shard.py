"""Write WebDataset tar shards (`data=shards`) from an image folder or a Hugging Face data set:

    python -m lightdiff.data.shard SRC OUT [--max-count 10000] [--vae VAE --resolution R] [--text-encoder PIPELINE]
    python -m lightdiff.data.shard hf:NAME_OR_FOLDER OUT --caption-column text [--split train]

Each sample is `KEY.<image>` (an image folder's file bytes as they are, when jpg / png / webp; anything else, and a
data set's decoded images, as PNG), `KEY.txt` (its caption, when it has one) and `KEY.json` ({"width", "height"} of
the original image, its "label" and source "file_name" where known): img2dataset's layout, so shards from either
tool train alike. An editing pair's source (metadata.jsonl's source_file_name) is `KEY.source.png` (a list of
references: `KEY.source.0.png`, ...), decoded with its target's crop and flip.
With `--vae DIR --resolution R` each sample also holds `KEY.moments.npy`, the posterior moments (float16 mean and
log-variance) of its centre-cropped R px image under that AutoencoderKL, and its json the VAE's
fingerprint and the crop record: the latent cache as shards, so `data=shards data.cache_latents=true` trains a latent
model on a cluster without encoding again (checked against the model's VAE). With `--text-encoder PIPELINE` each
captioned sample also holds `KEY.text.npy`, the float16 states its caption gets from that pipeline's frozen text
encoder(s), as the family of the pipeline's denoiser encodes it (what the map-style text cache stores: SDXL's two
encoders with the pooled vector, FLUX's and SD3's packed states), and its json the encoders' fingerprint: a run with
`model.pretrained=PIPELINE data.cache_latents=true` then encodes no caption either (checked against its encoders).
Mind the size: CLIP-L's 77 x 768 states are 118 kB a sample in float16, a T5's 512 x 4096 are 4 MB. Shards are
written by webdataset's
ShardWriter as OUT/train-000000.tar, ... of at most `--max-count` samples each; an image that cannot be decoded stops
the writing, naming it, and the shards written so far are removed.
"""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image
from webdataset import ShardWriter

from lightdiff.data.image_folder import image_paths, open_rgb, read_metadata

KEPT_AS_IS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}  # file suffix -> sample extension
SHARD_PATTERN = "train-%06d.tar"


class SourceSample(NamedTuple):
    """One sample on its way into a shard."""

    extension: str  # of the image member: jpg | png | webp
    image: bytes  # the encoded image
    caption: str | None
    record: dict[str, object]  # KEY.json: original width and height, label, where it came from, stored latents
    members: dict[str, bytes] = {}  # further members by extension (moments.npy, text.npy), never mutated


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def folder_samples(root: Path) -> Iterator[SourceSample]:
    """Every image of an image folder, in the order `data=image_folder` indexes them (metadata.jsonl's, else sorted
    paths)."""
    paths = image_paths(root)
    metadata = read_metadata(root)
    names = sorted(metadata) if metadata else [path.relative_to(root).as_posix() for path in paths]
    if not names:
        raise FileNotFoundError(f"no images under {root}")
    for name in names:
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(f"{root / 'metadata.jsonl'} lists {name!r}, which is not a file under {root}")
        image = open_rgb(path)  # decoded once: an unreadable file stops here, named
        record = metadata.get(name, {})
        info: dict[str, object] = {"width": image.width, "height": image.height, "file_name": name}
        if "label" in record:
            info["label"] = record["label"]
        extension = KEPT_AS_IS.get(path.suffix.lower())
        data = path.read_bytes() if extension is not None else _png(image)
        caption = str(record["text"]) if record.get("text") else None
        yield SourceSample(extension or "png", data, caption, info, _source_members(root, name, image, record))


def _source_members(root: Path, name: str, image: Image.Image, record: dict) -> dict[str, bytes]:
    """An editing pair's source(s) as PNG members: `source.png`, or `source.0.png`, ... for a list of references
    (metadata.jsonl's source_file_name); each of its target's size, as data=image_folder requires."""
    members: dict[str, bytes] = {}
    for index, source_name in enumerate(record.get("source_file_name", [])):
        source = open_rgb(root / source_name)  # an unreadable source stops the writing here, named
        if source.size != image.size:
            raise ValueError(
                f"{root / name} is {image.height}x{image.width} (height x width), its source {root / source_name} "
                f"{source.height}x{source.width}: a pair is cropped alike, so both need one size"
            )
        members[f"source.{index}.png" if record["source_is_list"] else "source.png"] = _png(source)
    return members


def hf_samples(
    name: str, split: str, image_column: str, caption_column: str | None, label_column: str | None
) -> Iterator[SourceSample]:
    """The same from a `datasets.load_dataset` data set (hub id or local folder), images stored as PNG."""
    import datasets

    rows = datasets.load_dataset(name, split=split)
    for column in (image_column, caption_column, label_column):
        if column is not None and column not in rows.column_names:
            raise KeyError(f"{column!r} is not a column of {name!r}; columns: {rows.column_names}")
    for index, row in enumerate(rows):
        image = row[image_column]
        if not isinstance(image, Image.Image):
            raise ValueError(f"row {index} of {name!r}: column {image_column!r} holds {type(image).__name__}, no image")
        info: dict[str, object] = {"width": image.width, "height": image.height, "row": index}
        if label_column is not None:
            info["label"] = int(row[label_column])
        caption = str(row[caption_column]) if caption_column is not None and row[caption_column] else None
        yield SourceSample("png", _png(image.convert("RGB")), caption, info)


def _in_chunks(
    samples: Iterator[SourceSample], batch_size: int, encode: Callable[[list[SourceSample]], Iterator[SourceSample]]
) -> Iterator[SourceSample]:
    """`encode` applied to `samples` `batch_size` at a time (a network encodes a batch in about the time of one)."""
    chunk: list[SourceSample] = []
    for sample in samples:
        chunk.append(sample)
        if len(chunk) == batch_size:
            yield from encode(chunk)
            chunk = []
    if chunk:
        yield from encode(chunk)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def with_latents(
    samples: Iterator[SourceSample], vae_path: str, resolution: int, batch_size: int = 32
) -> Iterator[SourceSample]:
    """`samples`, each with "moments.npy" (q(z | x) of its centre-cropped image under the VAE at `vae_path`) and the
    VAE's fingerprint, resolution and the crop record in its json (`info["latent"]`), encoded `batch_size` at a time."""
    import torch
    from diffusers import AutoencoderKL

    from lightdiff.data.latent_cache import vae_fingerprint
    from lightdiff.data.transforms import ImageTransform

    vae = AutoencoderKL.from_pretrained(vae_path).eval()
    fingerprint = vae_fingerprint(vae)
    transform = ImageTransform(resolution, center_crop=True, random_flip=False)

    def encoded(chunk: list[SourceSample]) -> Iterator[SourceSample]:
        if any(key.startswith("source") for sample in chunk for key in sample.members):
            raise ValueError(
                "--vae with editing pairs: the shards' stored latents hold targets only; write them without"
            )
        views = [transform(Image.open(io.BytesIO(sample.image))) for sample in chunk]
        with torch.no_grad():
            moments = vae.encode(torch.stack([pixels for pixels, _ in views])).latent_dist.parameters.half()
        for sample, (_, crop), moment in zip(chunk, views, moments, strict=True):
            latent = {"vae": fingerprint, "resolution": resolution, "size_and_crop": crop.tolist()}
            members = {**sample.members, "moments.npy": _npy(moment.numpy())}
            yield sample._replace(record={**sample.record, "latent": latent}, members=members)

    return _in_chunks(samples, batch_size, encoded)


def with_text_states(
    samples: Iterator[SourceSample], pipeline: str, max_sequence_length: int | None, batch_size: int = 32
) -> Iterator[SourceSample]:
    """`samples`, each captioned one with "text.npy" (its caption's states under the frozen text encoder(s) of the
    pipeline at `pipeline`, as the text family of that pipeline's denoiser encodes them) and the encoders' fingerprint
    in its json (`info["text_states"]`); uncaptioned samples as they are."""
    import torch

    # The writer is an entry point: it may build a network family, which the data readers never do.
    from lightdiff.nets.families import ConditioningSettings, denoiser_skeleton, family_of
    from lightdiff.nets.families.base import CacheableText

    key = "--text-encoder"
    net = denoiser_skeleton(pipeline, key)
    settings = ConditioningSettings(max_sequence_length=max_sequence_length)
    family = family_of(net).pretrained_conditioning(pipeline, net, settings, key).eval()
    if not isinstance(family, CacheableText):
        raise ValueError(f"{key}={pipeline!r}: its {type(net).__name__} takes no text to encode")
    record = {"encoder": family.cache_fingerprint(), "caption": "txt"}  # the states are of the txt member's caption

    def encoded(chunk: list[SourceSample]) -> Iterator[SourceSample]:
        captioned = [sample.caption.strip() for sample in chunk if sample.caption is not None]
        with torch.no_grad():
            states = iter(family.encode(captioned).half().numpy()) if captioned else iter(())
        for sample in chunk:
            if sample.caption is None:
                yield sample
                continue
            yield sample._replace(
                record={**sample.record, "text_states": record},
                members={**sample.members, "text.npy": _npy(next(states))},
            )

    return _in_chunks(samples, batch_size, encoded)


def write_shards(samples: Iterator[SourceSample], out: Path, max_count: int) -> list[Path]:
    """Write `samples` into OUT/train-%06d.tar shards of at most `max_count` samples; the shard paths."""
    if max_count < 1:
        raise ValueError(f"--max-count={max_count} must be positive")
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(out.glob("train-*.tar"))
    if existing:
        raise FileExistsError(f"{out} already holds shards ({existing[0].name}, ...): write into an empty folder")
    try:
        with ShardWriter(str(out / SHARD_PATTERN), maxcount=max_count, verbose=0) as writer:
            for index, sample in enumerate(samples):
                members: dict[str, object] = {"__key__": f"{index:09d}", sample.extension: sample.image}
                members["json"] = json.dumps(sample.record).encode()
                if sample.caption is not None:
                    members["txt"] = sample.caption.encode("utf-8")
                writer.write({**members, **sample.members})
    except BaseException:
        for shard in out.glob("train-*.tar"):  # a partial set of shards would train on part of the data unnoticed
            shard.unlink()
        raise
    return sorted(out.glob("train-*.tar"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="an image folder (metadata.jsonl captions / labels), or hf:NAME_OR_FOLDER")
    parser.add_argument("out", type=Path, help="the (empty or new) folder the shards are written into")
    parser.add_argument("--max-count", type=int, default=10_000, help="samples per shard (img2dataset's default)")
    parser.add_argument("--split", default="train", help="hf: the split")
    parser.add_argument("--image-column", default="image", help="hf: the column of images")
    parser.add_argument("--caption-column", default=None, help="hf: the column of captions")
    parser.add_argument("--label-column", default=None, help="hf: the column of integer labels")
    parser.add_argument("--vae", default=None, help="an AutoencoderKL folder: store each image's latent moments too")
    parser.add_argument("--resolution", type=int, default=None, help="with --vae: the side the images are encoded at")
    parser.add_argument(
        "--text-encoder", default=None, help="a pipeline folder or hub id: store its frozen encoders' caption states"
    )
    parser.add_argument(
        "--max-sequence-length", type=int, default=None, help="with --text-encoder: T5 tokens (the run's model.*)"
    )
    args = parser.parse_args(argv)
    if (args.vae is None) != (args.resolution is None):
        raise SystemExit("--vae and --resolution go together: the latents are of images at one resolution")
    if args.max_sequence_length is not None and args.text_encoder is None:
        raise SystemExit("--max-sequence-length is the text encoder's: give --text-encoder PIPELINE too")
    if args.source.startswith("hf:"):
        samples = hf_samples(
            args.source.removeprefix("hf:"), args.split, args.image_column, args.caption_column, args.label_column
        )
    else:
        root = Path(args.source).expanduser()
        if not root.is_dir():
            raise SystemExit(f"SRC={args.source!r} is neither a folder nor hf:NAME")
        samples = folder_samples(root)
    if args.vae is not None:
        samples = with_latents(samples, args.vae, args.resolution)
    if args.text_encoder is not None:
        samples = with_text_states(samples, args.text_encoder, args.max_sequence_length)
    shards = write_shards(samples, args.out, args.max_count)
    urls = f"{args.out}/train-{{{0:06d}..{len(shards) - 1:06d}}}.tar"
    print(f"wrote {len(shards)} shard(s) to {args.out}: train with data=shards 'data.urls=\"{urls}\"'")


if __name__ == "__main__":
    main()
