"""The discriminator of adversarial diffusion distillation: a feature network plus small trainable heads.

ADD (Sauer et al. 2023, Section 3.2) puts heads on a frozen DINOv2 ViT; LADD (Sauer et al. 2024, Section 3.1) puts
them on the frozen teacher's own features at a re-noised input. Each head sees one feature map and gives a logit
per location; it is conditioned on the noise level (added to its hidden features) and on the condition, class
label or text embedding (the conditioning family's `Condition.summary`: a one-hot label, the pooled text embedding),
by projection (Miyato & Koyama 2018, "cGANs with projection discriminator", Equation 3).

Backbones (the `discriminator` config group):
- `UNetEncoderFeatures`: the teacher UNet's down-block and mid-block outputs (LADD); frozen, shared with the teacher
  (or DMD2's fake-score UNet's bottleneck, trained with the heads).
- `TransformerBlockFeatures`: image tokens after chosen blocks of a transformer teacher (SD3's MMDiT, FLUX's double-
  and single-stream blocks, DiT, PixArt) as maps (LADD's generative features of an MMDiT, Section 3.1); frozen (or
  DMD2's fake-score transformer's, trained with the heads).
- `ViTFeatures`: hidden states of a transformers vision transformer (DINOv2 for ADD) loaded with `from_pretrained`
  from a folder or hub id; frozen. Takes pixels in [-1, 1].
- `PatchFeatures`: PatchGAN-like strided convolutions trained from scratch (no frozen network at all).
`network_features` picks the one of the first two that reads a given denoiser.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_timestep_embedding
from torch import nn

from lightdiff.config import ConfigError
from lightdiff.nets.denoiser import network_output
from lightdiff.nets.families import Condition, family_of
from lightdiff.nets.lora import adapters_disabled


class _StopForward(Exception):
    """Raised by the mid-block hook: the UNet's decoder half is not needed for the features."""


def _call_until_stopped(
    net: nn.Module,
    x_t: torch.Tensor,
    timesteps: torch.Tensor,
    condition: Condition,
    hooks: list[torch.utils.hooks.RemovableHandle],  # the feature hooks, the last raising _StopForward
) -> None:
    """The network's call, cut short by a hook once the features are read; the hooks are removed whatever happens."""
    try:
        network_output(net, x_t, timesteps, condition)
    except _StopForward:
        pass
    finally:
        for hook in hooks:
            hook.remove()


class UNetEncoderFeatures(nn.Module):
    """Outputs of each down block and of the mid block of a diffusers UNet, at (x_t, t, condition): of the frozen
    teacher (LADD), or of a network that trains with the heads (`trainable`: DMD2's fake-score network, whose
    classifier reads its bottleneck alone, `mid_block_only`)."""

    noised_inputs = True  # it reads the network at re-noised inputs

    def __init__(self, unet: nn.Module, trainable: bool = False, mid_block_only: bool = False) -> None:
        super().__init__()
        self.unet = unet if trainable else unet.requires_grad_(False).eval()
        self.trainable = trainable
        self.mid_block_only = mid_block_only
        block_channels = list(unet.config.block_out_channels)
        # each down block, then the mid block (whose width is the last down block's)
        self.channels = [block_channels[-1]] if mid_block_only else [*block_channels, block_channels[-1]]

    def train(self, mode: bool = True) -> UNetEncoderFeatures:
        return super().train(mode and self.trainable)  # frozen: dropout and norms stay in inference mode

    def forward(self, x_t: torch.Tensor, timesteps: torch.Tensor, condition: Condition) -> list[torch.Tensor]:
        captured: list[torch.Tensor] = []

        def keep(module: nn.Module, args: object, output: object) -> None:
            captured.append(output[0] if isinstance(output, tuple) else output)

        def stop(module: nn.Module, args: object, output: object) -> None:
            captured.append(output[0] if isinstance(output, tuple) else output)
            raise _StopForward

        handles = [] if self.mid_block_only else [block.register_forward_hook(keep) for block in self.unet.down_blocks]
        handles.append(self.unet.mid_block.register_forward_hook(stop))
        # the teacher's own call, with all its conditioning; as the teacher where a LoRA student shares its network
        with adapters_disabled(self.unet) if not self.trainable else nullcontext():
            _call_until_stopped(self.unet, x_t, timesteps, condition, handles)
        return captured


class TransformerBlockFeatures(nn.Module):
    """Image tokens after up to `num_features` evenly spaced blocks of a frozen diffusers transformer at (x_t, t,
    condition), the last block always among them, reshaped to (B, width, h, w) maps on the token grid: LADD's
    discriminator reads the MMDiT teacher's tokens this way ("we reshape the token sequence to its spatial layout",
    Sauer et al. 2024, Section 3.1). Joint blocks (SD3, FLUX) return (text tokens, image tokens), CogVideoX's (video
    tokens, text tokens), others the tokens; the forward stops after the last block read. FLUX's single-stream blocks
    count after its double-stream ones. A clip's tokens, made by attention over all its frames, become one filmstrip
    map (B, width, F h, w), its latent frames one above the other, so each head judges the whole clip."""

    noised_inputs = True  # it reads the network at re-noised inputs

    def __init__(self, transformer: nn.Module, num_features: int = 4, trainable: bool = False) -> None:
        super().__init__()
        self.transformer = transformer if trainable else transformer.requires_grad_(False).eval()
        self.trainable = trainable
        family = family_of(transformer)
        blocks = family.blocks(transformer)
        count = min(num_features, len(blocks))
        # evenly spaced, ending at the last block: 4 of 12 -> blocks 3, 6, 9, 12 (1-based)
        self.blocks = [blocks[round((index + 1) * len(blocks) / count) - 1] for index in range(count)]
        width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
        self.channels = [width] * count
        self.token_patch = family.token_side(transformer)
        self.image_tokens_first = family.image_tokens_first  # CogVideoX's blocks return (video, text)

    def train(self, mode: bool = True) -> TransformerBlockFeatures:
        return super().train(mode and self.trainable)  # frozen: dropout and norms stay in inference mode

    def forward(self, x_t: torch.Tensor, timesteps: torch.Tensor, condition: Condition) -> list[torch.Tensor]:
        captured: list[torch.Tensor] = []
        height, width = x_t.shape[-2] // self.token_patch, x_t.shape[-1] // self.token_patch
        frames = x_t.shape[1] if x_t.ndim == 5 else 1  # a clip's latent frames (B, F, C, H, W)

        def keep(module: nn.Module, args: object, output: object) -> None:
            if isinstance(output, tuple):  # a joint block's (text, image) or CogVideoX's (video, text)
                tokens = output[0] if self.image_tokens_first else output[1]
            else:
                tokens = output
            captured.append(tokens.transpose(1, 2).reshape(len(tokens), -1, frames * height, width))
            if len(captured) == len(self.blocks):
                raise _StopForward

        handles = [block.register_forward_hook(keep) for block in self.blocks]
        # the teacher, where a LoRA student shares its network
        with adapters_disabled(self.transformer) if not self.trainable else nullcontext():
            _call_until_stopped(self.transformer, x_t, timesteps, condition, handles)
        return captured


def network_features(net: nn.Module, trainable: bool = False, deepest_only: bool = False) -> nn.Module:
    """A denoiser's own features at re-noised inputs: a UNet's down blocks and mid block, a transformer's tokens after
    4 evenly spaced blocks (LADD's teacher features; frozen). `deepest_only`, DMD2's classifier on its fake-score
    network (`trainable`): a UNet's bottleneck (the mid block), a transformer's middle and last blocks (it has no
    bottleneck: the two deepest of the evenly spaced reads)."""
    if hasattr(net, "down_blocks"):
        return UNetEncoderFeatures(net, trainable=trainable, mid_block_only=deepest_only)
    return TransformerBlockFeatures(net, num_features=2 if deepest_only else 4, trainable=trainable)


class ViTFeatures(nn.Module):
    """Hidden states of chosen layers of a frozen transformers ViT (e.g. DINOv2), as (B, D, h, w) maps."""

    trainable = False
    pixel_inputs = True  # a latent method decodes its samples before this backbone sees them

    def __init__(
        self,
        model: str,  # folder or hub id of a transformers vision model (e.g. facebook/dinov2-small)
        layers: Sequence[int] = (3, 6, 9, 12),  # hidden states given to the heads (0 is the patch embedding)
        image_size: int = 224,  # images are resized to this before the ViT
        mean: Sequence[float] = (0.485, 0.456, 0.406),  # the ViT's input normalisation (ImageNet for DINOv2)
        std: Sequence[float] = (0.229, 0.224, 0.225),
    ) -> None:
        super().__init__()
        from transformers import AutoModel

        try:
            # Never code from the folder or hub repo (a config.json `auto_map`): False also stops transformers asking
            # on a terminal, as it does when the argument is left out.
            self.vit = AutoModel.from_pretrained(model, trust_remote_code=False).requires_grad_(False).eval()
        except (OSError, ValueError) as error:
            raise ConfigError(
                f"discriminator.backbone.model={model!r} cannot be loaded ({error}); give a local folder of a "
                "transformers vision model (e.g. a saved facebook/dinov2-small) or a reachable hub id"
            ) from error
        depth = self.vit.config.num_hidden_layers
        if not all(0 <= layer <= depth for layer in layers):
            raise ConfigError(f"discriminator.backbone.layers={list(layers)} must lie in 0..{depth} for {model!r}")
        self.layers = list(layers)
        self.image_size = image_size
        self.channels = [self.vit.config.hidden_size] * len(self.layers)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> ViTFeatures:
        return super().train(False)

    def forward(self, images: torch.Tensor, timesteps: torch.Tensor, condition: Condition) -> list[torch.Tensor]:
        pixels = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        pixels = ((pixels + 1) / 2 - self.mean) / self.std
        hidden = self.vit(pixel_values=pixels, output_hidden_states=True).hidden_states
        maps = []
        for layer in self.layers:
            tokens = hidden[layer][:, 1:]  # without the class token
            side = int(tokens.shape[1] ** 0.5)
            tokens = tokens[:, -side * side :]  # without register tokens, if any
            maps.append(tokens.transpose(1, 2).reshape(len(images), -1, side, side))
        return maps


class PatchFeatures(nn.Module):
    """Strided convolutions trained from scratch; each stage's output goes to a head."""

    trainable = True

    def __init__(
        self,
        in_channels: int = 3,  # image (or latent) channels
        base_channels: int = 32,  # width of the first stage, doubled per stage
        num_stages: int = 2,  # stride-2 stages
    ) -> None:
        super().__init__()
        self.channels = [base_channels * 2**index for index in range(num_stages)]
        widths = [in_channels, *self.channels]
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c_in, c_out, 4, 2, 1), nn.GroupNorm(min(8, c_out), c_out), nn.LeakyReLU(0.2))
            for c_in, c_out in zip(widths[:-1], widths[1:])
        )

    def forward(self, images: torch.Tensor, timesteps: torch.Tensor, condition: Condition) -> list[torch.Tensor]:
        maps, x = [], images
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps


class ClipPatchFeatures(nn.Module):
    """`PatchFeatures` for clips (B, F, C, H, W), latent or pixel, trained from scratch: 3-D convolutions that halve
    height and width and keep the frames (kernel 3 in time, so each location sees its neighbour frames' motion).
    Each stage's map goes to the 2-D heads with its frames side by side, (B, C, H, F x W): every frame keeps its own
    logits, so one bad frame is not averaged away. A video teacher's ADD discriminator where its own features do not
    separate real from fake (experiments/video_shapes)."""

    trainable = True
    judges_clips = True

    def __init__(
        self,
        in_channels: int = 16,  # the clip's channels (a Wan or CogVideoX VAE's latents: 16)
        base_channels: int = 32,  # width of the first stage, doubled per stage
        num_stages: int = 2,  # stages halving height and width
    ) -> None:
        super().__init__()
        self.channels = [base_channels * 2**index for index in range(num_stages)]
        widths = [in_channels, *self.channels]
        pairs = list(zip(widths[:-1], widths[1:]))
        self.convolutions = nn.ModuleList(
            nn.Conv3d(c_in, c_out, kernel_size=(3, 4, 4), stride=(1, 2, 2), padding=1) for c_in, c_out in pairs
        )
        # normalised frame by frame: one frame's statistics must not move another's logits
        self.norms = nn.ModuleList(nn.GroupNorm(min(8, c_out), c_out) for _, c_out in pairs)

    def forward(self, clips: torch.Tensor, timesteps: torch.Tensor, condition: Condition) -> list[torch.Tensor]:
        if clips.ndim != 5:
            raise ValueError(
                f"ClipPatchFeatures judges clips (B, F, C, H, W), not a tensor shaped {tuple(clips.shape)}"
            )
        maps, x = [], clips
        for convolution, norm in zip(self.convolutions, self.norms):
            x = convolution(x.transpose(1, 2)).transpose(1, 2)  # Conv3d takes (B, C, F, H, W)
            x = F.leaky_relu(norm(x.flatten(0, 1)).unflatten(0, x.shape[:2]), 0.2)
            maps.append(x.permute(0, 2, 3, 1, 4).flatten(3))  # (B, C, H, F x W): the frames side by side
        return maps


class DiscriminatorHead(nn.Module):
    """One feature map -> a logit per location, shifted by the noise level and projected onto the condition."""

    def __init__(self, in_channels: int, channels: int, condition_dim: int) -> None:
        super().__init__()
        self.inp = nn.Sequential(nn.Conv2d(in_channels, channels, 1), nn.GroupNorm(min(8, channels), channels))
        self.body = nn.Sequential(nn.LeakyReLU(0.2), nn.Conv2d(channels, channels, 3, padding=1), nn.LeakyReLU(0.2))
        self.noise_shift = nn.Linear(channels, channels)
        self.out = nn.Conv2d(channels, 1, 1)
        self.condition = nn.Linear(condition_dim, channels, bias=False) if condition_dim else None

    def forward(self, features: torch.Tensor, noise: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
        hidden = self.inp(features.float()) + self.noise_shift(noise)[:, :, None, None]
        hidden = self.body(hidden)
        logits = self.out(hidden).flatten(1)  # (B, h w)
        if self.condition is not None and condition is not None:  # projection: + <phi(x), W c> per location
            logits = logits + (hidden * self.condition(condition)[:, :, None, None]).sum(dim=1).flatten(1)
        return logits


class FeatureDiscriminator(nn.Module):
    """`backbone` features -> trainable heads -> logits (B, locations of all heads)."""

    def __init__(
        self,
        backbone: nn.Module | None,  # UNetEncoderFeatures | ViTFeatures | PatchFeatures (None: the method gives one)
        condition_dim: int = 0,  # width of the condition's summary vector (0: an unconditional discriminator)
        head_channels: int = 64,  # width of each head
        num_train_timesteps: int = 1000,  # scale of the noise-level input
    ) -> None:
        super().__init__()
        if backbone is None:
            raise ConfigError(
                "discriminator.backbone is null and no backbone was given (model=turbo gives the teacher's)"
            )
        self.backbone = backbone
        self.head_channels = head_channels
        self.num_train_timesteps = num_train_timesteps
        self.condition_projection = nn.Linear(condition_dim, head_channels) if condition_dim else None
        heads_condition = head_channels if condition_dim else 0
        self.heads = nn.ModuleList(DiscriminatorHead(c, head_channels, heads_condition) for c in backbone.channels)

    @property
    def backbone_trains(self) -> bool:
        return bool(getattr(self.backbone, "trainable", False))

    def head_parameters(self) -> list[nn.Parameter]:
        """What the discriminator's optimiser trains: the heads and the projection, and the backbone if it trains."""
        frozen = set() if self.backbone_trains else {id(p) for p in self.backbone.parameters()}
        return [p for p in self.parameters() if id(p) not in frozen]

    def features(self, inputs: torch.Tensor, timesteps: torch.Tensor, condition: Condition) -> list[torch.Tensor]:
        return self.backbone(inputs, timesteps, condition)

    def heads_logits(
        self, features: Sequence[torch.Tensor], timesteps: torch.Tensor, condition: Condition
    ) -> torch.Tensor:
        noise = get_timestep_embedding(timesteps.float().reshape(-1), self.head_channels)
        projected = None
        if self.condition_projection is not None and condition.summary is not None:
            projected = self.condition_projection(condition.summary.float())
        return torch.cat([head(f, noise.to(f.device), projected) for head, f in zip(self.heads, features)], dim=1)

    def forward(self, inputs: torch.Tensor, timesteps: torch.Tensor, condition: Condition) -> torch.Tensor:
        return self.heads_logits(self.features(inputs, timesteps, condition), timesteps, condition)
