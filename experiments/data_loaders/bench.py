"""Loader images/s alone (shards from disk and over HTTP, image folder, HF indexed and streamed) for 1 and 2 workers,
against what the training step consumes, in one process on one machine (experiments/data_loaders/README.md).

    python experiments/data_loaders/bench.py [--images 1024] [--side 256] [--resolution 32] [--batches 24]

The source images are shapes drawn at `--side` px and saved as JPEG (what web-scale data is), with captions; shards
are written by `python -m lightdiff.data.shard` and served over HTTP by Python's own server on 127.0.0.1 (the network
path: curl through webdataset). Each loader serves `--batches` batches of 64 after 2 warm-up batches, median of 3.
The training step's consumption is the default model's (train.py's own images/s line, at `--resolution`).
"""

from __future__ import annotations

import argparse
import http.server
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # one line per shard request would drown the output
        pass


def make_folder(root: Path, count: int, side: int) -> Path:
    from lightdiff.data.shapes import ShapesDataset
    from lightdiff.sampling import to_uint8

    folder = root / "images"
    folder.mkdir(parents=True)
    data = ShapesDataset(size=count, resolution=side, seed=0)
    with (folder / "metadata.jsonl").open("w") as metadata:
        for index in range(count):
            item = data[index]
            from PIL import Image

            Image.fromarray(to_uint8(item["pixel_values"][None] / 2 + 0.5)[0]).save(
                folder / f"{index:06d}.jpg", quality=90
            )
            metadata.write(json.dumps({"file_name": f"{index:06d}.jpg", "text": item["text"]}) + "\n")
    return folder


def images_per_second(datamodule, batches: int, repeats: int = 3) -> float:
    rates = []
    for _ in range(repeats):
        loader = iter(datamodule.train_dataloader())
        for _ in range(2):  # warm-up: worker start, first shard or file reads
            next(loader)
        start = time.perf_counter()
        count = 0
        for _ in range(batches):
            count += len(next(loader)["pixel_values"])
        rates.append(count / (time.perf_counter() - start))
        del loader
    return statistics.median(rates)


def training_images_per_second(resolution: int, root: Path) -> float:
    command = [
        sys.executable,
        "train.py",
        f"output_root={root}",
        "run_name=step",
        "logger=csv",
        f"data.resolution={resolution}",
        "trainer.max_steps=40",
        "callbacks.samples.every_n_steps=0",
        "callbacks.samples.final_num_images=0",
        "callbacks.checkpoint.every_n_train_steps=1000",
    ]
    output = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True).stdout
    output += (root / "step" / "train.log").read_text()
    return float(re.findall(r"([0-9.]+) images/s", output)[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batches", type=int, default=24)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results.json"))
    args = parser.parse_args()

    from lightdiff.data import HFDataModule, ImageFolderDataModule, ShardsDataModule
    from lightdiff.data.shard import main as write_shards

    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        folder = make_folder(root, args.images, args.side)
        write_shards([str(folder), str(root / "shards"), "--max-count", str(args.images // 8)])
        server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), partial(QuietHandler, directory=str(root / "shards"))
        )
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.server_address[1]
        local = f"{root}/shards/train-{{000000..000007}}.tar"
        remote = f"http://127.0.0.1:{port}/train-{{000000..000007}}.tar"
        results: dict[str, float] = {}
        for workers in (1, 2):
            common = {"resolution": args.resolution, "batch_size": 64, "num_workers": workers}
            indexed = {"random_flip": False, "pin_memory": False, "persistent_workers": False}
            streamed = {"reference_size": 8}
            loaders = {
                "image_folder": partial(
                    ImageFolderDataModule, root=str(folder), scan_cache_dir=str(root / "scans"), **indexed, **common
                ),
                "hf_indexed": partial(
                    HFDataModule,
                    name=str(folder),
                    caption_column="text",
                    cache_dir=str(root / "hf"),
                    **indexed,
                    **common,
                ),
                "hf_streaming": partial(
                    HFDataModule,
                    name=str(folder),
                    caption_column="text",
                    random_flip=False,
                    streaming=True,
                    shuffle_buffer=1,
                    pin_memory=False,
                    **streamed,
                    **common,
                ),
                "shards_disk": partial(ShardsDataModule, urls=local, **streamed, **common),
                "shards_http": partial(ShardsDataModule, urls=remote, **streamed, **common),
            }
            for name, make in loaders.items():
                rate = images_per_second(make(), args.batches)
                results[f"{name}/workers={workers}"] = round(rate, 1)
                print(f"{name:14s} workers={workers}: {rate:8.1f} images/s", flush=True)
        server.shutdown()
        results["training_step"] = training_images_per_second(args.resolution, root)
        print(f"training step (default model, {args.resolution} px): {results['training_step']:.1f} images/s")
    args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "images_per_s": results}, indent=2))


if __name__ == "__main__":
    main()
