"""Score a `sample.py` output folder of a text model with the shapes metric, overall and per caption.

Usage: python experiments/latent_shapes/score.py SAMPLES_DIR [OUT_JSON]
Reads SAMPLES_DIR/metadata.jsonl (each image's file_name and prompt `text`), judges every image and writes
{"overall": {...}, "per_caption_both": {caption: fraction right in shape and colour}, "images_per_caption": n}.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from lightdiff.metrics import shapes_metric


def score(folder: Path) -> dict[str, object]:
    records = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines() if line.strip()]
    if not records or any("text" not in record for record in records):
        raise SystemExit(f"{folder}/metadata.jsonl must list images with their prompt ('text')")
    images = np.stack([np.asarray(Image.open(folder / r["file_name"]).convert("RGB")) for r in records])
    prompts = [r["text"] for r in records]
    by_caption: dict[str, list[int]] = defaultdict(list)
    for index, prompt in enumerate(prompts):
        by_caption[prompt].append(index)
    per_caption = {
        caption: shapes_metric(images[indices], prompts=[caption] * len(indices))["both"]
        for caption, indices in sorted(by_caption.items())
    }
    counts = {len(indices) for indices in by_caption.values()}
    return {
        "overall": shapes_metric(images, prompts=prompts),
        "per_caption_both": per_caption,
        "images_per_caption": min(counts) if len(counts) == 1 else sorted(counts),
        "worst_caption": min(per_caption, key=per_caption.__getitem__),
    }


if __name__ == "__main__":
    result = score(Path(sys.argv[1]))
    text = json.dumps(result, indent=1)
    if len(sys.argv) > 2:
        Path(sys.argv[2]).write_text(text + "\n")
    print(text)
