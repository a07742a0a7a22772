"""Pixel UNets (`UNet2DModel`): unconditional, or class-conditional (`num_class_embeds`), exported as `DDPMPipeline`
(a flow-matching one too: DDPMPipeline's loop runs FlowMatchEulerDiscreteScheduler). The label conditionings live
here and serve DiT too (`families/dit.py`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline, UNet2DModel
from torch import nn

from lightdiff.config import ConfigError
from lightdiff.nets.families.base import (
    Condition,
    ConditioningSettings,
    DataDescription,
    Family,
    Inputs,
    PipelineComponents,
)


class NoCondition(nn.Module):
    """An unconditional network: no keyword arguments."""

    summary_dim = 0
    has_unconditional = True
    reads = ()

    def check(self, net: nn.Module, data: DataDescription) -> None:
        pass

    def forward(self, inputs: Inputs) -> Condition:
        return Condition()

    def without_condition(self, inputs: Inputs, which: Sequence[bool], negative_prompt: str = "") -> Inputs:
        return inputs

    def trainable_parameters(self) -> list[nn.Parameter]:
        return []

    def state(self) -> dict[str, Any]:
        return {"family": "none"}


class ClassLabels(nn.Module):
    """`class_labels` of a class-conditional network; the discriminator sees the label one-hot."""

    has_unconditional = False  # a DiT drops labels to its null class itself while training (diffusers' embedding)
    reads = ("label",)

    def __init__(self, num_classes: int, key: str = "net.num_class_embeds") -> None:
        super().__init__()
        self.num_classes = num_classes
        self.summary_dim = num_classes
        self.key = key  # the setting that sets num_classes (errors)

    def check(self, net: nn.Module, data: DataDescription) -> None:
        if data.num_classes == 0:
            raise ConfigError(f"{self.key} is set but the data set has no labels; set it to null (a DiT needs labels)")
        if data.num_classes > self.num_classes:
            raise ConfigError(f"{self.key}={self.num_classes} is below the data set's {data.num_classes} classes")

    def forward(self, inputs: Inputs) -> Condition:
        labels = inputs.get("label")
        if labels is None:
            raise ValueError("this model is class-conditional: give labels to sample")
        labels = torch.as_tensor(labels).long()
        return Condition({"class_labels": labels}, F.one_hot(labels, self.num_classes).float())

    def without_condition(self, inputs: Inputs, which: Sequence[bool], negative_prompt: str = "") -> Inputs:
        raise ValueError("a class-conditional network has no unconditional input here (no guidance, no dropping)")

    def trainable_parameters(self) -> list[nn.Parameter]:
        return []

    def state(self) -> dict[str, Any]:
        return {"family": "class_labels", "num_classes": self.num_classes}


class PixelUNet(Family):
    name = "pixel_unet"
    denoiser_class = UNet2DModel
    conditionings = {
        "none": lambda state: NoCondition(),
        "class_labels": lambda state: ClassLabels(state["num_classes"]),
    }

    def new_conditioning(
        self, net: nn.Module, settings: ConditioningSettings, data: DataDescription
    ) -> NoCondition | ClassLabels:
        classes = net.config.num_class_embeds
        return ClassLabels(classes) if classes is not None else NoCondition()

    def write(self, parts: PipelineComponents, folder: Path) -> None:
        DDPMPipeline(unet=parts.net, scheduler=parts.scheduler).save_pretrained(folder, safe_serialization=True)


FAMILY = PixelUNet()
