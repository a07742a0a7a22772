"""The edit_shapes table: an editing model against its control on held-out triples of the shapes edit task.

    python experiments/edit_shapes/judge.py EDITOR.ckpt [CONTROL.ckpt] [--num 256] [--steps 50] [--guidance 4.0]

Held-out triples are items `--data-size` .. `--data-size + num - 1` of `data=shapes_edit` (seed 0, `--resolution`
px): the training runs saw items 0 .. data-size - 1 only. Rows, each judged by `lightdiff.metrics.edits` against the
triple's source and instruction:
- exact targets (the data's own): the judge's ceiling at this resolution;
- the source unedited: what an editor that does nothing scores (preservation without accuracy);
- the caption's class drawn anew (shape and colour of the target, size and place drawn as the shapes data draws
  them): a perfect text-to-image base model prompted with the target's caption ("a red circle"), the bound of any
  control that does not see the source;
- CONTROL.ckpt (a text-to-image model: experiment=kontext_edit_shapes_control) prompted with the target's caption;
- EDITOR.ckpt (model.edit=true: experiment=kontext_edit_shapes) given the source and the instruction.
Models sample as sample.py does by default (sampler=auto, EMA weights), each image from its own seed (the triple's
index), classifier-free guidance `--guidance`. Prints a markdown table; `--out` also writes it with the raw numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir

from lightdiff.data.shapes import MAX_SIDE, MIN_SIDE, class_label, label_to_caption
from lightdiff.data.shapes_edit import Layout, edit_sample
from lightdiff.data.transforms import pil_to_tensor
from lightdiff.drawing import scheduler_for
from lightdiff.metrics.edits import edit_metrics
from lightdiff.sampling import generate, to_uint8
from lightdiff.trained import TrainedDenoiser, load_denoiser

CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"


def drawn(layouts: list[Layout], resolution: int) -> np.ndarray:
    return to_uint8(torch.stack([pil_to_tensor(layout.draw(resolution)) / 2 + 0.5 for layout in layouts]))


def caption_drawn_anew(target: Layout, resolution: int, seed: int) -> Layout:
    """The target's shape and colour at a size and place drawn as `shapes_layout` draws them."""
    rng = np.random.default_rng([seed, 2])
    side = float(rng.uniform(MIN_SIDE, MAX_SIDE)) * resolution
    return Layout(
        target.shape,
        target.color,
        side,
        float(rng.uniform(0, resolution - side)),
        float(rng.uniform(0, resolution - side)),
    )


def sampled(
    denoiser: TrainedDenoiser,
    seeds: list[int],
    inputs: dict[str, object],
    steps: int,
    guidance: float,
    resolution: int,
    batch: int,
) -> np.ndarray:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("sample", overrides=["ckpt=unused", f"steps={steps}"])
    scheduler, _ = scheduler_for(cfg, denoiser)
    images = []
    for start in range(0, len(seeds), batch):
        part = {key: value[start : start + batch] for key, value in inputs.items()}
        images.append(
            generate(
                denoiser.net,
                scheduler,
                steps,
                seeds[start : start + batch],
                denoiser.conditioning,
                part,
                guidance,
                vae=denoiser.vae,
                size=(resolution, resolution),
            )
        )
    return to_uint8(torch.cat(images))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("editor")
    parser.add_argument("control", nargs="?")
    parser.add_argument("--num", type=int, default=256)
    parser.add_argument("--data-size", type=int, default=50_000, help="the runs' data.size: held-out items follow")
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    indices = list(range(args.data_size, args.data_size + args.num))
    triples = [edit_sample(0, index, args.resolution) for index in indices]
    sources = drawn([source for source, _, _ in triples], args.resolution)
    instructions = [edit.instruction for _, edit, _ in triples]
    captions = [label_to_caption(class_label(target.shape, target.color)) for _, _, target in triples]

    rows: dict[str, tuple[dict[str, float], float | None]] = {}
    rows["exact targets (ceiling)"] = (
        edit_metrics(sources, drawn([target for _, _, target in triples], args.resolution), instructions),
        None,
    )
    rows["the source unedited"] = (edit_metrics(sources, sources, instructions), None)
    anew = [caption_drawn_anew(target, args.resolution, index) for index, (_, _, target) in zip(indices, triples)]
    rows["the caption's class drawn anew (perfect base model)"] = (
        edit_metrics(sources, drawn(anew, args.resolution), instructions),
        None,
    )
    if args.control:
        control = load_denoiser(args.control)
        began = time.perf_counter()
        outputs = sampled(control, indices, {"text": captions}, args.steps, args.guidance, args.resolution, args.batch)
        rows[f"control: text-to-image, the target's caption ({Path(args.control).parent.parent.name})"] = (
            edit_metrics(sources, outputs, instructions),
            len(indices) / (time.perf_counter() - began),
        )
    editor = load_denoiser(args.editor)
    source_pixels = torch.stack([pil_to_tensor(source.draw(args.resolution)) for source, _, _ in triples])
    began = time.perf_counter()
    outputs = sampled(
        editor,
        indices,
        {"text": instructions, "source_pixel_values": source_pixels},
        args.steps,
        args.guidance,
        args.resolution,
        args.batch,
    )
    rows[f"editor: source + instruction ({Path(args.editor).parent.parent.name})"] = (
        edit_metrics(sources, outputs, instructions),
        len(indices) / (time.perf_counter() - began),
    )

    attributes = ("color", "position", "shape", "size")
    lines = [
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"{args.num} held-out triples (items {indices[0]}..{indices[-1]}), {args.resolution} px, {args.steps} steps, "
        f"guidance {args.guidance}",
        "",
        "| row | right | accuracy | preservation | valid | right: colour / position / shape / size | images/s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, (metrics, speed) in rows.items():
        per = " / ".join(f"{100 * metrics.get(f'edit_right_{a}', float('nan')):.1f}" for a in attributes)
        lines.append(
            f"| {name} | {100 * metrics['edit_right']:.1f}% | {100 * metrics['edit_accuracy']:.1f}% | "
            f"{100 * metrics['edit_preservation']:.1f}% | {100 * metrics['edit_valid']:.1f}% | {per} | "
            f"{f'{speed:.1f}' if speed else '-'} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "table.md").write_text(table + "\n")
        raw = {name: {"metrics": metrics, "images_per_s": speed} for name, (metrics, speed) in rows.items()}
        (args.out / "metrics.json").write_text(
            json.dumps({"args": vars(args) | {"out": str(args.out)}, **raw}, indent=1)
        )


if __name__ == "__main__":
    main()
