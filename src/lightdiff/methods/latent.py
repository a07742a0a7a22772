"""Latent diffusion (Rombach et al. 2022): a DDPM on the latents of a frozen `AutoencoderKL`, conditioned on CLIP
text-encoder hidden states through the cross-attention of a `UNet2DConditionModel`, with classifier-free guidance
(Ho & Salimans 2022): captions are dropped to the empty prompt with probability `cond_drop_prob` while training.

The denoiser may also be an MMDiT (`net=mmdit`: diffusers' SD3Transformer2DModel, joint attention over an image
and a text stream, Esser et al. 2024) or a single-stream DiT that cross-attends to the text (`net=dit`: diffusers'
PixArtTransformer2DModel, Chen et al. 2023), and the objective rectified flow (`objective=flow_matching`); text
states are then made as the family's pipeline makes them (`lightdiff.nets.denoiser.encode_text`).

Text side, two ways: `pretrained=ID_OR_DIR` loads the tokenizer and text encoder of a diffusers pipeline (frozen
unless `train_text_encoder`); without it, a tokenizer is built from the data set's captions and a small
`CLIPTextModel` is trained from scratch with the UNet.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from diffusers import AutoencoderKL, PixArtTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from lightdiff.config import ConfigError
from lightdiff.data import ImageDataModule
from lightdiff.data.latent_cache import text_encoder_fingerprint
from lightdiff.diffusion import (
    DDPM,
    LossWeighting,
    NoiseSchedule,
    Objective,
    PredictionType,
    check_objective,
    noisy_batch,
    offset_noise,
    weighted_mse,
)
from lightdiff.methods.checkpoint_checks import check_checkpoint_fits
from lightdiff.methods.optimization import adamw_with_warmup, clip_and_measure_gradients
from lightdiff.methods.pixel import check_flow_settings, check_same_objective
from lightdiff.methods.preview import Preview
from lightdiff.nets.denoiser import (
    TextCondition,
    denoiser_output,
    encode_text,
    takes_pooled_text,
    takes_text,
    text_widths,
    zero_adaln_gates,
)
from lightdiff.nets.text import build_caption_tokenizer, text_encoder_from_scratch
from lightdiff.sampling import SchedulerFactory, denoise, for_latents, generators_for, make_scheduler
from lightdiff.speed import prepare_for_training

CHECKPOINT_FORMAT = 1


def vae_scale_factor(vae: AutoencoderKL) -> int:
    """Pixels per latent along each side: 2 ** (number of down-sampling levels), as diffusers' pipelines compute it."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


class LatentDiffusion(pl.LightningModule):
    """Denoises VAE latents with a text-conditioned UNet; the VAE is frozen, the text encoder optionally so."""

    def __init__(
        self,
        net: UNet2DConditionModel | SD3Transformer2DModel | PixArtTransformer2DModel,  # the denoiser, text-conditioned
        schedule: NoiseSchedule,  # the forward process of objective=ddpm (the `schedule` group)
        vae: str | None,  # AutoencoderKL folder or hub id, frozen; None: the VAE of `pretrained`
        objective: Objective = DDPM(),  # noqa: B008  ddpm | flow_matching (the `objective` group; frozen dataclass)
        pretrained: str | None = None,  # pipeline folder or hub id: its tokenizer and text encoder (and VAE) are used
        load_pretrained_unet: bool = False,  # with `pretrained`: start from its UNet instead of `net`
        train_text_encoder: bool = False,  # unfreeze a pretrained text encoder (one from scratch always trains)
        text_hidden_size: int = 64,  # width of a from-scratch text encoder (= net.cross_attention_dim)
        text_layers: int = 2,  # layers of a from-scratch text encoder
        text_heads: int = 4,  # attention heads of a from-scratch text encoder
        max_prompt_tokens: int = 16,  # a from-scratch tokenizer's length limit (start and end tokens included)
        cond_drop_prob: float = 0.1,  # probability of training on the empty prompt (classifier-free guidance)
        prediction_type: PredictionType = "epsilon",  # epsilon | v_prediction | sample
        loss_weighting: LossWeighting = "none",  # none | min_snr
        min_snr_gamma: float = 5.0,  # gamma of min-SNR weighting
        offset_noise: float = 0.0,  # per-channel offset noise on the latents
        lr: float = 1e-4,  # peak AdamW learning rate
        adam_betas: tuple[float, float] = (0.9, 0.999),  # AdamW (beta1, beta2)
        weight_decay: float = 0.0,  # AdamW decoupled weight decay
        lr_schedule: Literal["constant", "cosine"] = "constant",  # after warm-up
        warmup_steps: int = 0,  # linear warm-up steps
        max_grad_norm: float | None = 1.0,  # gradient clipping (global L2 norm); None: off
        guidance_scale: float = 4.0,  # guidance of the training-time previews
        compile: bool = False,  # torch.compile the denoiser (regional where diffusers defines repeated blocks)
        channels_last: bool = False,  # NHWC weights: faster convolutions on GPU (the yaml turns it on with CUDA)
        gradient_checkpointing: bool = False,  # recompute activations in backward: less memory, more time
        fused_adamw: bool = False,  # one fused AdamW kernel for all parameters (the yaml turns it on with CUDA)
    ) -> None:
        super().__init__()
        check_objective(prediction_type, loss_weighting, min_snr_gamma)
        check_flow_settings(objective, prediction_type, loss_weighting)
        if not 0 <= cond_drop_prob < 1:
            raise ConfigError(f"model.cond_drop_prob={cond_drop_prob} must lie in [0, 1)")
        if not takes_text(net):
            raise ConfigError(
                f"net: {type(net).__name__} takes no text; model=latent needs a text-conditioned net (net=latent, "
                "net=mmdit, net=dit)"
            )
        if pretrained is not None and load_pretrained_unet:
            net = UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet")
        else:
            net = zero_adaln_gates(net)  # a transformer's blocks start as the identity (DiT's adaLN-Zero)
        self.net = net
        self.schedule = schedule
        self.objective = objective
        self.vae = _load_vae(pretrained, vae).requires_grad_(False).eval()
        self.tokenizer: CLIPTokenizer | None = None
        self.text_encoder: CLIPTextModel | CLIPTextModelWithProjection | None = None
        self.train_text_encoder = train_text_encoder
        if pretrained is not None:
            self.tokenizer = _load_component(CLIPTokenizer, pretrained, "tokenizer")
            # An SD3 transformer takes the pooled, projected prompt (`text_embeds`), which only this class has.
            text_class = CLIPTextModelWithProjection if takes_pooled_text(net) else CLIPTextModel
            self.text_encoder = _load_component(text_class, pretrained, "text_encoder")
            self.text_encoder.requires_grad_(train_text_encoder)
        self.text_hidden_size, self.text_layers, self.text_heads = text_hidden_size, text_layers, text_heads
        self.max_prompt_tokens = max_prompt_tokens
        self.cond_drop_prob = cond_drop_prob
        self.prediction_type = prediction_type
        self.loss_weighting = loss_weighting
        self.min_snr_gamma = min_snr_gamma
        self.offset_noise = offset_noise
        self.lr, self.adam_betas, self.weight_decay = lr, tuple(adam_betas), weight_decay
        self.lr_schedule, self.warmup_steps, self.max_grad_norm = lr_schedule, warmup_steps, max_grad_norm
        self.guidance_scale = guidance_scale
        self.compile_net = compile  # not `self.compile`: that is nn.Module's method
        self.channels_last = channels_last
        self.gradient_checkpointing = gradient_checkpointing
        self.fused_adamw = fused_adamw
        self.class_names: list[str] | None = None
        self.register_buffer("alphas_cumprod", schedule.alphas_cumprod().float(), persistent=False)

    # ----- set-up -----------------------------------------------------------------------------------------------

    def attach_data(self, datamodule: ImageDataModule) -> None:
        """Build the text side from the captions if none was loaded, then check that all networks fit together."""
        captions = datamodule.captions()
        if not captions:
            raise ConfigError("model=latent needs captions, and the data set has none (data.caption_column?)")
        if self.text_encoder is None:
            self.tokenizer = build_caption_tokenizer(captions, model_max_length=self.max_prompt_tokens)
            self.text_encoder = text_encoder_from_scratch(
                self.tokenizer,
                self.text_hidden_size,
                self.text_layers,
                self.text_heads,
                2 * self.text_hidden_size,
                with_projection=takes_pooled_text(self.net),
            )
            self.train_text_encoder = True
        check_components(self.net, self.vae, self.text_encoder, datamodule.resolution)
        self.class_names = datamodule.class_names
        # A text encoder that learns cannot be cached; nor are an SD3 transformer's two text inputs (states, pooled).
        if datamodule.cache_latents and (self.train_text_encoder or takes_pooled_text(self.net)):
            datamodule.use_latent_cache(self.vae)
        elif datamodule.cache_latents:
            assert self.tokenizer is not None
            datamodule.use_latent_cache(
                self.vae, text_encoder_fingerprint(self.tokenizer, self.text_encoder), self.encode_prompts
            )

    # ----- training ---------------------------------------------------------------------------------------------

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """The text states (B, tokens, width) of `prompts` alone: what the latent cache stores, for the nets whose
        whole text input they are (not an SD3 transformer's, which also takes a pooled vector)."""
        return self.encode_condition(prompts).states

    def encode_condition(self, prompts: Sequence[str]) -> TextCondition:
        """The net's text input for `prompts`, as its diffusers pipeline makes it (states, and SD3's pooled vector)."""
        assert self.tokenizer is not None and self.text_encoder is not None, "attach_data builds the text side"
        return encode_text(self.net, self.tokenizer, self.text_encoder, prompts)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        with torch.no_grad():
            if "latent_moments" in batch:  # data.cache_latents: q(z | x) was encoded once; draw a fresh z from it
                posterior = DiagonalGaussianDistribution(batch["latent_moments"])
            else:
                posterior = self.vae.encode(batch["pixel_values"]).latent_dist
            latents = posterior.sample() * self.vae.config.scaling_factor
        captions = drop_captions(batch["text"], self.cond_drop_prob)
        if "text_states" in batch:  # data.cache_latents with a frozen text encoder: states were encoded once
            empty = self.encode_prompts([""])  # what the frozen encoder gives a dropped caption
            dropped = torch.tensor([caption == "" for caption in captions], device=empty.device)
            text = TextCondition(torch.where(dropped[:, None, None], empty, batch["text_states"].to(empty.dtype)))
        else:
            text = self.encode_condition(captions)
        noise = offset_noise(torch.randn_like(latents), self.offset_noise)
        example = noisy_batch(
            self.objective,
            latents,
            noise,
            self.alphas_cumprod,
            self.prediction_type,
            self.loss_weighting,
            self.min_snr_gamma,
        )
        prediction = denoiser_output(self.net, example.x_t, example.timesteps, text=text)
        loss = weighted_mse(prediction, example.target, example.weight)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)  # the global batch's mean under DDP
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        self.log("train/cond_dropped", sum(c == "" for c in captions) / len(captions))
        return loss

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        parameters = list(self.net.parameters())
        if self.train_text_encoder and self.text_encoder is not None:
            parameters += list(self.text_encoder.parameters())
        return parameters

    def configure_model(self) -> None:
        # Lightning calls this once the trainer exists and before the module reaches its device.
        prepare_for_training(self.net, self.compile_net, self.channels_last, self.gradient_checkpointing)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        norm = clip_and_measure_gradients(self, self.trainable_parameters(), self.max_grad_norm)
        if norm is not None:
            self.log("train/grad_norm", norm)  # before clipping

    def configure_optimizers(self) -> dict[str, Any]:
        return adamw_with_warmup(
            self.trainable_parameters(),
            self.lr,
            self.adam_betas,
            self.weight_decay,
            self.lr_schedule,
            self.warmup_steps,
            self.trainer.max_steps,
            fused=self.fused_adamw,
        )

    # ----- sampling ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        sampler: SchedulerFactory,
        steps: int,
        guidance_scale: float = 4.0,
        negative_prompt: str | Sequence[str] = "",
        eta: float = 0.0,
    ) -> torch.Tensor:
        """Images in [0, 1], (B, 3, H, W): StableDiffusionPipeline's loop, step for step."""
        scheduler = for_latents(make_scheduler(sampler, self.schedule, self.prediction_type, self.objective))
        return generate_latent(
            self.net,
            self.vae,
            self.tokenizer,
            self.text_encoder,
            scheduler,
            prompts,
            seeds,
            steps,
            guidance_scale,
            negative_prompt,
            eta,
        )

    def preview(self, seeds: Sequence[int], sampler: SchedulerFactory, steps: int) -> Preview:
        """Samples for the grid: prompts are the shapes captions (class seed % 24) or the data set's captions."""
        labels = None
        if self.class_names:
            labels = torch.tensor(list(seeds)) % len(self.class_names)
            prompts = [self.class_names[int(label)] for label in labels]
        else:
            captions = self.trainer.datamodule.captions()
            prompts = [captions[int(seed) % len(captions)] for seed in seeds]
        images = self.generate(prompts, seeds, sampler, steps, guidance_scale=self.guidance_scale)
        return Preview(images=images, labels=labels)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_same_objective(self.objective, checkpoint)
        check_checkpoint_fits(self, checkpoint)  # a checkpoint of another net config: name the keys, not a torch error

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        assert self.tokenizer is not None and self.text_encoder is not None
        checkpoint["lightdiff"] = {
            "format": CHECKPOINT_FORMAT,
            "method": "latent",
            "net_class": type(self.net).__name__,
            "net_config": plain_config(self.net.config),
            "vae_config": plain_config(self.vae.config),
            "text_encoder_class": type(self.text_encoder).__name__,  # absent in older checkpoints: CLIPTextModel
            "text_encoder_config": self.text_encoder.config.to_dict(),
            "tokenizer": tokenizer_state(self.tokenizer),
            "schedule": dict(vars(self.schedule)),
            "prediction_type": self.prediction_type,
            "objective": self.objective.state(),  # absent in older checkpoints: ddpm
            "class_names": self.class_names,
        }


def drop_captions(captions: Sequence[str], probability: float) -> list[str]:
    """Each caption replaced by "" with `probability`: one network then learns p(x | text) and p(x | ""), which
    classifier-free guidance combines (Ho & Salimans 2022, Section 3.2). Python's RNG, seeded by seed_everything."""
    return ["" if random.random() < probability else str(text) for text in captions]


def tokenizer_state(tokenizer: CLIPTokenizer) -> dict[str, Any]:
    """A CLIP tokenizer as plain data (vocabulary, merges, length limit) for a weights-only checkpoint."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [m.split(" ") if isinstance(m, str) else list(m) for m in model["merges"]]
    return {"vocab": dict(model["vocab"]), "merges": merges, "model_max_length": tokenizer.model_max_length}


def tokenizer_from_state(state: dict[str, Any]) -> CLIPTokenizer:
    merges = [tuple(pair) for pair in state["merges"]]
    return CLIPTokenizer(vocab=state["vocab"], merges=merges, model_max_length=state["model_max_length"])


def plain_config(config: Any) -> dict[str, Any]:
    """A diffusers config without its private keys, for a checkpoint's plain-data `lightdiff` block."""
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def _load_component(cls: Any, source: str, subfolder: str) -> Any:
    try:
        return cls.from_pretrained(source, subfolder=subfolder)
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"model.pretrained={source!r} has no usable {subfolder}/ ({cls.__name__}): {error}"
        ) from error


def _load_vae(pretrained: str | None, vae: str | None) -> AutoencoderKL:
    if vae:  # an explicit VAE wins over the pipeline's
        try:
            return AutoencoderKL.from_pretrained(vae)
        except (OSError, ValueError) as error:
            raise ConfigError(f"model.vae={vae!r} is not a diffusers AutoencoderKL folder or id: {error}") from error
    if pretrained is None:
        raise ConfigError("model.vae or model.pretrained must name a VAE")
    return _load_component(AutoencoderKL, pretrained, "vae")


def check_components(
    net: UNet2DConditionModel | SD3Transformer2DModel | PixArtTransformer2DModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel | CLIPTextModelWithProjection,
    resolution: int,
) -> None:
    """The three networks must agree on latent channels, latent size and text width; say which key does not."""
    if net.config.in_channels != vae.config.latent_channels or net.config.out_channels != vae.config.latent_channels:
        raise ConfigError(
            f"net.in_channels={net.config.in_channels} / net.out_channels={net.config.out_channels} do not match "
            f"the VAE's latent_channels={vae.config.latent_channels}"
        )
    factor = vae_scale_factor(vae)
    if resolution % factor or net.config.sample_size != resolution // factor:
        raise ConfigError(
            f"net.sample_size={net.config.sample_size} does not match data.resolution={resolution} / "
            f"the VAE's down-sampling {factor} = {resolution / factor:g}"
        )
    hidden, projection = text_encoder.config.hidden_size, text_encoder.config.projection_dim
    for key, width, expected, name in text_widths(net, hidden, projection):
        if width != expected:
            raise ConfigError(f"{key}={width} differs from the text encoder's {name} (model.text_hidden_size)")
    if isinstance(net, SD3Transformer2DModel):
        if not isinstance(text_encoder, CLIPTextModelWithProjection):
            raise ConfigError("an SD3 transformer (net=mmdit) needs a CLIPTextModelWithProjection text encoder")
        if net.config.joint_attention_dim < 2 * hidden:
            raise ConfigError(
                f"net.joint_attention_dim={net.config.joint_attention_dim} is below 2 x the text encoder's "
                f"hidden_size={hidden} (SD3 concatenates two CLIP encoders' states; model.text_hidden_size)"
            )
        if vae.config.get("shift_factor"):
            raise ConfigError(f"the VAE's shift_factor={vae.config.shift_factor}: lightdiff does not shift latents")
    if isinstance(net, PixArtTransformer2DModel):
        width = net.config.num_attention_heads * net.config.attention_head_dim
        if net.config.caption_channels is not None and net.config.cross_attention_dim != width:
            raise ConfigError(
                f"net.cross_attention_dim={net.config.cross_attention_dim} must be the width num_attention_heads x "
                f"attention_head_dim={width}: the caption projection (net.caption_channels) maps the text to it"
            )
        if net.config.use_additional_conditions:
            raise ConfigError("net.use_additional_conditions=true: lightdiff has no resolution / aspect-ratio input")


@torch.no_grad()
def generate_latent(
    net: UNet2DConditionModel | SD3Transformer2DModel | PixArtTransformer2DModel,
    vae: AutoencoderKL,
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextModel | CLIPTextModelWithProjection,
    scheduler: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int,
    guidance_scale: float = 4.0,
    negative_prompt: str | Sequence[str] = "",
    eta: float = 0.0,
) -> torch.Tensor:
    """Text-to-image as diffusers' StableDiffusionPipeline (UNet) or StableDiffusion3Pipeline (SD3 transformer) does
    it (and the same loop for PixArt): CFG with the negative prompt as unconditional.

    eps = eps(x, "") + w (eps(x, prompt) - eps(x, "")) (Ho & Salimans 2022, Equation 6 with w = 1 + their w); the
    same combination of velocities for a flow-matching model, as the SD3 pipeline does.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts for {len(seeds)} seeds")
    negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
    device = net.device
    text = encode_text(net, tokenizer, text_encoder, prompts)
    guided = guidance_scale > 1.0
    if guided:
        unconditional = encode_text(net, tokenizer, text_encoder, negatives)
        pooled = None if text.pooled is None else torch.cat([unconditional.pooled, text.pooled])
        text = TextCondition(torch.cat([unconditional.states, text.states]), pooled)

    def model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        model_input = torch.cat([x_t, x_t]) if guided else x_t
        prediction = denoiser_output(net, model_input, t, text=text)
        if not guided:
            return prediction
        uncond, cond = prediction.float().chunk(2)  # the guidance sum in float32, as the trajectory (denoise)
        return uncond + guidance_scale * (cond - uncond)

    size = net.config.sample_size
    shape = (len(prompts), net.config.in_channels, size, size)
    latents = denoise(model, scheduler, steps, shape, generators_for(seeds), device, text.states.dtype, eta)
    images = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)
