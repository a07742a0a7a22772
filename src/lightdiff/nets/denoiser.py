"""The one place that knows how each diffusers denoiser family is called, conditioned and initialised.

lightdiff's methods speak (x_t, timestep, condition); each family takes them under its own names:

- `UNet2DModel(sample, timestep, class_labels)` and `DiTTransformer2DModel(hidden_states, timestep, class_labels)`:
  unconditional or class-conditional (a DiT always is: `num_embeds_ada_norm` classes);
- `UNet2DConditionModel(sample, timestep, encoder_hidden_states)`: cross-attention to the text states;
- `SD3Transformer2DModel(hidden_states, encoder_hidden_states, pooled_projections, timestep)`: joint attention of an
  image and a text stream (MMDiT, Esser et al. 2024, Section 4), plus the pooled text vector in the modulation;
- `PixArtTransformer2DModel(hidden_states, encoder_hidden_states, timestep, added_cond_kwargs)`: a single-stream DiT
  whose blocks cross-attend to the text states (PixArt-alpha, Chen et al. 2023, Section 2.3), adaLN-single modulation.

Text states are made as the family's diffusers pipeline makes them (`encode_text`), so an exported pipeline
reproduces lightdiff's samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import (
    DiTTransformer2DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from lightdiff.nets.text import tokenize_prompts

Denoiser = UNet2DModel | UNet2DConditionModel | DiTTransformer2DModel | SD3Transformer2DModel | PixArtTransformer2DModel
# backbones whose timestep must be one per sample
TRANSFORMERS = (DiTTransformer2DModel, SD3Transformer2DModel, PixArtTransformer2DModel)
ADALN_ZERO = ("AdaLayerNormZero", "SD35AdaLayerNormZeroX")  # diffusers' modulations that carry gates


@dataclass
class TextCondition:
    states: torch.Tensor  # (B, tokens, width): cross-attention keys (UNet, PixArt) or the text stream's input (MMDiT)
    pooled: torch.Tensor | None = None  # (B, width): the pooled prompt vector of an SD3 transformer, else None


def num_classes(net: torch.nn.Module) -> int | None:
    """How many class labels the network embeds (None: it takes no labels)."""
    if isinstance(net, UNet2DModel):
        return net.config.num_class_embeds
    if isinstance(net, DiTTransformer2DModel):
        return net.config.num_embeds_ada_norm
    return None


def takes_text(net: torch.nn.Module) -> bool:
    return isinstance(net, (UNet2DConditionModel, SD3Transformer2DModel, PixArtTransformer2DModel))


def takes_pooled_text(net: torch.nn.Module) -> bool:
    return isinstance(net, SD3Transformer2DModel)


def denoiser_output(
    net: torch.nn.Module,  # one of `Denoiser`
    x_t: torch.Tensor,  # (B, C, H, W) noisy input
    timesteps: torch.Tensor,  # (B,) or a scalar: the network's timestep (DDPM: 0..T-1; flow matching: t * 1000)
    class_labels: torch.Tensor | None = None,  # (B,) for class-conditional networks
    text: TextCondition | None = None,  # for text-conditioned networks
) -> torch.Tensor:
    """The network's prediction for x_t, shaped like x_t."""
    if isinstance(net, TRANSFORMERS) and timesteps.ndim == 0:
        timesteps = timesteps.expand(x_t.shape[0])  # as the DiT / SD3 pipelines pass it
    if isinstance(net, UNet2DModel):
        return net(x_t, timesteps, class_labels=class_labels).sample
    if isinstance(net, DiTTransformer2DModel):
        return net(x_t, timestep=timesteps, class_labels=class_labels).sample
    if text is None:
        raise ValueError(f"{type(net).__name__} is text-conditioned: it needs text states")
    if isinstance(net, UNet2DConditionModel):
        return net(x_t, timesteps, encoder_hidden_states=text.states).sample
    if isinstance(net, SD3Transformer2DModel):
        return net(
            hidden_states=x_t, encoder_hidden_states=text.states, pooled_projections=text.pooled, timestep=timesteps
        ).sample
    if isinstance(net, PixArtTransformer2DModel):
        # No resolution / aspect-ratio embedding (net.use_additional_conditions=false); no attention mask: every token
        # of the padded prompt is attended to, as a UNet's cross-attention does.
        no_sizes = {"resolution": None, "aspect_ratio": None}
        return net(x_t, encoder_hidden_states=text.states, timestep=timesteps, added_cond_kwargs=no_sizes).sample
    raise TypeError(f"lightdiff does not know how to call {type(net).__name__}")


def encode_text(
    net: torch.nn.Module,
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextModel | CLIPTextModelWithProjection,
    prompts: Sequence[str],
) -> TextCondition:
    """Text states for `net`, as its diffusers pipeline computes them from the same prompts.

    UNet (StableDiffusionPipeline.encode_prompt) and PixArt: the encoder's last hidden states, padded to the
    tokenizer's length, no mask (PixArtAlphaPipeline's T5 states come with one; lightdiff's CLIP ones do not).
    SD3 (StableDiffusion3Pipeline.encode_prompt with `text_encoder_2` = `text_encoder`, no T5, `max_sequence_length=0`):
    the penultimate hidden states of the two CLIP encoders concatenated along the width and zero-padded to
    `joint_attention_dim`; the pooled vector is their two projected end-of-text embeddings (`text_embeds`) side by
    side. lightdiff trains one text encoder and exports it twice (see `lightdiff.export`).
    """
    ids = tokenize_prompts(tokenizer, prompts).to(text_encoder.device)
    if not isinstance(net, SD3Transformer2DModel):
        return TextCondition(states=text_encoder(ids)[0])
    output = text_encoder(ids, output_hidden_states=True)
    hidden = output.hidden_states[-2]
    states = torch.cat([hidden, hidden], dim=-1)
    states = F.pad(states, (0, net.config.joint_attention_dim - states.shape[-1]))
    return TextCondition(states=states, pooled=torch.cat([output[0], output[0]], dim=-1))


def text_widths(
    net: torch.nn.Module, text_hidden_size: int, text_projection_size: int
) -> list[tuple[str, int, int, str]]:
    """(key, the network's width, what a text encoder of these sizes gives, that width's name) per text input."""
    if isinstance(net, UNet2DConditionModel) or (
        isinstance(net, PixArtTransformer2DModel) and net.config.caption_channels is None
    ):
        width = text_hidden_size
        return [("net.cross_attention_dim", net.config.cross_attention_dim, width, f"hidden_size={width}")]
    if isinstance(net, PixArtTransformer2DModel):  # the caption projection takes the states (PixArt's layout)
        width = text_hidden_size
        return [("net.caption_channels", net.config.caption_channels, width, f"hidden_size={width}")]
    if isinstance(net, SD3Transformer2DModel):
        # The states are padded up to joint_attention_dim, so it needs to be at least 2 x the width (checked apart).
        width = 2 * text_projection_size
        name = f"2 x projection_dim={width}"
        return [("net.pooled_projection_dim", net.config.pooled_projection_dim, width, name)]
    return []


def zero_adaln_gates(net: torch.nn.Module) -> torch.nn.Module:
    """Zero-initialise every adaLN-Zero modulation of a transformer (Peebles & Xie 2023, "DiT", Section 3.2:
    "zero-initializing the final linear layer in each block's adaLN modulation ... initializes the full DiT block
    as the identity function"); a no-op for UNets.

    diffusers' `AdaLayerNormZero.linear` keeps nn.Linear's random init (it expects pretrained weights), so a
    transformer trained from scratch would start with random gates. Zeroed, each block's output equals its input
    streams, and the model first learns to draw, then how far each layer (and, in an MMDiT, the text) should steer.
    A PixArt transformer's adaLN-single modulation and ungated cross-attention are zeroed too (`_zero_pixart_blocks`).
    """
    with torch.no_grad():
        for module in net.modules():
            if type(module).__name__ in ADALN_ZERO:
                module.linear.weight.zero_()
                if module.linear.bias is not None:
                    module.linear.bias.zero_()
        if isinstance(net, PixArtTransformer2DModel):
            _zero_pixart_blocks(net)
    return net


def _zero_pixart_blocks(net: PixArtTransformer2DModel) -> None:
    """PixArt's blocks start as the identity too, which takes two zeroings (PixArt-alpha, Chen et al. 2023, 2.3).

    adaLN-single: block i's six modulation vectors (shift, scale, gate of the self-attention and of the MLP) are its
    own `scale_shift_table` plus one projection of the timestep embedding shared by all blocks (`adaln_single.linear`);
    diffusers initialises both randomly. Zeroing both zeroes every block's modulation for every timestep, as DiT's
    adaLN-Zero zeroes its per-block regression (Section 3.2): gates 0, and LayerNorm without shift or scale. PixArt's
    own code keeps the tables random because it starts from DiT's weights; lightdiff trains from scratch.
    The cross-attention to the text has no gate, so its output projection is zeroed, as PixArt-alpha does ("we
    initialize the output projection layer in the cross-attention layer to zero"); a block's output then equals its
    input. The text path learns from the second step on: the zero projection passes no gradient back at the first.
    """
    net.adaln_single.linear.weight.zero_()
    net.adaln_single.linear.bias.zero_()
    for block in net.transformer_blocks:
        block.scale_shift_table.zero_()
        output = block.attn2.to_out[0]
        output.weight.zero_()
        if output.bias is not None:
            output.bias.zero_()
