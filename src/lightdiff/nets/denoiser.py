"""How every diffusers denoiser is called and initialised.

All of diffusers' denoisers take the noisy input first and the timestep as `timestep=`; everything else is
conditioning, which a family object makes (`lightdiff.nets.conditioning`):

- `UNet2DModel(sample, timestep, class_labels)` and `DiTTransformer2DModel(hidden_states, timestep, class_labels)`:
  unconditional or class-conditional (a DiT always is: `num_embeds_ada_norm` classes);
- `UNet2DConditionModel(sample, timestep, encoder_hidden_states)`: cross-attention to the text states;
- `SD3Transformer2DModel(hidden_states, encoder_hidden_states, pooled_projections, timestep)`: joint attention of an
  image and a text stream (MMDiT, Esser et al. 2024, Section 4), plus the pooled text vector in the modulation;
- `PixArtTransformer2DModel(hidden_states, encoder_hidden_states, timestep, added_cond_kwargs)`: a single-stream DiT
  whose blocks cross-attend to the text states (PixArt-alpha, Chen et al. 2023, Section 2.3), adaLN-single modulation;
- `FluxTransformer2DModel(hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
  guidance)`: FLUX.1's double-stream (MMDiT) then single-stream blocks with rotary position embeddings of each token's
  (0, row, column) id. It takes latents packed into 2x2 patches, as a token sequence, and its timestep / 1000
  (`FluxPipeline`): `network_output` packs, makes the ids and unpacks, so every method sees (B, C, H, W) latents;
- `CogVideoXTransformer3DModel(hidden_states, encoder_hidden_states, timestep, image_rotary_emb)`: CogVideoX's
  expert transformer over a clip's latents (B, F, C, H, W) and T5 text states in one sequence (Yang et al. 2024,
  Section 2.2); CogVideoX 1.0-5B's 3-D rotary embeddings are made per call from the latents' shape;
- `UNetSpatioTemporalConditionModel(sample, timestep, encoder_hidden_states, added_time_ids)`: Stable Video
  Diffusion's UNet over (B, F, 2C, H, W): each frame's noisy latents with the conditioning frame's latent
  concatenated along the channels (the family gives that latent once; the call repeats it over the frames).
"""

from __future__ import annotations

import typing

import torch
from diffusers import (
    CogVideoXTransformer3DModel,
    DiTTransformer2DModel,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
    UNetSpatioTemporalConditionModel,
)

from lightdiff.nets.conditioning import Condition, tree_map

Denoiser = (
    UNet2DModel
    | UNet2DConditionModel
    | DiTTransformer2DModel
    | SD3Transformer2DModel
    | PixArtTransformer2DModel
    | FluxTransformer2DModel
    | CogVideoXTransformer3DModel
    | UNetSpatioTemporalConditionModel
)
VIDEO_DENOISERS = (CogVideoXTransformer3DModel, UNetSpatioTemporalConditionModel)  # denoisers of clips (B, F, C, H, W)
# The denoiser classes lightdiff builds by name (checkpoints, pipeline folders): a name read from a file is never
# imported, only looked up here.
DENOISER_CLASSES: dict[str, type] = {cls.__name__: cls for cls in typing.get_args(Denoiser)}
# diffusers' modulations that carry gates (FLUX's single-stream blocks: AdaLayerNormZeroSingle)
# CogVideoXLayerNormZero modulates the video and the text tokens in one linear layer, gates included (CogVideoX, 3.1)
ADALN_ZERO = ("AdaLayerNormZero", "SD35AdaLayerNormZeroX", "AdaLayerNormZeroSingle", "CogVideoXLayerNormZero")
PACKED_PATCH = 2  # FLUX packs 2x2 latent pixels into one token (FluxPipeline._pack_latents)
FLUX_TIMESTEP_SCALE = 1000  # FluxPipeline passes timestep / 1000; the transformer multiplies by 1000 again


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): each 2x2 patch one token, row-major (FluxPipeline._pack_latents)."""
    batch, channels, height, width = latents.shape
    patches = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack_latents` for latents of `height` x `width` (FluxPipeline._unpack_latents)."""
    batch, _, packed = tokens.shape
    patches = tokens.view(batch, height // 2, width // 2, packed // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(batch, packed // 4, height, width)


def latent_image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(H/2 * W/2, 3): each packed token's (0, row, column), the positions FLUX's rotary embedding encodes
    (FluxPipeline._prepare_latent_image_ids); text tokens all have (0, 0, 0)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(height // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def is_video_net(net: torch.nn.Module) -> bool:
    """Whether `net` denoises clips (B, F, C, H, W) rather than images."""
    return isinstance(net, VIDEO_DENOISERS)


def latent_channels(net: torch.nn.Module) -> int:
    """Channels of the latents (or pixels) the network denoises: a FLUX transformer's in_channels count the four
    latent pixels of a packed token, an SVD UNet's the conditioning frame's latent too."""
    channels = net.config.in_channels
    if isinstance(net, FluxTransformer2DModel):
        return channels // (PACKED_PATCH * PACKED_PATCH)
    return channels // 2 if isinstance(net, UNetSpatioTemporalConditionModel) else channels


def side_multiple_of_tokens(net: torch.nn.Module) -> int:
    """Latent pixels per image token along a side: FLUX's packed 2x2 patches, a DiT's patch size, a UNet's 1."""
    return PACKED_PATCH if isinstance(net, FluxTransformer2DModel) else int(net.config.get("patch_size") or 1)


def image_tokens(net: torch.nn.Module, height: int, width: int) -> int:
    """Image tokens of latents `height` x `width` (the sequence length resolution-dependent timestep shifts are
    computed from, FluxPipeline's `image_seq_len`)."""
    patch = side_multiple_of_tokens(net)
    return (height // patch) * (width // patch)


def network_output(
    net: torch.nn.Module,  # one of `Denoiser`
    x_t: torch.Tensor,  # (B, C, H, W) noisy input; a clip's (B, F, C, H, W)
    timesteps: torch.Tensor,  # (B,) or a scalar: the network's timestep (DDPM: 0..T-1; flow matching: t * 1000)
    condition: Condition,  # the family's keyword arguments for this batch
) -> torch.Tensor:
    """The network's prediction for x_t, shaped like x_t: the one place a denoiser is called.

    The timestep is expanded to one per sample, as the transformer pipelines pass it; a UNet expands a scalar the
    same way itself, so its output is the pipeline's to the bit."""
    if timesteps.ndim == 0:
        timesteps = timesteps.expand(x_t.shape[0])
    # Frozen text encoders may run in half precision (model.frozen_dtype): their outputs meet the network in its dtype.
    kwargs = tree_map(lambda tensor: tensor.to(x_t.dtype) if tensor.is_floating_point() else tensor, condition.kwargs)
    if isinstance(net, FluxTransformer2DModel):
        return _flux_output(net, x_t, timesteps, kwargs, condition.kwargs.get("guidance"))
    if isinstance(net, CogVideoXTransformer3DModel) and net.config.use_rotary_positional_embeddings:
        kwargs = {**kwargs, "image_rotary_emb": cogvideox_rotary_embedding(net, x_t)}
    if isinstance(net, UNetSpatioTemporalConditionModel):  # StableVideoDiffusionPipeline's channel concatenation
        image_latents = kwargs.pop("image_latents")[:, None].expand(-1, x_t.shape[1], -1, -1, -1)
        x_t = torch.cat([x_t, image_latents], dim=2)
    return net(x_t, timestep=timesteps, **kwargs).sample


def cogvideox_rotary_embedding(net: CogVideoXTransformer3DModel, x_t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(cos, sin) of CogVideoX 1.0's 3-D rotary position embedding for latents (B, F, C, H, W): the token grid
    resized into the transformer's trained grid (CogVideoXPipeline._prepare_rotary_positional_embeddings, 1.0 branch;
    CogVideoX 1.5's temporal patches are refused by `methods.diffusion.check_video_fits`)."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    patch = net.config.patch_size
    grid_height, grid_width = x_t.shape[-2] // patch, x_t.shape[-1] // patch
    crops = get_resize_crop_region_for_grid(
        (grid_height, grid_width), net.config.sample_width // patch, net.config.sample_height // patch
    )
    return get_3d_rotary_pos_embed(
        embed_dim=net.config.attention_head_dim,
        crops_coords=crops,
        grid_size=(grid_height, grid_width),
        temporal_size=x_t.shape[1],
        device=x_t.device,
    )


def _flux_output(
    net: FluxTransformer2DModel,
    x_t: torch.Tensor,
    timesteps: torch.Tensor,
    kwargs: dict[str, torch.Tensor],  # the condition in the latents' dtype
    guidance: torch.Tensor | None,  # (B,) the embedded guidance scale, float32 as FluxPipeline passes it
) -> torch.Tensor:
    """FluxPipeline's transformer call: packed latents, timestep / 1000 in the latents' dtype, guidance in float32,
    text ids zeros and image ids the latent grid; the output unpacked to (B, C, H, W)."""
    height, width = x_t.shape[-2:]
    if height % PACKED_PATCH or width % PACKED_PATCH:
        raise ValueError(f"FLUX packs 2x2 latent patches: latents of {height}x{width} have an odd side")
    states = kwargs["encoder_hidden_states"]
    output = net(
        pack_latents(x_t),
        encoder_hidden_states=states,
        pooled_projections=kwargs["pooled_projections"],
        timestep=timesteps.to(x_t.dtype) / FLUX_TIMESTEP_SCALE,
        img_ids=latent_image_ids(height, width, x_t.device, x_t.dtype),
        txt_ids=torch.zeros(states.shape[1], 3, device=x_t.device, dtype=states.dtype),
        guidance=guidance,
    ).sample
    return unpack_latents(output, height, width)


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
