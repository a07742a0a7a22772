"""Model families: one module per kind of denoiser, holding everything lightdiff knows about it (`base.Family`), and
the registry callers ask (`family_of(net)`) instead of testing a network's class.

Adding a family: one module here (its `Family` subclass and conditioning), one line in `FAMILIES` below, one
`conf/net` preset and one test file (CONTRIBUTING.md, "Add a model family").
"""

from __future__ import annotations

import torch

from lightdiff.config import ConfigError
from lightdiff.nets.families import (
    cogvideox,
    dit,
    flux,
    flux2,
    labels,
    pixart,
    qwenimage,
    sd,
    sd3,
    sdxl,
    svd,
    wan,
    zimage,
)
from lightdiff.nets.families.base import (
    SIZE_AND_CROP,
    Condition,
    Conditioning,
    ConditioningSettings,
    Denoiser,
    Family,
    FirstFrameSettings,
    Inputs,
    conditioning_from_state,
    denoiser_classes,
    drop_conditions,
    family_of,
    register_conditioning,
    register_family,
    size_and_crop,
)
from lightdiff.nets.pretrained import load_component, pipeline_parts

FAMILIES: tuple[Family, ...] = (
    labels.FAMILY,
    dit.FAMILY,
    sd.FAMILY,
    sdxl.FAMILY,
    sd3.FAMILY,
    flux.FAMILY,
    flux2.FAMILY,
    qwenimage.FAMILY,
    zimage.FAMILY,
    pixart.FAMILY,
    cogvideox.FAMILY,
    svd.FAMILY,
    wan.FAMILY,
    wan.I2V_FAMILY,
)
for _family in FAMILIES:
    register_family(_family)

__all__ = [
    "FAMILIES",
    "SIZE_AND_CROP",
    "Condition",
    "Conditioning",
    "ConditioningSettings",
    "Denoiser",
    "Family",
    "FirstFrameSettings",
    "Inputs",
    "conditioning_from_state",
    "denoiser_classes",
    "denoiser_skeleton",
    "drop_conditions",
    "family_of",
    "load_denoiser",
    "register_conditioning",
    "register_family",
    "size_and_crop",
]


def _denoiser_part(pretrained: str, key: str) -> tuple[str, type[torch.nn.Module]]:
    """The pipeline's denoiser part (`unet` or `transformer`) and its class, one a registered family drives."""
    parts = pipeline_parts(pretrained, key)
    part = "unet" if "unet" in parts else "transformer"
    class_name = (parts.get(part) or [None, None])[1]
    classes = denoiser_classes()
    if class_name not in classes:
        raise ConfigError(f"{key}={pretrained!r}: its {part} is {class_name!r}, not one of {sorted(classes)}")
    return part, classes[class_name]


def load_denoiser(pretrained: str, key: str = "model.pretrained") -> Denoiser:
    """The pipeline's denoiser (`unet/` or `transformer/`), of a class lightdiff knows; a Wan 2.2 A14B pipeline's
    two experts (`transformer/` and `transformer_2/`) as one `WanExperts`."""
    part, cls = _denoiser_part(pretrained, key)
    if "transformer_2" in pipeline_parts(pretrained, key):
        if cls is not wan.WanExperts.expert_class:
            raise ConfigError(f"{key}={pretrained!r} has a transformer_2 beside a {cls.__name__}: only Wan pairs them")
        return wan.WanExperts.from_pipeline(pretrained, key)
    return load_component(cls, pretrained, part, key)


def denoiser_skeleton(pretrained: str, key: str = "model.pretrained") -> Denoiser:
    """The pipeline's denoiser built from its config alone, on the meta device (no weights read): what decides its
    family, for tools that need the family and not the network (the shard writer's `--text-encoder`)."""
    part, cls = _denoiser_part(pretrained, key)
    try:
        config = cls.load_config(pretrained, subfolder=part)
    except (OSError, ValueError) as error:
        raise ConfigError(f"{key}={pretrained!r} has no usable {part}/config.json: {error}") from error
    with torch.device("meta"):
        return cls.from_config(config)
