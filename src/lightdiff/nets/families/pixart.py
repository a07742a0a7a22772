"""PixArt-alpha (`PixArtTransformer2DModel`; Chen et al. 2023, Section 2.3): a single-stream DiT whose blocks
cross-attend to the text states, with adaLN-single modulation. diffusers' PixArtAlphaPipeline expects a T5 encoder and
masked T5 states; lightdiff trains a CLIPTextModel (`CLIPText`, no resolution / aspect-ratio input), so the export is
the documented equivalent: `transformer/` + `scheduler/` + `vae/` + `text_encoder/` (CLIPTextModel) + `tokenizer/`
(CLIPTokenizer) + `lightdiff.json`, without `model_index.json` (`write_parts`); each part is a diffusers /
transformers folder (`from_pretrained`), and sample.py reads it back like any export.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from diffusers import PixArtTransformer2DModel
from torch import nn
from transformers import CLIPTextModel

from lightdiff.config import ConfigError
from lightdiff.nets.families.base import (
    ConditioningSettings,
    DataDescription,
    Family,
    PipelineComponents,
    check_captions,
    zero_adaln_gates,
    zero_adaln_single,
)
from lightdiff.nets.families.dit import write_parts
from lightdiff.nets.families.sd import CLIPText, read_clip_folder, read_clip_parts, scratch_clip_text
from lightdiff.nets.pretrained import check_parts_used, pipeline_parts

NO_SIZE_CONDITIONING = {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}


class PixArt(Family):
    name = "pixart"
    denoiser_class = PixArtTransformer2DModel
    takes_text = True

    def initialise(self, net: nn.Module) -> nn.Module:
        zero_adaln_single(zero_adaln_gates(net).adaln_single.linear, net.transformer_blocks)
        return net

    def check(self, net: nn.Module, vae: nn.Module | None, num_frames: int | None) -> None:
        width = net.config.num_attention_heads * net.config.attention_head_dim
        if net.config.caption_channels is not None and net.config.cross_attention_dim != width:
            raise ConfigError(
                f"net.cross_attention_dim={net.config.cross_attention_dim} must be the width num_attention_heads "
                f"x attention_head_dim={width}: the caption projection (net.caption_channels) maps the text to it"
            )
        if net.config.use_additional_conditions:
            raise ConfigError("net.use_additional_conditions=true: lightdiff has no resolution / aspect-ratio input")

    def _width_key(self, net: nn.Module) -> str:
        """The caption projection takes the states (PixArt's layout); without one, the cross-attention does."""
        return "net.caption_channels" if net.config.caption_channels is not None else "net.cross_attention_dim"

    def text_width(self, net: nn.Module) -> int:
        return int(net.config[self._width_key(net).removeprefix("net.")])

    def _clip_text(self, net: nn.Module, tokenizer: Any, encoder: CLIPTextModel, trainable: bool) -> CLIPText:
        # No resolution / aspect-ratio embedding (net.use_additional_conditions=false, checked by `check`).
        return CLIPText(tokenizer, encoder, trainable, NO_SIZE_CONDITIONING, self._width_key(net))

    def new_conditioning(self, net: nn.Module, settings: ConditioningSettings, data: DataDescription) -> CLIPText:
        check_captions(net, data)
        tokenizer, encoder = scratch_clip_text(settings, data, self.text_width(net))
        return self._clip_text(net, tokenizer, encoder, trainable=True)

    def pretrained_conditioning(
        self, pretrained: str, net: nn.Module, settings: ConditioningSettings, key: str
    ) -> CLIPText:
        check_parts_used(pretrained, pipeline_parts(pretrained, key), {"tokenizer", "text_encoder"}, net, key)
        tokenizer, encoder = read_clip_parts(pretrained, CLIPTextModel, key)
        return self._clip_text(net, tokenizer, encoder, settings.train_text_encoder)

    def read_folder(
        self, folder: Path, net: nn.Module, metadata: dict[str, Any], load_vae: Callable[[], nn.Module]
    ) -> tuple[nn.Module | None, nn.Module]:
        tokenizer, encoder = read_clip_folder(folder)
        return load_vae(), self._clip_text(net, tokenizer, encoder, trainable=False)

    def write(self, parts: PipelineComponents, folder: Path) -> None:
        write_parts(parts, folder)


FAMILY = PixArt()
