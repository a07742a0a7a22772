"""A whole model family defined in this file alone: its network (not a diffusers class, called its own way), its
conditioning, their state and a pipeline writer and reader. Registered with one call, lightdiff trains it, draws
preview grids, checkpoints it, reloads it in sample.py, exports it and reads the export back, without a line of
`src/` knowing it: the proof that a family is one module (`lightdiff.nets.families`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import ConfigMixin, DDIMScheduler, ModelMixin
from diffusers.configuration_utils import register_to_config
from PIL import Image
from torch import nn

from lightdiff.nets.families import Condition, ConditioningSettings, Family, family_of, register_family
from lightdiff.nets.families.base import DataDescription, Inputs, PipelineComponents
from lightdiff.sample import run as sample_run
from lightdiff.sampling import generate
from lightdiff.train import run as train_run
from lightdiff.trained import load_denoiser

from .conftest import compose_config


class ToyDenoiser(ModelMixin, ConfigMixin):
    """A denoiser that is no diffusers class: it takes its noise level as a fraction and its condition as an extra
    input channel, positionally, and returns a bare tensor."""

    @register_to_config
    def __init__(self, in_channels: int = 3, sample_size: int = 16, width: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels + 2, width, 3, padding=1), nn.SiLU(), nn.Conv2d(width, in_channels, 3, padding=1)
        )

    def forward(self, x: torch.Tensor, level: torch.Tensor, brightness: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        maps = torch.stack([level, brightness], dim=1)[:, :, None, None].expand(batch, 2, height, width)
        return self.body(torch.cat([x, maps.to(x.dtype)], dim=1))


class Brightness(nn.Module):
    """The class label as a learnt brightness value (its own parameter), with a null value for guidance."""

    has_unconditional = True
    reads = ("label",)

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.values = nn.Embedding(num_classes + 1, 1)  # the last row: no condition
        self.summary_dim = 1

    def check(self, net: nn.Module, data: DataDescription) -> None:
        if data.num_classes > self.num_classes:
            raise ValueError(f"toy family: {data.num_classes} classes, room for {self.num_classes}")

    def forward(self, inputs: Inputs) -> Condition:
        labels = torch.as_tensor(inputs["label"]).long()
        labels = torch.where(torch.as_tensor(inputs.get("dropped") or [False] * len(labels)), self.num_classes, labels)
        brightness = self.values(labels.to(self.values.weight.device))[:, 0]
        return Condition({"brightness": brightness}, brightness[:, None])

    def without_condition(self, inputs: Inputs, which: Sequence[bool], negative_prompt: str = "") -> Inputs:
        previous = list(inputs.get("dropped") or [False] * len(which))
        return {**inputs, "dropped": [old or new for old, new in zip(previous, which)]}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.values.parameters())

    def state(self) -> dict[str, Any]:
        return {"family": "toy_brightness", "num_classes": self.num_classes}


class ToyFamily(Family):
    name = "toy"
    denoiser_class = ToyDenoiser
    conditionings = {"toy_brightness": lambda state: Brightness(state["num_classes"])}

    def output(self, net: nn.Module, x_t: torch.Tensor, timesteps: torch.Tensor, condition: Condition) -> torch.Tensor:
        return net(x_t, timesteps.float() / 1000, condition.kwargs["brightness"])

    def new_conditioning(self, net: nn.Module, settings: ConditioningSettings, data: DataDescription) -> Brightness:
        return Brightness(max(data.num_classes, 1))

    def read_folder(self, folder: Path, net: nn.Module, metadata: dict[str, Any], load_vae: Any) -> tuple[Any, Any]:
        conditioning = Brightness(json.loads((folder / "toy.json").read_text())["num_classes"])
        conditioning.values.load_state_dict(torch.load(folder / "brightness.pt", weights_only=True))
        return None, conditioning.eval()

    def write(self, parts: PipelineComponents, folder: Path) -> None:
        parts.net.save_pretrained(folder / "transformer")
        parts.scheduler.save_pretrained(folder / "scheduler")
        (folder / "toy.json").write_text(json.dumps({"num_classes": parts.conditioning.num_classes}))
        torch.save(parts.conditioning.values.state_dict(), folder / "brightness.pt")


def _images(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(path)) for path in sorted(folder.glob("0*.png"))])


def test_a_whole_family_from_outside_src_trains_samples_reloads_and_exports(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ToyDenoiser has no family"):  # negative control: unknown until registered
        family_of(ToyDenoiser())
    register_family(ToyFamily())
    cfg = compose_config(
        "train",
        [
            f"output_root={tmp_path}",
            "logger=csv",
            "run_name=toy",
            "trainer.max_steps=3",
            "data.batch_size=4",
            "data.size=32",
            "data.resolution=16",
            "callbacks.samples.every_n_steps=2",
            "callbacks.samples.steps=2",
            "callbacks.samples.num_images=4",
            "callbacks.samples.final_num_images=4",
            "callbacks.ema=null",
            "model.net={_target_:tests.test_toy_family.ToyDenoiser,sample_size:16}",
            "+model.cond_drop_prob=0.25",
        ],
    )
    trainer = train_run(cfg)
    module = trainer.lightning_module
    assert isinstance(module.net, ToyDenoiser) and isinstance(module.conditioning, Brightness)
    trained = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert id(module.conditioning.values.weight) in trained  # the family's own parameter trains with the net
    grids = {path.name for path in (tmp_path / "toy" / "samples").glob("*.png")}
    assert {"samples_step0000002.png", "final_step0000003.png"} <= grids  # previews drawn through the family

    checkpoint = tmp_path / "toy" / "checkpoints" / "last.ckpt"
    meta = torch.load(checkpoint, weights_only=True)["lightdiff"]
    assert meta["net_class"] == "ToyDenoiser" and meta["conditioning"]["family"] == "toy_brightness"
    scheduler = module.objective.scheduler(DDIMScheduler)
    inputs = {"label": torch.tensor([3, 7])}
    guided = generate(module.net, scheduler, 2, [0, 1], module.conditioning, inputs, 3.0)
    loaded = load_denoiser(checkpoint, use_ema=False)
    assert torch.equal(loaded.conditioning.values.weight, module.conditioning.values.weight.cpu())
    torch.testing.assert_close(generate(loaded.net, scheduler, 2, [0, 1], loaded.conditioning, inputs, 3.0), guided)
    assert not torch.allclose(generate(loaded.net, scheduler, 2, [0, 1], loaded.conditioning, inputs, 1.0), guided)

    export = tmp_path / "export"
    sample_run(compose_config("sample", [f"ckpt={checkpoint}", f"export={export}", "use_ema=false", "sampler=ddim"]))
    assert (export / "transformer" / "config.json").is_file() and (export / "brightness.pt").is_file()
    drawn = {}
    for name, source in (("checkpoint", checkpoint), ("export", export)):
        out = tmp_path / f"samples-{name}"
        sample_run(
            compose_config(
                "sample",
                [f"ckpt={source}", f"out={out}", "num_images=2", "steps=2", "label=5", "use_ema=false"]
                + ["sampler=ddim", "guidance_scale=2.0"],
            )
        )
        drawn[name] = _images(out)
    assert drawn["checkpoint"].shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(drawn["export"], drawn["checkpoint"])  # the export is the checkpoint's model
