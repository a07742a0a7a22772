"""SD3 with its three encoders (CLIP-L, CLIP-G, T5) as StableDiffusion3Pipeline uses them, from a pipeline folder and
from scratch (`model.t5`), exported as StableDiffusion3Pipeline (tiny models built here, no downloads)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextModelWithProjection

from lightdiff.config import ConfigError
from lightdiff.nets.families import conditioning_from_state
from lightdiff.nets.families.sd3 import SD3Text
from lightdiff.nets.feature_discriminator import TransformerBlockFeatures
from lightdiff.nets.text import (
    build_caption_tokenizer,
    build_t5_tokenizer,
    t5_encoder_from_scratch,
    text_encoder_from_scratch,
)
from lightdiff.sample import run as sample_run
from lightdiff.sampling import for_latents, generate
from lightdiff.train import run as train_run
from lightdiff.trained import load_denoiser

from .conftest import TINY, assert_reproduced, compose_config, pipeline_images, tiny_vae

CAPTIONS = ["a red circle", "a blue square", "a green triangle", "a white circle"]
MAX_SEQUENCE_LENGTH = 6
PROMPTS, SEEDS = ["a red circle", "a blue square"], [3, 4]


def _family(with_t5: bool = True) -> SD3Text:
    """CLIP-L 16 wide, CLIP-G 24 wide (each projecting to 16), T5 48 wide = the transformer's joint_attention_dim."""
    tokenizer = build_caption_tokenizer(CAPTIONS * 5, vocab_size=300, model_max_length=8)
    tokenizer_3 = build_t5_tokenizer(CAPTIONS * 5, model_max_length=MAX_SEQUENCE_LENGTH)
    torch.manual_seed(1)
    clip_l = text_encoder_from_scratch(tokenizer, 16, 1, 2, 32, CLIPTextModelWithProjection, 16).eval()
    clip_g = text_encoder_from_scratch(tokenizer, 24, 1, 2, 48, CLIPTextModelWithProjection, 16).eval()
    t5 = t5_encoder_from_scratch(tokenizer_3, 48, 1, 2, 96).eval() if with_t5 else None
    return SD3Text(
        tokenizer,
        clip_l,
        tokenizer,
        clip_g,
        tokenizer_3 if with_t5 else None,
        t5,
        False,
        48,
        MAX_SEQUENCE_LENGTH,
    )


def _transformer() -> SD3Transformer2DModel:
    torch.manual_seed(2)
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=48,
        pooled_projection_dim=32,
        out_channels=4,
        pos_embed_max_size=8,
    ).eval()


def _pipeline(family: SD3Text) -> StableDiffusion3Pipeline:
    vae = tiny_vae()
    vae.register_to_config(shift_factor=0.1, scaling_factor=0.9)  # SD3's VAE is shifted
    return StableDiffusion3Pipeline(
        transformer=_transformer(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=family.text_encoder,
        tokenizer=family.tokenizer,
        text_encoder_2=family.text_encoder_2,
        tokenizer_2=family.tokenizer_2,
        text_encoder_3=family.text_encoder_3,
        tokenizer_3=family.tokenizer_3,
    )


def _diffusers(pipeline: StableDiffusion3Pipeline, steps: int = 3) -> np.ndarray:
    return pipeline_images(
        pipeline,
        PROMPTS,
        seeds=SEEDS,
        rounded=False,
        negative_prompt=["", ""],
        num_inference_steps=steps,
        guidance_scale=4.0,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
    )


def _ours(checkpoint_or_folder: Path, steps: int = 3) -> np.ndarray:
    denoiser = load_denoiser(checkpoint_or_folder)
    scheduler = for_latents(denoiser.objective.scheduler(FlowMatchEulerDiscreteScheduler))
    images = generate(
        denoiser.net, scheduler, steps, SEEDS, denoiser.conditioning, {"text": PROMPTS}, 4.0, "", vae=denoiser.vae
    )
    return images.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("with_t5", [True, False])
def test_three_encoders_are_what_stable_diffusion_3_pipeline_encodes(with_t5: bool) -> None:
    family = _family(with_t5)
    pipeline = _pipeline(family)
    with torch.no_grad():
        states, _, pooled, _ = pipeline.encode_prompt(
            CAPTIONS, None, None, do_classifier_free_guidance=False, max_sequence_length=MAX_SEQUENCE_LENGTH
        )
        ours = family({"text": CAPTIONS})
        cached = family({"text": CAPTIONS, "text_states": family.encode(CAPTIONS)})
    assert states.shape == (4, 8 + MAX_SEQUENCE_LENGTH, 48)  # 8 CLIP tokens (16 + 24 wide, padded), then T5's
    assert torch.equal(ours.kwargs["encoder_hidden_states"], states)
    assert torch.equal(ours.kwargs["pooled_projections"], pooled) and pooled.shape == (4, 32)
    assert torch.equal(cached.kwargs["encoder_hidden_states"], states)
    assert torch.equal(cached.kwargs["pooled_projections"], pooled)
    assert bool(states[:, 8:].any()) == with_t5  # without a T5 the pipeline appends zeros, and so does the family
    rebuilt = conditioning_from_state(family.state())
    rebuilt.load_state_dict(family.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt({"text": CAPTIONS}).kwargs["encoder_hidden_states"], states)


def test_an_sd3_pipeline_fine_tunes_and_exports_for_plain_diffusers(tmp_path: Path) -> None:
    folder = tmp_path / "tiny-sd3"
    _pipeline(_family()).save_pretrained(folder)
    cfg = compose_config(
        "train",
        [
            f"output_root={tmp_path}",
            *TINY,
            "model=latent",
            f"model.pretrained={folder}",
            "model.load_pretrained_unet=true",
            "model.vae=null",
            f"model.max_sequence_length={MAX_SEQUENCE_LENGTH}",
            "objective=flow_matching",
            "objective.shift=3.0",
            "model.warmup_steps=0",  # two steps that move the transformer (the control below)
            "model.lr=0.01",
            "run_name=ft",
        ],
    )
    train_run(cfg)
    checkpoint = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    denoiser = load_denoiser(checkpoint)
    family = denoiser.conditioning
    assert isinstance(family, SD3Text) and type(family.text_encoder_3).__name__ == "T5EncoderModel"
    original = StableDiffusion3Pipeline.from_pretrained(folder)
    for mine, theirs in (
        (family.text_encoder, original.text_encoder),  # the first CLIP too
        (family.text_encoder_2, original.text_encoder_2),
        (family.text_encoder_3, original.text_encoder_3),
    ):
        for key, value in theirs.state_dict().items():
            assert torch.equal(mine.state_dict()[key], value), key  # frozen: the pipeline's weights
    assert denoiser.vae.config.shift_factor == pytest.approx(0.1)
    export = sample_run(compose_config("sample", [f"ckpt={checkpoint}", f"export={tmp_path / 'sd3'}"]))
    index = json.loads((export / "model_index.json").read_text())
    assert index["text_encoder_3"] == ["transformers", "T5EncoderModel"]
    theirs = _diffusers(StableDiffusion3Pipeline.from_pretrained(export))
    ours = _ours(checkpoint)
    assert_reproduced(ours, theirs, 1e-4)
    assert np.abs(ours - _diffusers(original)).max() > 1e-3  # control: the fine-tuned transformer draws otherwise


SMALL_MMDIT = [
    "net=mmdit_tiny",
    "model.text_hidden_size=16",
    "model.text_layers=1",
    "model.text_heads=2",
    "net.num_layers=2",
    "net.attention_head_dim=8",
    "net.caption_projection_dim=32",
    "net.joint_attention_dim=32",
    "net.pooled_projection_dim=32",
    f"model.max_sequence_length={MAX_SEQUENCE_LENGTH}",
]


@pytest.fixture(scope="module")
def sd3_t5_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MMDiT trained for 2 steps from scratch with one CLIP and a T5 (model.t5=true)."""
    root = tmp_path_factory.mktemp("sd3-t5")
    tiny_vae().save_pretrained(root / "vae")
    common = [f"output_root={root}", *TINY, "model=latent", f"model.vae={root / 'vae'}", *SMALL_MMDIT]
    cfg = compose_config("train", [*common, "objective=flow_matching", "model.t5=true", "run_name=t5"])
    train_run(cfg)
    return Path(cfg.run_dir) / "checkpoints" / "last.ckpt"


def test_from_scratch_sd3_with_a_t5_exports_all_three_encoders(sd3_t5_ckpt: Path, tmp_path: Path) -> None:
    family = load_denoiser(sd3_t5_ckpt).conditioning
    assert isinstance(family, SD3Text) and family.text_encoder_2 is None  # one CLIP for both, plus the T5
    assert family.text_encoder_3.config.d_model == 32
    export = sample_run(compose_config("sample", [f"ckpt={sd3_t5_ckpt}", f"export={tmp_path / 'sd3'}"]))
    pipeline = StableDiffusion3Pipeline.from_pretrained(export)
    assert pipeline.text_encoder_3 is not None
    assert_reproduced(_ours(sd3_t5_ckpt), _diffusers(pipeline), 1e-4)
    # sample.py reads the export back as the same three-encoder family
    assert np.abs(_ours(export) - _ours(sd3_t5_ckpt)).max() < 1e-5
    tiny_vae().save_pretrained(tmp_path / "vae")
    unet = [f"output_root={tmp_path}", *TINY, "model=latent", f"model.vae={tmp_path / 'vae'}", "model.t5=true"]
    with pytest.raises(ConfigError, match="model.t5=true"):  # a T5 is SD3's, not a UNet's
        train_run(compose_config("train", [*unet, "run_name=unet"]))
    assert not (tmp_path / "unet").exists()


def test_turbo_distils_an_mmdit_teacher_on_its_block_tokens(sd3_t5_ckpt: Path, tmp_path: Path) -> None:
    """LADD as SD3-Turbo was distilled: the discriminator's heads read the frozen MMDiT's image tokens."""
    cfg = compose_config(
        "train",
        [
            f"output_root={tmp_path}",
            *TINY,
            "model=turbo",
            f"model.teacher={sd3_t5_ckpt}",
            "model.teacher_steps=2",
            "discriminator=teacher",
            "run_name=student",
        ],
    )
    module = train_run(cfg).lightning_module
    backbone = module.discriminator.backbone
    assert isinstance(backbone, TransformerBlockFeatures) and len(backbone.channels) == 2  # both joint blocks
    student = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    export = sample_run(compose_config("sample", [f"ckpt={student}", f"export={tmp_path / 'turbo'}"]))
    pipeline = StableDiffusion3Pipeline.from_pretrained(export)
    theirs = pipeline_images(
        pipeline,
        PROMPTS,
        seeds=SEEDS,
        rounded=False,
        num_inference_steps=1,
        guidance_scale=1.0,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
    )
    denoiser = load_denoiser(student)
    scheduler = for_latents(denoiser.objective.scheduler(FlowMatchEulerDiscreteScheduler))
    ours = generate(denoiser.net, scheduler, 1, SEEDS, denoiser.conditioning, {"text": PROMPTS}, vae=denoiser.vae)
    assert_reproduced(ours, theirs, 1e-4)


def test_a_vae_that_does_not_fit_the_transformer_is_named(tmp_path: Path) -> None:
    sixteen = AutoencoderKL(
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        block_out_channels=[8, 16],
        latent_channels=16,
        norm_num_groups=4,
        shift_factor=0.05,
    )
    sixteen.save_pretrained(tmp_path / "vae16")
    overrides = [f"output_root={tmp_path}", *TINY, "model=latent", f"model.vae={tmp_path / 'vae16'}"]
    with pytest.raises(ConfigError, match="net.in_channels=4 .* latent_channels=16"):
        train_run(compose_config("train", [*overrides, "net=mmdit_tiny", "objective=flow_matching", "run_name=a"]))
    assert not (tmp_path / "a").exists()
