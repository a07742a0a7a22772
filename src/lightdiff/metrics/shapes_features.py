"""`ShapesFeatures`: a feature network for the embedded shapes data that sees what a shape is, and where and how large.

Why it exists (issue 41): `RandomConvFeatures` is an untrained network whose features are global means, so it barely
sees a shape's position or size. On it, a "model" that draws one fixed, centred shape per caption scored an FID
substitute within 2x of a real teacher's. This network is trained, once, to predict each image's shape, colour,
centre and side from its *spatial* features (a 4 x 4 map flattened, never pooled), so its 128-d embedding moves when a
shape moves or grows, and a set of images that always puts the shape in one place is far from the data on it.

Training is a fixed recipe (`RECIPE`): images of the shapes data drawn from their own seed (never the reference
images FID compares with), a fixed initialisation seed, one thread (so the floating-point order, and with it the
weights, is the same on any machine with the same torch build). lightdiff ships the weights the recipe gave
(`assets/shapes_features_<recipe hash>.safetensors`), so nothing is trained where it is used; a changed recipe is
trained once into `cache_dir` under its own hash. The hash of the weights themselves (`weights_hash`) is what results
record, as FID's reference cache does through `module_fingerprint`. Before the network measures anything it must pass
its own calibration on held-out images (`CALIBRATION`): a feature network that cannot tell shapes apart refuses to run.

Images are float (B, 3, H, W) in [0, 1] of any square size; they are resized to 32 px (the data at 16 and 32 px is
what it trains on).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lightdiff.data.shapes import COLOR_NAMES, SHAPES, draw_shape, shapes_layout
from lightdiff.data.transforms import pil_to_tensor
from lightdiff.files import module_fingerprint
from lightdiff.metrics.features import check_unit_range

log = logging.getLogger(__name__)

INPUT_SIDE = 32  # every image is resized to this side before the network
# The training recipe: changing any value changes the cache file's name, so an old network is never reused for it.
RECIPE: dict[str, int | float | tuple[int, ...]] = {
    "version": 1,
    "resolutions": (16, 32),  # the data is drawn at these sides (then resized to INPUT_SIDE)
    "train_images": 6144,
    "data_seed": 1_000_003,  # not the data's seed 0: the FID reference images are never trained on
    "held_out_seed": 1_000_033,
    "init_seed": 0,
    "steps": 1200,
    "batch_size": 64,
    "learning_rate": 2e-3,
    "width": 32,
    "embedding": 128,
}
# Held-out calibration the trained network must pass (it reaches about 1.0 / 1.0 / 0.01 / 0.01 here).
CALIBRATION = {"shape_accuracy": 0.95, "colour_accuracy": 0.95, "centre_error": 0.05, "side_error": 0.05}


def default_cache_dir() -> Path:
    return Path(os.environ.get("LIGHTDIFF_CACHE", Path.home() / ".cache" / "lightdiff")) / "feature_nets"


class _ShapesNet(nn.Module):
    """Three stride-2 conv stages to a 4 x 4 map, flattened (position kept), an embedding, and four heads."""

    def __init__(self, width: int, embedding: int) -> None:
        super().__init__()
        widths = [3, width, 2 * width, 2 * width]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, stride=2, padding=1)]
            layers.append(nn.SiLU())
        self.trunk = nn.Sequential(*layers)
        side = INPUT_SIDE // 8
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(widths[-1] * side * side, embedding), nn.SiLU())
        self.shape_head = nn.Linear(embedding, len(SHAPES))
        self.colour_head = nn.Linear(embedding, len(COLOR_NAMES))
        self.geometry_head = nn.Linear(embedding, 3)  # centre x, centre y, side: fractions of the picture

    def embedding(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.embed(self.trunk(pixels))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        embedding = self.embedding(pixels)
        return self.shape_head(embedding), self.colour_head(embedding), self.geometry_head(embedding)


def _to_input(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] images of any square side -> the network's [-1, 1] input at INPUT_SIDE."""
    pixels = images.float() * 2 - 1
    if pixels.shape[-1] != INPUT_SIDE or pixels.shape[-2] != INPUT_SIDE:
        pixels = F.interpolate(pixels, size=(INPUT_SIDE, INPUT_SIDE), mode="bilinear", antialias=True)
    return pixels


def labelled_shapes(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`count` shapes images in [0, 1] at INPUT_SIDE (drawn alternately at each of the recipe's resolutions) with
    their shape index, colour index and geometry (centre x, centre y, side as fractions of the picture)."""
    images, shapes, colours, geometry = [], [], [], []
    resolutions = RECIPE["resolutions"]
    for index in range(count):
        resolution = int(resolutions[index % len(resolutions)])
        shape, colour, side, left, top = shapes_layout(seed, index, resolution)
        image = draw_shape(shape, colour, side, left, top, resolution)  # shapes_sample's image, its layout drawn once
        pixels = pil_to_tensor(image).unsqueeze(0) / 2 + 0.5
        images.append(_to_input(pixels)[0] / 2 + 0.5)
        shapes.append(SHAPES.index(shape))
        colours.append(COLOR_NAMES.index(colour))
        geometry.append([(left + side / 2) / resolution, (top + side / 2) / resolution, side / resolution])
    return torch.stack(images), torch.tensor(shapes), torch.tensor(colours), torch.tensor(geometry)


def calibrate(net: _ShapesNet, count: int = 768) -> dict[str, float]:
    """Accuracy of shape and colour and mean absolute error of centre and side on held-out images."""
    images, shapes, colours, geometry = labelled_shapes(count, int(RECIPE["held_out_seed"]))
    with torch.no_grad():
        shape_logits, colour_logits, predicted = net(_to_input(images))
    centre_error = (predicted[:, :2] - geometry[:, :2]).abs().mean()
    return {
        "shape_accuracy": float((shape_logits.argmax(1) == shapes).float().mean()),
        "colour_accuracy": float((colour_logits.argmax(1) == colours).float().mean()),
        "centre_error": float(centre_error),
        "side_error": float((predicted[:, 2] - geometry[:, 2]).abs().mean()),
    }


def train_shapes_net() -> _ShapesNet:
    """Train the network by `RECIPE`: deterministic (fixed seeds, one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(RECIPE["init_seed"]))
            net = _ShapesNet(int(RECIPE["width"]), int(RECIPE["embedding"]))
            images, shapes, colours, geometry = labelled_shapes(int(RECIPE["train_images"]), int(RECIPE["data_seed"]))
            inputs = _to_input(images)
            optimiser = torch.optim.Adam(net.parameters(), lr=float(RECIPE["learning_rate"]))
            steps, batch = int(RECIPE["steps"]), int(RECIPE["batch_size"])
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
            order = torch.Generator().manual_seed(int(RECIPE["init_seed"]))
            for _ in range(steps):
                chosen = torch.randint(len(inputs), (batch,), generator=order)
                shape_logits, colour_logits, predicted = net(inputs[chosen])
                loss = (
                    F.cross_entropy(shape_logits, shapes[chosen])
                    + F.cross_entropy(colour_logits, colours[chosen])
                    + 10 * F.mse_loss(predicted, geometry[chosen])  # fractions: errors of 0.1 must still count
                )
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                schedule.step()
    finally:
        torch.set_num_threads(threads)
    return net.requires_grad_(False).eval()


def recipe_hash() -> str:
    return hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:16]


SHIPPED_DIR = Path(__file__).resolve().parent.parent / "assets"


def weights_file(directory: Path) -> Path:
    return directory / f"shapes_features_{recipe_hash()}.safetensors"


def failed_calibration(calibration: dict[str, float]) -> dict[str, float]:
    """The calibration numbers that miss `CALIBRATION` (accuracies below it, errors above it)."""
    return {
        key: value
        for key, value in calibration.items()
        if (value < CALIBRATION[key] if key.endswith("accuracy") else value > CALIBRATION[key])
    }


class ShapesFeatures(nn.Module):
    """The 128-d embedding of a network trained to find the shape, colour, centre and side of shapes images.

    Read from the weights lightdiff ships for the current `RECIPE` (`assets/shapes_features_<recipe hash>.safetensors`),
    else from `cache_dir`, else trained there once (about two minutes on one CPU thread). `weights_hash` names the
    exact weights: record it beside any number measured with them."""

    def __init__(
        self,
        cache_dir: str | Path | None = None,  # where a network trained here is kept; None: ~/.cache/lightdiff
    ) -> None:
        super().__init__()
        directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        found = next((path for path in (weights_file(SHIPPED_DIR), weights_file(directory)) if path.is_file()), None)
        self.net = _ShapesNet(int(RECIPE["width"]), int(RECIPE["embedding"]))
        if found is not None:
            self.net.load_state_dict(load_file(found))
            with safe_open(found, "pt") as handle:
                self.calibration = json.loads(handle.metadata()["calibration"])
            self.path = found
        else:
            self.path = weights_file(directory)
            log.info("training the shapes feature network (recipe %s) into %s", recipe_hash(), self.path)
            self.net = train_shapes_net()
            self.calibration = calibrate(self.net)
        failed = failed_calibration(self.calibration)
        if failed:
            raise RuntimeError(
                f"the shapes feature network ({self.path}) fails its calibration {CALIBRATION}: {failed}; change "
                "RECIPE (and delete the file if it was trained here)"
            )
        if found is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_name(f".{self.path.name}.{os.getpid()}.partial")  # complete or absent
            save_file(self.net.state_dict(), partial, metadata={"calibration": json.dumps(self.calibration)})
            os.replace(partial, self.path)
        self.net.requires_grad_(False).eval()
        self.weights_hash = module_fingerprint({"recipe": RECIPE}, self.net)
        self.num_features = int(RECIPE["embedding"])

    def train(self, mode: bool = True) -> ShapesFeatures:
        return super().train(False)  # a fixed measuring instrument

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.embedding(_to_input(check_unit_range(images))).double()

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        """What the network reads in each image: shape and colour indices, centre (x, y) and side as fractions."""
        shape_logits, colour_logits, geometry = self.net(_to_input(check_unit_range(images)))
        return {
            "shape": shape_logits.argmax(1).numpy(),
            "colour": colour_logits.argmax(1).numpy(),
            "centre": geometry[:, :2].numpy(),
            "side": geometry[:, 2].numpy(),
        }
