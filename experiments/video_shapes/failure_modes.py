"""Why text-to-video clips miss on the video judge: sample a checkpoint as sample.py does, then count each wrong clip
under its first failing cause, the right share per captioned shape, which shape was drawn for which, and the shapes'
fill (area / box: square 1, circle pi/4, triangle 1/2; the judge calls the nearest within 0.1) per captioned shape,
beside the same for data clips and the video VAE's reconstructions of them (what the model could reach); and how far
apart the VAE's scaled latents put the same clip drawn as a square, a circle and a triangle (what the net must resolve).

    python experiments/video_shapes/failure_modes.py outputs/RUN/checkpoints/last.ckpt OUT.json \
        [sample.py overrides, e.g. num_images=96 (one clip per caption) guidance_scale=1.5]
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir

from lightdiff.data.moving_shapes import MovingShapesDataset, clip_path
from lightdiff.data.shapes import draw_shape
from lightdiff.drawing import Drawing, load_for_sampling
from lightdiff.metrics.motion import judge_clip, motion_metric, parse_motion_prompt
from lightdiff.metrics.shapes import SHAPES, judge_image
from lightdiff.nets.vae import decode, posterior_moments
from lightdiff.sampling import to_uint8

CONF = Path(__file__).resolve().parents[2] / "conf"
REFERENCE_CLIPS = 192  # data clips (and their reconstructions) for the reference fills


def cause(clip: np.ndarray, wanted: tuple[str | None, str | None, str | None]) -> str:
    """The first thing the judge finds wrong with a clip made for `wanted` (shape, colour, direction), or "right"."""
    if judge_clip(clip, wanted).right:
        return "right"
    frames = [judge_image(frame) for frame in clip]
    if not all(frame.valid for frame in frames):
        return "some frame not a valid shape"
    if len({(frame.shape, frame.color) for frame in frames}) > 1:
        return "valid frames, shape or colour changes"
    if frames[0].shape != wanted[0]:
        return "wrong shape"
    if frames[0].color != wanted[1]:
        return "wrong colour"
    return "motion"


def fills(clips: np.ndarray, prompts: list[str]) -> dict[str, list[float]]:
    """10th, 50th and 90th percentile of the fill of every frame, per captioned shape (of those captioned)."""
    result = {}
    for shape in SHAPES:
        values = [judge_image(frame).fill for clip, p in zip(clips, prompts) if shape in p.split() for frame in clip]
        if not values:  # fewer clips than captions: sample.py's first 64 prompts have no triangle
            continue
        result[shape] = [round(float(v), 3) for v in np.nanpercentile(values, [10, 50, 90])]
    return result


def reference_fills(vae: torch.nn.Module, resolution: int, num_frames: int) -> dict[str, dict[str, list[float]]]:
    """Fills of data clips and of the VAE's reconstructions (posterior means) of the same clips."""
    dataset = MovingShapesDataset(size=REFERENCE_CLIPS, resolution=resolution, num_frames=num_frames)
    items = [dataset[index] for index in range(REFERENCE_CLIPS)]
    pixels = torch.stack([item["pixel_values"] for item in items])  # (B, F, 3, H, W) in [-1, 1]
    prompts = [item["text"] for item in items]
    with torch.no_grad():
        moments = posterior_moments(vae, pixels)  # a 3-D VAE's (B, 2C, F', h, w)
        reconstructions = decode(vae, moments.chunk(2, dim=1)[0])
    return {
        "data": fills(to_uint8(pixels / 2 + 0.5), prompts),
        "vae_reconstructions": fills(to_uint8(reconstructions / 2 + 0.5), prompts),
    }


def latent_gaps(vae: torch.nn.Module, resolution: int, num_frames: int, count: int = 32) -> dict[str, float]:
    """RMS differences between data clips 0..count-1 redrawn as each shape (same colour, size and path), in pixels
    ([-1, 1]) and in the latents the net is trained on (posterior means x scaling_factor); and the latents' std."""

    def redrawn(shape: str, index: int) -> torch.Tensor:
        _, color, _, side, corners = clip_path(0, index, resolution, num_frames)
        frames = [np.asarray(draw_shape(shape, color, side, left, top, resolution)) for left, top in corners]
        return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1  # (F, 3, H, W)

    gaps: dict[str, list[float]] = collections.defaultdict(list)
    latents_std = []
    with torch.no_grad():
        for index in range(count):
            clips = torch.stack([redrawn(shape, index) for shape in ("circle", "square", "triangle")])
            means = posterior_moments(vae, clips).chunk(2, dim=1)[0] * vae.config.scaling_factor
            latents_std.append(means.std().item())
            rms = lambda a, b: (a - b).pow(2).mean().sqrt().item()  # noqa: E731
            gaps["square_vs_circle_pixels"].append(rms(clips[1], clips[0]))
            gaps["square_vs_circle_latents"].append(rms(means[1], means[0]))
            gaps["triangle_vs_circle_latents"].append(rms(means[2], means[0]))
    return {**{key: round(float(np.mean(v)), 4) for key, v in gaps.items()}, "latents_std": float(np.mean(latents_std))}


def main(checkpoint: str, out: str, overrides: list[str]) -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("sample", overrides=[f"ckpt={checkpoint}", *overrides])
    denoiser = load_for_sampling(cfg)
    drawing = Drawing(cfg, denoiser, torch.device("cpu"), cfg.num_images)
    clips = np.concatenate(
        [
            to_uint8(drawing.draw(start, min(cfg.batch_size, cfg.num_images - start)))
            for start in range(0, cfg.num_images, cfg.batch_size)
        ]
    )
    prompts = list(drawing.prompts)
    causes: collections.Counter[str] = collections.Counter()
    right_by_shape = collections.defaultdict(list)
    drawn_for: collections.Counter[str] = collections.Counter()
    for clip, prompt in zip(clips, prompts):
        wanted = parse_motion_prompt(prompt)
        reason = cause(clip, wanted)
        causes[reason] += 1
        right_by_shape[wanted[0]].append(reason == "right")
        if reason == "wrong shape":
            drawn_for[f"{wanted[0]} -> {judge_image(clip[0]).shape}"] += 1
    resolution, num_frames = drawing.size[0], drawing.frames
    report = {
        "checkpoint": checkpoint,
        "overrides": overrides,
        "motion": motion_metric(clips, prompts),
        "causes": dict(causes.most_common()),
        "right_by_captioned_shape": {shape: float(np.mean(v)) for shape, v in right_by_shape.items()},
        "wrong_shape_drawn": dict(drawn_for),
        "fill_percentiles_10_50_90": {
            "samples": fills(clips, prompts),
            **reference_fills(denoiser.vae, resolution, num_frames),
        },
        "latent_gaps": latent_gaps(denoiser.vae, resolution, num_frames),
    }
    Path(out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
