"""SDXL: two text encoders, pooled text and size / crop ids, from scratch and from a pipeline, exported as
StableDiffusionXLPipeline (tiny pipelines built here with diffusers' own test layout, no downloads)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, EulerDiscreteScheduler, StableDiffusionXLPipeline
from hydra.utils import instantiate
from PIL import Image

from lightdiff.config import ConfigError
from lightdiff.diffusion import NoiseSchedule
from lightdiff.nets.families import SIZE_AND_CROP, ConditioningSettings, drop_conditions, family_of, size_and_crop
from lightdiff.nets.families.sdxl import SDXLText
from lightdiff.nets.text import (
    build_caption_tokenizer,
    text_encoder_from_scratch,
    tokenizer_from_state,
    tokenizer_state,
)
from lightdiff.sample import run as sample_run
from lightdiff.sampling import for_latents, generate, generators_for
from lightdiff.train import run as train_run
from lightdiff.trained import load_denoiser

from .conftest import (
    LOW_PRECISION_LOSS_GAP,
    TINY,
    TINY_SDXL_MODEL,
    assert_discriminator_heads_learnt,
    assert_lora_file_reproduced,
    assert_low_precision_losses_follow_full_precision,
    assert_reproduced,
    compose_config,
    low_precision_lora_runs,
    pipeline_images,
    sample_py_images,
    tiny_dinov2_overrides,
    tiny_sd2_unet,
    tiny_sdxl_unet,
    tiny_vae,
)

CAPTIONS = ["a red circle", "a blue square", "a green triangle", "a white circle"]


def _family(pad_token: str = "!") -> SDXLText:
    """Two 16-wide encoders; the second tokenizer pads with "!" as SDXL's tokenizer_2 does."""
    tokenizer = build_caption_tokenizer(CAPTIONS * 5, vocab_size=300, model_max_length=8)
    tokenizer_2 = tokenizer_from_state({**tokenizer_state(tokenizer), "pad_token": pad_token})
    torch.manual_seed(1)
    first = text_encoder_from_scratch(tokenizer, 16, 1, 2, 32)
    second = text_encoder_from_scratch(tokenizer_2, 16, 1, 2, 32, encoder_class=_with_projection(), projection_dim=16)
    return SDXLText(tokenizer, first.eval(), tokenizer_2, second.eval(), trainable=False)


def _with_projection() -> type:
    from transformers import CLIPTextModelWithProjection

    return CLIPTextModelWithProjection


def _pipeline(family: SDXLText) -> StableDiffusionXLPipeline:
    return StableDiffusionXLPipeline(
        vae=tiny_vae(),
        text_encoder=family.text_encoder,
        text_encoder_2=family.text_encoder_2,
        tokenizer=family.tokenizer,
        tokenizer_2=family.tokenizer_2,
        unet=tiny_sdxl_unet(),
        scheduler=EulerDiscreteScheduler(**NoiseSchedule("scaled_linear", 1000, 0.00085, 0.012).scheduler_kwargs()),
        add_watermarker=False,
    )


def _two_samples(checkpoint: Path, out: Path, *overrides: str) -> np.ndarray:
    """sample.py's first two images of "a red circle" (seeds 0 and 1) as integers (2, H, W, 3)."""
    return sample_py_images(checkpoint, out, "prompt=a red circle", *overrides)


def _diffusers_two(pipeline: DiffusionPipeline, steps: int, guidance_scale: float) -> np.ndarray:
    """Plain diffusers' two images of "a red circle" from seeds 0 and 1, as sample.py's PNGs round them."""
    return pipeline_images(pipeline, ["a red circle"] * 2, num_inference_steps=steps, guidance_scale=guidance_scale)


@pytest.fixture(scope="module")
def sdxl_pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SDXL pipeline folder, as `from_pretrained` reads one from the hub."""
    folder = tmp_path_factory.mktemp("pipeline") / "tiny-sdxl"
    _pipeline(_family()).save_pretrained(folder)
    return folder


def test_conditioning_is_the_pipelines_encode_prompt_and_time_ids() -> None:
    family = _family()
    pipeline = _pipeline(family)
    prompts = ["a red circle", "a blue square"]
    states, negative, pooled, negative_pooled = pipeline.encode_prompt(
        prompts, device=torch.device("cpu"), num_images_per_prompt=1, do_classifier_free_guidance=True
    )
    record = size_and_crop(16, 24, 2, original_size=(40, 30), crop_top_left=(3, 5))
    condition = family({"text": prompts, SIZE_AND_CROP: record})
    torch.testing.assert_close(condition.kwargs["encoder_hidden_states"], states, rtol=0, atol=0)
    torch.testing.assert_close(condition.kwargs["added_cond_kwargs"]["text_embeds"], pooled, rtol=0, atol=0)
    time_ids = pipeline._get_add_time_ids(
        (40, 30), (3, 5), (16, 24), dtype=states.dtype, text_encoder_projection_dim=16
    )
    torch.testing.assert_close(condition.kwargs["added_cond_kwargs"]["time_ids"], time_ids.repeat(2, 1))
    # the empty negative prompt is the pipeline's zeros (force_zeros_for_empty_prompt, negative_prompt=None) ...
    unconditional = family(family.without_condition({"text": prompts, SIZE_AND_CROP: record}, [True, True]))
    assert torch.equal(unconditional.kwargs["encoder_hidden_states"], negative)
    assert not negative.any() and not negative_pooled.any()
    assert torch.equal(unconditional.kwargs["added_cond_kwargs"]["text_embeds"], negative_pooled)
    # ... a given negative prompt is encoded like any prompt, and the size / crop ids are never dropped
    named = family(family.without_condition({"text": prompts, SIZE_AND_CROP: record}, [True, False], "blurry"))
    torch.testing.assert_close(named.kwargs["encoder_hidden_states"][0], family.encoded(["blurry"])[0][0])
    assert torch.equal(named.kwargs["added_cond_kwargs"]["time_ids"], condition.kwargs["added_cond_kwargs"]["time_ids"])
    # negative control: the second tokenizer's padding matters (SDXL's "!" is not the end token)
    other = _family(pad_token="<|endoftext|>")
    assert not torch.equal(other.encoded(prompts)[0], states)


def test_caption_dropout_zeroes_both_encoders_and_the_pooled_vector() -> None:
    family = _family()
    prompts = ["a red circle"] * 400
    inputs, which = drop_conditions(family, {"text": prompts, SIZE_AND_CROP: size_and_crop(16, 16, 400)}, 0.5, 400)
    assert 120 < int(which.sum()) < 280
    condition = family(inputs)
    states, pooled = condition.kwargs["encoder_hidden_states"], condition.kwargs["added_cond_kwargs"]["text_embeds"]
    assert not states[which].any() and not pooled[which].any()
    assert torch.equal(states[~which][0], family.encoded(["a red circle"])[0][0])


def test_the_text_cache_packs_states_and_pooled_exactly() -> None:
    family = _family()
    prompts = ["a red circle", "a blue square"]
    record = size_and_crop(16, 16, 2)
    packed = family.encode(prompts)
    assert packed.shape == (2, 8 + 1, 32)
    cached = family({"text": prompts, "text_states": packed, SIZE_AND_CROP: record})
    encoded = family({"text": prompts, SIZE_AND_CROP: record})
    assert torch.equal(cached.kwargs["encoder_hidden_states"], encoded.kwargs["encoder_hidden_states"])
    assert torch.equal(
        cached.kwargs["added_cond_kwargs"]["text_embeds"], encoded.kwargs["added_cond_kwargs"]["text_embeds"]
    )
    assert family.cacheable and family.cache_fingerprint() != _family(pad_token="<|endoftext|>").cache_fingerprint()


def test_from_scratch_run_trains_both_encoders_and_exports_an_sdxl_pipeline(sdxl_ckpt: Path, tmp_path: Path) -> None:
    denoiser = load_denoiser(sdxl_ckpt)
    family = denoiser.conditioning
    assert isinstance(family, SDXLText)
    assert type(family.text_encoder).__name__ == "CLIPTextModel"
    assert type(family.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    folder = sample_run(compose_config("sample", [f"ckpt={sdxl_ckpt}", f"export={tmp_path / 'sdxl'}"]))
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    pipeline = StableDiffusionXLPipeline.from_pretrained(folder)
    prompts, seeds = ["a red circle", "a blue square"], [3, 4]
    theirs = pipeline(
        prompts,
        height=16,
        width=32,  # not square: the size ids and the latent shape both follow it
        num_inference_steps=4,
        guidance_scale=4.0,
        generator=generators_for(seeds),
        output_type="np",
    ).images
    sampler = instantiate(compose_config("sample", ["ckpt=x", "sampler=ddim"]).sampler)
    scheduler = for_latents(denoiser.objective.scheduler(sampler))
    ours = generate(
        denoiser.net, scheduler, 4, seeds, family, {"text": prompts}, 4.0, "", vae=denoiser.vae, size=(16, 32)
    )
    assert ours.shape == (2, 3, 16, 32)
    assert np.abs(ours.permute(0, 2, 3, 1).numpy() - theirs).max() < 1e-4
    # sample.py reads the export like the checkpoint, and its size / crop settings reach the UNet
    common = ["num_images=2", "steps=3", "prompt=a red circle", "height=16", "width=32"]
    a = sample_run(compose_config("sample", [f"ckpt={sdxl_ckpt}", f"out={tmp_path / 'a'}", *common]))
    b = sample_run(compose_config("sample", [f"ckpt={folder}", f"out={tmp_path / 'b'}", *common]))
    c = sample_run(
        compose_config(
            "sample",
            [f"ckpt={folder}", f"out={tmp_path / 'c'}", *common, "original_size=[64,64]", "crop_top_left=[8,8]"],
        )
    )
    first = [np.asarray(Image.open(out / "000000.png")).astype(int) for out in (a, b, c)]
    assert first[0].shape == (16, 32, 3)
    assert np.abs(first[0] - first[1]).max() <= 1
    assert np.abs(first[0] - first[2]).max() > 1  # other ids, another image
    record = json.loads((c / "metadata.jsonl").read_text().splitlines()[0])
    assert record["original_size"] == [64, 64] and record["crop_top_left"] == [8, 8] and record["width"] == 32


def test_pretrained_sdxl_pipeline_loads_both_encoders_and_fine_tunes(sdxl_pipeline_dir: Path, tmp_path: Path) -> None:
    cfg = compose_config(
        "train",
        [
            f"output_root={tmp_path}",
            *TINY,
            "model=latent",
            f"model.pretrained={sdxl_pipeline_dir}",
            "model.load_pretrained_unet=true",
            "model.vae=null",
            "run_name=ft",
        ],
    )
    train_run(cfg)
    denoiser = load_denoiser(Path(cfg.run_dir) / "checkpoints" / "last.ckpt")
    family = denoiser.conditioning
    assert isinstance(family, SDXLText) and family.tokenizer_2.pad_token == "!"
    original = StableDiffusionXLPipeline.from_pretrained(sdxl_pipeline_dir)
    for mine, theirs in (
        (family.text_encoder, original.text_encoder),
        (family.text_encoder_2, original.text_encoder_2),
    ):
        for key, value in theirs.state_dict().items():
            assert torch.equal(mine.state_dict()[key], value), key  # frozen: the pipeline's weights
    moved = [k for k, v in original.unet.state_dict().items() if not torch.equal(denoiser.net.state_dict()[k], v)]
    assert moved  # the UNet trained


def test_a_pipeline_without_text_encoder_2_is_refused_by_name(sdxl_pipeline_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "no-second-encoder"
    shutil.copytree(sdxl_pipeline_dir, broken)
    index = json.loads((broken / "model_index.json").read_text())
    del index["text_encoder_2"]
    (broken / "model_index.json").write_text(json.dumps(index))
    shutil.rmtree(broken / "text_encoder_2")
    overrides = [f"output_root={tmp_path}", *TINY, "model=latent", "model.load_pretrained_unet=true", "model.vae=null"]
    with pytest.raises(ConfigError, match="text_encoder_2"):
        train_run(compose_config("train", [*overrides, f"model.pretrained={broken}", "run_name=a"]))
    # an SDXL pipeline under a one-encoder UNet would silently drop its second encoder: refused, naming it
    with pytest.raises(ConfigError, match="text_encoder_2, tokenizer_2"):
        train_run(
            compose_config(
                "train",
                [*overrides[:-2], f"model.pretrained={sdxl_pipeline_dir}", "model.vae=null", "run_name=b"],
            )
        )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    "override",
    ["net.projection_class_embeddings_input_dim=48", "net.cross_attention_dim=64", "net.addition_time_embed_dim=2"],
)
def test_an_sdxl_net_that_does_not_fit_the_pipelines_encoders_is_named(
    override: str, sdxl_pipeline_dir: Path, tmp_path: Path
) -> None:
    cfg = compose_config(
        "train",
        [
            f"output_root={tmp_path}",
            *TINY,
            "model=latent",
            f"model.pretrained={sdxl_pipeline_dir}",
            "model.vae=null",
            *TINY_SDXL_MODEL,
            override,
            "run_name=x",
        ],
    )
    key = override.split("=")[0] if "addition" not in override else "net.projection_class_embeddings_input_dim"
    with pytest.raises(ConfigError, match=key):
        train_run(cfg)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("backbone", ["teacher", "patchgan", "dinov2"])
def test_turbo_distils_an_sdxl_teacher_with_every_discriminator(backbone: str, sdxl_ckpt: Path, tmp_path: Path) -> None:
    """The student, the teacher's guided prediction and the teacher-feature discriminator all take the pooled text
    and size / crop ids (an SDXL UNet called without them raises); the heads are conditioned on the pooled vector."""
    extra = {
        "teacher": ["discriminator=teacher"],
        "patchgan": ["discriminator=patchgan", "discriminator.backbone.in_channels=4"],
        "dinov2": tiny_dinov2_overrides(tmp_path / "tiny-dinov2"),
    }[backbone]
    cfg = compose_config(
        "train",
        [
            f"output_root={tmp_path}",
            *TINY,
            "model=turbo",
            f"model.teacher={sdxl_ckpt}",
            "model.teacher_steps=2",
            "run_name=student",
            *extra,
        ],
    )
    module = train_run(cfg).lightning_module
    assert isinstance(module.conditioning, SDXLText)
    assert module.discriminator.condition_projection.in_features == 16  # text_encoder_2's projection
    assert_discriminator_heads_learnt(module)
    if backbone != "teacher":
        return
    # exported as SDXL-Turbo ships: trailing timesteps, sampled unguided in 1-4 steps, and plain diffusers agrees
    student = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    folder = sample_run(compose_config("sample", [f"ckpt={student}", f"export={tmp_path / 'turbo'}"]))
    pipeline = StableDiffusionXLPipeline.from_pretrained(folder)
    assert pipeline.scheduler.config.timestep_spacing == "trailing"
    for steps in (1, 4):
        ours = _two_samples(student, tmp_path / f"steps{steps}", f"steps={steps}", "guidance_scale=1")
        assert_reproduced(ours, _diffusers_two(pipeline, steps, 0.0))


def _sd2_pipeline_dir(root: Path) -> Path:
    """A tiny SD 2.1-shaped pipeline (what SD-Turbo was distilled from): v-prediction, one wider CLIP encoder whose
    tokenizer pads with "!", linear projections in the UNet's transformers, as diffusers' SD2 tests build it."""
    from diffusers import StableDiffusionPipeline

    tokenizer = build_caption_tokenizer(CAPTIONS * 5, vocab_size=300, model_max_length=8)
    tokenizer = tokenizer_from_state({**tokenizer_state(tokenizer), "pad_token": "!"})
    torch.manual_seed(0)
    encoder = text_encoder_from_scratch(tokenizer, 32, 1, 2, 37)
    unet = tiny_sd2_unet()
    schedule = NoiseSchedule("scaled_linear", 1000, 0.00085, 0.012).scheduler_kwargs()
    pipeline = StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**schedule, prediction_type="v_prediction"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    folder = root / "tiny-sd2"
    pipeline.save_pretrained(folder)
    return folder


def test_turbo_distils_an_sd2_v_prediction_teacher(tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    teacher = _sd2_pipeline_dir(tmp_path)
    cfg = compose_config(
        "train",
        [
            f"output_root={tmp_path}",
            *TINY,
            "model=turbo",
            f"model.teacher={teacher}",
            "model.teacher_steps=2",
            "run_name=sd_turbo",
        ],
    )
    module = train_run(cfg).lightning_module
    assert module.teacher.objective.prediction_type == "v_prediction"
    assert module.conditioning.tokenizer.pad_token == "!"  # the teacher's padding, kept through the checkpoint
    student = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    folder = sample_run(compose_config("sample", [f"ckpt={student}", f"export={tmp_path / 'sd_turbo_export'}"]))
    pipeline = StableDiffusionPipeline.from_pretrained(folder)
    assert pipeline.tokenizer.pad_token == "!"
    ours = _two_samples(student, tmp_path / "one", "steps=1", "guidance_scale=1")
    assert_reproduced(ours, _diffusers_two(pipeline, 1, 0.0))


def test_memory_options_half_precision_frozen_parts_and_offloaded_ema(sdxl_pipeline_dir: Path, tmp_path: Path) -> None:
    """model.frozen_dtype puts the frozen VAE and both encoders in half precision (a force_upcast VAE stays float32
    under float16, where SDXL's overflows). (callbacks.ema.offload keeping the same average is tests/test_gpu.py's:
    on a CPU the average and the weights share one device, so the comparison could not fail.)"""
    common = [
        f"output_root={tmp_path}",
        *TINY,
        "model=latent",
        f"model.pretrained={sdxl_pipeline_dir}",
        "model.load_pretrained_unet=true",
        "model.vae=null",
        "trainer.max_steps=3",
    ]
    plain = train_run(compose_config("train", [*common, "run_name=plain"])).lightning_module
    bf16 = train_run(compose_config("train", [*common, "run_name=bf16", "model.frozen_dtype=bfloat16"]))
    module = bf16.lightning_module
    assert module.vae.dtype == torch.bfloat16 and module.net.dtype == torch.float32
    assert module.conditioning.text_encoder.dtype == module.conditioning.text_encoder_2.dtype == torch.bfloat16
    assert bf16.callback_metrics["train/loss"].isfinite()
    fp16 = train_run(compose_config("train", [*common, "run_name=fp16", "model.frozen_dtype=float16"]))
    assert fp16.lightning_module.vae.dtype == torch.float32  # tiny_vae says force_upcast, as SDXL's does
    assert fp16.lightning_module.conditioning.text_encoder.dtype == torch.float16
    assert plain.vae.dtype == torch.float32


def test_lora_on_an_sdxl_base_exports_for_plain_diffusers(sdxl_pipeline_dir: Path, tmp_path: Path) -> None:
    overrides = [
        f"output_root={tmp_path}",
        *TINY,
        "model=latent",
        f"model.pretrained={sdxl_pipeline_dir}",
        "model.load_pretrained_unet=true",
        "model.vae=null",
        "model.lora.rank=4",
    ]
    with pytest.raises(ConfigError, match="two text encoders"):
        train_run(compose_config("train", [*overrides, "model.lora.text_encoder=true", "run_name=te"]))
    # adapters far enough from zero in two steps to change the images
    cfg = compose_config("train", [*overrides, "model.lr=0.05", "run_name=lora"])
    train_run(cfg)
    checkpoint = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    folder = sample_run(compose_config("sample", [f"ckpt={checkpoint}", f"export={tmp_path / 'export'}"]))
    assert (folder / "pytorch_lora_weights.safetensors").is_file()
    pipeline = StableDiffusionXLPipeline.from_pretrained(folder)
    arguments = {"num_inference_steps": 3, "guidance_scale": 4.0, "output_type": "np"}
    base = pipeline(["a red circle"] * 2, generator=generators_for([0, 1]), **arguments).images
    pipeline.load_lora_weights(folder)
    theirs = pipeline(["a red circle"] * 2, generator=generators_for([0, 1]), **arguments).images
    ours = _two_samples(checkpoint, tmp_path / "ours", "steps=3")
    assert_reproduced(ours, (theirs * 255).round().astype(int))
    assert np.abs(theirs - base).max() > 1e-4  # the adapters loaded by diffusers change its images
    # kohya's SDXL layout names the original UNet's blocks; diffusers' kohya reader maps them back
    kohya = tmp_path / "kohya.safetensors"
    sample_run(compose_config("sample", [f"ckpt={checkpoint}", f"export={kohya}", "export_format=kohya"]))
    from safetensors import safe_open

    with safe_open(str(kohya), framework="pt") as handle:
        assert any(key.startswith("lora_unet_input_blocks_") for key in handle.keys())
        assert not any("down_blocks" in key for key in handle.keys())
    fresh = StableDiffusionXLPipeline.from_pretrained(folder)
    fresh.load_lora_weights(str(tmp_path), weight_name=kohya.name)
    from_kohya = fresh(["a red circle"] * 2, generator=generators_for([0, 1]), **arguments).images
    assert np.abs(from_kohya - theirs).max() < 1e-4


def test_lcm_of_an_sdxl_teacher_exports_as_lcm_sdxl(sdxl_ckpt: Path, tmp_path: Path) -> None:
    """model=lcm on an SDXL teacher: the student's guidance input rides on the SDXL family, its checkpoint loads back,
    and it exports as LCM-SDXL ships (StableDiffusionXLPipeline + LCMScheduler, which embeds the guidance scale for a
    UNet with time_cond_proj_dim); plain diffusers reproduces sample.py."""
    from diffusers import LCMScheduler

    cfg = compose_config(
        "train",
        [f"output_root={tmp_path}", *TINY, "model=lcm", f"model.teacher={sdxl_ckpt}", "model.teacher_steps=2"]
        + ["run_name=lcm_sdxl", "trainer.max_steps=2"],
    )
    train_run(cfg)
    checkpoint = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    folder = sample_run(compose_config("sample", [f"ckpt={checkpoint}", f"export={tmp_path / 'lcm_sdxl_export'}"]))
    pipeline = StableDiffusionXLPipeline.from_pretrained(folder)
    assert isinstance(pipeline.scheduler, LCMScheduler) and pipeline.unet.config.time_cond_proj_dim
    ours = _two_samples(checkpoint, tmp_path / "ours", "steps=2", "guidance_scale=3")
    assert_reproduced(ours, _diffusers_two(pipeline, 2, 3.0))


def test_lora_on_an_int8_or_fp8_sdxl_base_trains_as_at_full_precision(sdxl_pipeline_dir: Path, tmp_path: Path) -> None:
    """model.base_quantization=int8 | nf4 and model.base_storage=fp8 under LoRA on an SDXL base: the adapters train at
    fp32 on the low-precision base, each step's loss near the full-precision run's (LOW_PRECISION_LOSS_GAP: why and
    how near), and the int8 run's LoRA file, for the unquantised base, is drawn by plain StableDiffusionXLPipeline as
    sample.py draws it."""
    overrides = [*TINY, "model=latent", f"model.pretrained={sdxl_pipeline_dir}", "model.load_pretrained_unet=true"]
    overrides += ["model.vae=null", "model.lora.rank=4", "model.lr=0.05", "model.warmup_steps=0"]
    runs = low_precision_lora_runs(overrides, tmp_path)
    assert_low_precision_losses_follow_full_precision(runs, within=LOW_PRECISION_LOSS_GAP)
    checkpoint, _ = runs["int8"]
    sample_run(compose_config("sample", [f"ckpt={checkpoint}", f"export={tmp_path / 'export'}"]))
    adapted = ["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"]  # cross-attention reads the text
    assert_lora_file_reproduced(
        checkpoint, tmp_path / "export", StableDiffusionXLPipeline, CAPTIONS[:2], adapted, guidance_scale=1.0
    )


def test_dmd2_of_an_sdxl_teacher_exports_as_dmd2_sdxl(sdxl_ckpt: Path, tmp_path: Path) -> None:
    """model=dmd2 (1 step, with DMD's regression pairs) on an SDXL teacher: the student, the fake network and its
    classifier take the pooled text and size / crop ids, and the export is DMD2's SDXL recipe (StableDiffusionXL-
    Pipeline + LCMScheduler on the student's grid) that plain diffusers reproduces unguided."""
    from diffusers import LCMScheduler

    cfg = compose_config(
        "train",
        [f"output_root={tmp_path}", *TINY, "model=dmd2", f"model.teacher={sdxl_ckpt}", "model.teacher_steps=2"]
        + ["run_name=dmd2_sdxl", "model.fake_updates=1", "model.regression_pairs=4"],  # the default: 1 step, pairs
    )
    module = train_run(cfg).lightning_module
    assert module.student_timesteps == [999] and module.pairs is not None and len(module.pairs) == 4
    checkpoint = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    folder = sample_run(compose_config("sample", [f"ckpt={checkpoint}", f"export={tmp_path / 'dmd2_sdxl_export'}"]))
    pipeline = StableDiffusionXLPipeline.from_pretrained(folder)
    assert isinstance(pipeline.scheduler, LCMScheduler)
    ours = _two_samples(checkpoint, tmp_path / "ours", "steps=1", "guidance_scale=1")
    assert_reproduced(ours, _diffusers_two(pipeline, 1, 0.0))


def test_shards_store_the_packed_states_of_an_sdxl_pipelines_encoders(sdxl_pipeline_dir: Path, tmp_path: Path) -> None:
    """`python -m lightdiff.data.shard --text-encoder` picks the family of the pipeline's denoiser (an SDXL UNet: both
    encoders, the pooled vector packed as one more row) from its config alone, as training's text cache stores it."""
    import io

    from lightdiff.data.shard import main as shard_main
    from lightdiff.data.shard_stream import read_shard
    from lightdiff.nets.families import load_denoiser as pipeline_denoiser

    folder = tmp_path / "images"
    folder.mkdir()
    with (folder / "metadata.jsonl").open("w") as metadata:
        for index, caption in enumerate([*CAPTIONS, None]):
            Image.new("RGB", (16, 16), (60 * index, 0, 0)).save(folder / f"{index}.png")
            metadata.write(json.dumps({"file_name": f"{index}.png", **({"text": caption} if caption else {})}) + "\n")
    shard_main([str(folder), str(tmp_path / "shards"), "--text-encoder", str(sdxl_pipeline_dir)])
    samples = read_shard(str(tmp_path / "shards" / "train-000000.tar"))
    net = pipeline_denoiser(str(sdxl_pipeline_dir))
    family = family_of(net).pretrained_conditioning(str(sdxl_pipeline_dir), net, ConditioningSettings(), "p")
    with torch.no_grad():
        expected = family.encode(CAPTIONS)
    stored = torch.stack([torch.from_numpy(np.load(io.BytesIO(raw["text.npy"]))) for raw in samples[:4]])
    assert stored.dtype == torch.float16 and stored.shape == expected.shape
    torch.testing.assert_close(stored.float(), expected, atol=5e-3, rtol=1e-2)
    assert json.loads(samples[0]["json"])["text_states"]["encoder"] == family.cache_fingerprint()
    assert "text.npy" not in samples[4] and "txt" not in samples[4]  # no caption: nothing to encode
