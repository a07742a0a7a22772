"""DiT (`DiTTransformer2DModel`, Peebles & Xie 2023): a class-conditional transformer (always: `num_embeds_ada_norm`
classes), here on pixels. diffusers' DiTPipeline needs a VAE, so the export is the documented equivalent: each part
as a diffusers folder (`transformer/` + `scheduler/` + `lightdiff.json`, no `model_index.json`; `write_parts`), which
lightdiff's sample.py reads like any export."""

from __future__ import annotations

from pathlib import Path

from diffusers import DiTTransformer2DModel
from torch import nn

from lightdiff.nets.families.base import (
    ConditioningSettings,
    DataDescription,
    Family,
    PipelineComponents,
    TextEncoders,
)
from lightdiff.nets.families.labels import ClassLabels, NoCondition


def write_parts(parts: PipelineComponents, folder: Path) -> None:
    """No diffusers pipeline fits: each part as a diffusers / transformers folder (`from_pretrained` reads each)."""
    parts.net.save_pretrained(folder / "transformer", safe_serialization=True)
    parts.scheduler.save_pretrained(folder / "scheduler")
    if parts.vae is not None:
        parts.vae.save_pretrained(folder / "vae", safe_serialization=True)
    if isinstance(parts.conditioning, TextEncoders):
        for name, encoder in parts.conditioning.text_encoders().items():
            encoder.save_pretrained(folder / name, safe_serialization=True)
        parts.conditioning.tokenizer.save_pretrained(folder / "tokenizer")


class DiT(Family):
    name = "dit"
    denoiser_class = DiTTransformer2DModel

    def new_conditioning(
        self, net: nn.Module, settings: ConditioningSettings, data: DataDescription
    ) -> ClassLabels | NoCondition:
        classes = net.config.num_embeds_ada_norm
        return ClassLabels(classes, key="net.num_embeds_ada_norm") if classes is not None else NoCondition()

    def write(self, parts: PipelineComponents, folder: Path) -> None:
        write_parts(parts, folder)


FAMILY = DiT()
