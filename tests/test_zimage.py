"""Z-Image: a ZImageTransformer2DModel with a Qwen3 text encoder (tokenizer built from the captions, with Qwen3's chat
template) behind the shipped shapes VAE, trained by flow matching on shapes and exported as a ZImagePipeline that
plain diffusers reproduces from the same seeds (tiny models built here, no downloads)."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, ZImagePipeline, ZImageTransformer2DModel
from transformers import Qwen3Model

from lightdiff.config import ConfigError
from lightdiff.nets.families import family_of
from lightdiff.nets.families.zimage import FAMILY as ZIMAGE
from lightdiff.nets.families.zimage import ZImageText
from lightdiff.sample import run as sample_run
from lightdiff.train import run as train_run
from lightdiff.trained import load_checkpoint_file, load_trained

from .conftest import (
    TINY,
    assert_fine_tune_froze_the_encoder,
    assert_lora_file_reproduced,
    compose_config,
    drawn_from_checkpoint,
    perturb_weights,
)

PROMPTS = ["a red circle", "a blue square in the top left"]

# The tiny Z-Image (model=latent net=zimage_tiny) behind the shipped shapes VAE: 16 px images, 8 x 8 latents of 4
# channels cut into 16 tokens, one refiner block each for image and caption and one main block of width 32, a 1-layer,
# 32-wide Qwen3 of 16 states.
TINY_ZIMAGE_MODEL = [
    "model=latent",
    "net=zimage_tiny",
    "objective=flow_matching",
    "net.dim=32",
    "net.n_layers=1",
    "net.n_refiner_layers=1",
    "net.n_heads=2",
    "net.n_kv_heads=2",
    "net.axes_dims=[4,6,6]",
    "net.cap_feat_dim=32",
    "model.text_layers=1",
    "model.text_heads=2",
    "model.max_sequence_length=16",
]


def _zimage_config(root: Path, *overrides: str):
    return compose_config("train", [f"output_root={root}", *TINY, *TINY_ZIMAGE_MODEL, *overrides])


@pytest.fixture(scope="module")
def zimage_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Z-Image trained from scratch for 4 steps (its Qwen3 built from the captions), at a rate that moves its
    zeroed modulations far enough for the prompt to matter (guidance then changes the images)."""
    fast = ["model.lr=0.01", "model.warmup_steps=0", "trainer.max_steps=4"]
    cfg = _zimage_config(tmp_path_factory.mktemp("zimage"), "run_name=zimage", *fast)
    train_run(cfg)
    return Path(cfg.run_dir) / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def zimage_export(zimage_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("zimage-export") / "pipeline"
    sample_run(compose_config("sample", [f"ckpt={zimage_ckpt}", f"export={folder}", "steps=3"]))
    return folder


def _images(
    folder: Path, checkpoint: Path, guidance_scale: float, perturb: float = 0.0, pipeline_guidance: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """PROMPTS' images (3 steps) drawn by lightdiff from the checkpoint (the scheduler sample.py makes for it) and by
    plain diffusers from the exported ZImagePipeline, from seeds 0 and 1; the pipeline's guidance_scale is lightdiff's
    - 1 (unless `pipeline_guidance` says otherwise: the control). `perturb`: Gaussian noise of that sigma on the
    exported transformer (the mutation control)."""
    pipeline = ZImagePipeline.from_pretrained(folder)
    if perturb:
        perturb_weights(pipeline.transformer, perturb)
    ours = drawn_from_checkpoint(checkpoint, {"text": PROMPTS}, guidance_scale)
    theirs = pipeline(
        prompt=PROMPTS, height=16, width=16, num_inference_steps=3, max_sequence_length=16, output_type="pt",
        guidance_scale=guidance_scale - 1 if pipeline_guidance is None else pipeline_guidance,
        generator=[torch.Generator().manual_seed(seed) for seed in (0, 1)],
    ).images  # fmt: skip
    return ours, theirs


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0], ids=["unguided", "guided"])
def test_z_image_trains_and_exports_a_pipeline_that_plain_diffusers_reproduces(
    zimage_ckpt: Path, zimage_export: Path, guidance_scale: float
) -> None:
    """The export is a ZImagePipeline (the tokenizer built here with its chat template, the Qwen3, the VAE) that draws
    lightdiff's images from the checkpoint, unguided and guided (its guidance_scale = lightdiff's - 1); with its
    transformer perturbed, or guided at lightdiff's own number, it does not (the controls)."""
    meta = load_checkpoint_file(zimage_ckpt)["lightdiff"]
    assert meta["conditioning"]["family"] == "zimage_text" and meta["conditioning"]["tokenizer"]["chat_template"]
    index = json.loads((zimage_export / "model_index.json").read_text())
    assert index["_class_name"] == "ZImagePipeline" and index["text_encoder"][1] == "Qwen3Model"
    ours, theirs = _images(zimage_export, zimage_ckpt, guidance_scale)
    assert theirs.shape == ours.shape == (2, 3, 16, 16)
    assert (theirs - ours).abs().max() < 1e-4
    assert (theirs[0] - theirs[1]).abs().max() > 1e-2  # control: two seeds' images are far apart at this scale
    ours, theirs = _images(zimage_export, zimage_ckpt, guidance_scale, perturb=0.05)
    assert (theirs - ours).abs().max() > 1e-3
    if guidance_scale > 1:  # control: the pipeline given lightdiff's number draws other images
        ours, theirs = _images(zimage_export, zimage_ckpt, guidance_scale, pipeline_guidance=guidance_scale)
        assert (theirs - ours).abs().max() > 1e-3


def test_z_image_text_is_the_pipelines_encode_prompt(zimage_export: Path) -> None:
    """ZImageText's states are the pipeline's prompt embeddings (each prompt's tokens under the chat template, cut at
    max_sequence_length; past them zero and masked), and the control without the template differs."""
    text = load_trained(zimage_export).conditioning
    assert isinstance(text, ZImageText)
    pipeline = ZImagePipeline.from_pretrained(zimage_export)
    prompts = ["red", "a blue square", PROMPTS[1]]  # 10, 11 and (cut) 16 tokens; the pipeline formats them in place
    with torch.no_grad():
        ours = text(dict(text=prompts))
        theirs, _ = pipeline.encode_prompt(list(prompts), do_classifier_free_guidance=False, max_sequence_length=16)
    states, mask = ours.kwargs["encoder_hidden_states"], ours.kwargs["encoder_hidden_states_mask"]
    assert [len(t) for t in theirs] == mask.sum(dim=1).tolist() == [10, 11, 16]
    for row, expected in enumerate(theirs):
        assert torch.allclose(states[row, : len(expected)], expected, atol=1e-6)
    assert not states[~mask].any()
    pipeline.tokenizer.chat_template = "{{ messages[0]['content'] }}"  # control: the bare prompt
    with torch.no_grad():
        bare = pipeline.encode_prompt(list(prompts), do_classifier_free_guidance=False, max_sequence_length=16)[0]
    assert len(bare[0]) < len(theirs[0])


def test_a_new_z_image_transformer_starts_with_identity_blocks() -> None:
    """ZImage.initialise zeroes every modulated block's adaLN projection: each returns its input tokens; diffusers'
    random initialisation does not (the control)."""
    torch.manual_seed(0)
    net = ZImageTransformer2DModel(
        in_channels=4, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
        axes_dims=[4, 6, 6],
    )  # fmt: skip

    def block_changes(net: ZImageTransformer2DModel) -> list[float]:
        changes: list[float] = []

        def record(module, args, out) -> None:
            changes.append(float((out - args[0]).abs().max()))

        hooks = [block.register_forward_hook(record) for block in [*net.noise_refiner, *net.layers]]
        with torch.no_grad():
            net([torch.randn(4, 1, 8, 8)], torch.tensor([0.5]), [torch.randn(5, 32)])
        for hook in hooks:
            hook.remove()
        return changes

    assert min(block_changes(net)) > 1e-3
    assert block_changes(ZIMAGE.initialise(net)) == [0.0] * 3
    assert family_of(net) is ZIMAGE and ZIMAGE.token_side(net) == 2 and ZIMAGE.latent_channels(net) == 4


def test_bad_z_image_input_is_named_before_anything_is_written(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    with pytest.raises(ConfigError, match="net.cap_feat_dim=32 differs from the Qwen3 encoder's hidden_size=16"):
        train_run(_zimage_config(runs, "run_name=width", "model.text_hidden_size=16"))
    with pytest.raises(ConfigError, match="objective=ddpm: a ZImageTransformer2DModel \\(zimage\\)"):
        train_run(_zimage_config(runs, "run_name=ddpm", "objective=ddpm"))
    with pytest.raises(ConfigError, match="net.all_patch_size=\\[1\\], net.all_f_patch_size=\\[1\\]"):
        train_run(_zimage_config(runs, "run_name=patch", "net.all_patch_size=[1]"))
    assert not runs.exists() or not any(runs.iterdir())


@pytest.mark.slow  # a fine-tuning run on the export
def test_a_z_image_folder_fine_tunes_with_its_frozen_encoder(zimage_export: Path, tmp_path: Path) -> None:
    """model.pretrained=<ZImagePipeline folder>: its Qwen3 and VAE frozen, its transformer trained."""
    overrides = [f"output_root={tmp_path}", *TINY, *TINY_ZIMAGE_MODEL, f"model.pretrained={zimage_export}"]
    trainer = train_run(compose_config("train", [*overrides, "model.load_pretrained_unet=true", "run_name=tuned"]))
    assert_fine_tune_froze_the_encoder(trainer, ZImagePipeline.from_pretrained(zimage_export), ZImageText)


def test_z_image_trains_from_the_latent_cache_without_encoding(
    zimage_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """data.cache_latents with a frozen Qwen3: once the cache exists a run encodes no image and no prompt (the mask
    comes from the prompts' token counts)."""
    from .conftest import count_encoded

    calls = count_encoded(monkeypatch, AutoencoderKL)
    texts: list[int] = []
    original = Qwen3Model.forward
    monkeypatch.setattr(Qwen3Model, "forward", lambda self, *a, **k: texts.append(1) or original(self, *a, **k))
    overrides = [f"output_root={tmp_path}", *TINY, *TINY_ZIMAGE_MODEL, f"model.pretrained={zimage_export}"]
    cache = [f"data.latent_cache_dir={tmp_path / 'cache'}", "data.size=8", "data.cache_latents=true"]
    cache += ["model.load_pretrained_unet=true", "model.cond_drop_prob=0"]
    train_run(compose_config("train", [*overrides, *cache, "run_name=fill"]))
    assert sum(calls) == 8 and texts
    calls.clear(), texts.clear()
    trainer = train_run(
        compose_config("train", [*overrides, *cache, "run_name=cached", "callbacks.samples.final_num_images=0"])
    )
    assert trainer.global_step == 2 and calls == [] and texts == []


@pytest.mark.slow  # a LoRA run on the export and two pipelines
def test_lora_on_z_image_is_a_diffusers_file_that_its_pipeline_loads(zimage_export: Path, tmp_path: Path) -> None:
    """LoRA on a Z-Image base (attention and SwiGLU MLPs): the export is the base plus diffusers' LoRA file, which
    ZImagePipeline.load_lora_weights applies so that the pipeline draws lightdiff's images; without it, other images
    (the control)."""
    overrides = [f"output_root={tmp_path}", *TINY, *TINY_ZIMAGE_MODEL, f"model.pretrained={zimage_export}"]
    overrides += ["model.load_pretrained_unet=true", "model.lora.rank=4", "model.lr=0.01", "model.warmup_steps=0"]
    cfg = compose_config("train", [*overrides, "trainer.max_steps=4", "run_name=lora"])
    train_run(cfg)
    checkpoint = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    sample_run(compose_config("sample", [f"ckpt={checkpoint}", f"export={tmp_path / 'export'}"]))
    adapted = ["layers.0.attention.to_q", "layers.0.feed_forward.w1"]
    assert_lora_file_reproduced(
        checkpoint, tmp_path / "export", ZImagePipeline, PROMPTS, adapted, max_sequence_length=16, guidance_scale=0.0
    )


@pytest.mark.slow  # a few-step LoRA run on the export and two pipelines
def test_a_z_image_turbo_shaped_folder_fine_tunes_keeping_its_few_steps(zimage_export: Path, tmp_path: Path) -> None:
    """model=few_step_finetune on a ZImagePipeline folder, Z-Image-Turbo's layout (a pipeline that samples in a few
    steps, which its folder does not record: model.steps): the preservation term runs its 2-step flow trajectory from
    t = 1, the adapters train, and the export is the base plus diffusers' LoRA file that ZImagePipeline loads."""
    overrides = [f"output_root={tmp_path}", *TINY, "model=few_step_finetune", f"model.base={zimage_export}"]
    overrides += ["model.steps=2", "model.lora.rank=4", "model.lr=0.01", "data.classes=[a red triangle]"]
    overrides += ["model.preserve_prompts=[a blue square]", "model.preserve_batch_size=2", "run_name=turbo_lora"]
    cfg = compose_config("train", overrides)
    method = train_run(cfg).lightning_module
    assert len(method.trajectory_timesteps) == 2 and method.trajectory_timesteps[0] == pytest.approx(1000.0)
    checkpoint = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    meta = load_checkpoint_file(checkpoint)["lightdiff"]
    assert meta["method"] == "few_step_finetune" and meta["student_timesteps"] == method.trajectory_timesteps
    with pytest.raises(ConfigError, match=r"model\.steps"):  # a folder records no step count: it must be given
        train_run(compose_config("train", [o for o in overrides if o != "model.steps=2"] + ["run_name=no_steps"]))
    sample_run(compose_config("sample", [f"ckpt={checkpoint}", f"export={tmp_path / 'export'}"]))
    adapted = ["layers.0.attention.to_q", "layers.0.feed_forward.w1"]
    assert_lora_file_reproduced(
        checkpoint, tmp_path / "export", ZImagePipeline, PROMPTS, adapted, max_sequence_length=16, guidance_scale=0.0
    )
