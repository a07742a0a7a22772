"""Qwen-Image: a QwenImageTransformer2DModel with a Qwen2.5-VL text encoder (tokenizer built from the captions and
the pipeline's template) behind Qwen-Image's VAE, trained by flow matching on shapes and exported as a
QwenImagePipeline that plain diffusers reproduces from the same seeds (tiny models built here, no downloads)."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel

from lightdiff.config import ConfigError
from lightdiff.drawing import scheduler_for
from lightdiff.nets.families import Family, family_of
from lightdiff.nets.families.qwenimage import FAMILY as QWEN
from lightdiff.nets.families.qwenimage import QWEN_DROP_TOKENS, QWEN_TEMPLATE, QwenText
from lightdiff.sample import run as sample_run
from lightdiff.sampling import generate
from lightdiff.train import run as train_run
from lightdiff.trained import load_checkpoint_file, load_denoiser, load_trained

from .conftest import (
    TINY,
    assert_fine_tune_froze_the_encoder,
    assert_lora_file_reproduced,
    compose_config,
    drawn_from_checkpoint,
    perturb_weights,
    tiny_vae,
)

PROMPTS = ["a red circle", "a blue square in the top left"]

# The tiny Qwen-Image (model=latent net=qwenimage_tiny) for tiny_qwen_vae: 16 px images, 8 x 8 latents of 4
# channels packed into 16 tokens, a 1-layer transformer of width 32, a 1-layer, 32-wide Qwen2.5-VL of 16 states.
TINY_QWEN_MODEL = [
    "model=latent",
    "net=qwenimage_tiny",
    "objective=flow_matching",
    "net.in_channels=16",
    "net.out_channels=4",
    "net.num_layers=1",
    "net.num_attention_heads=2",
    "net.attention_head_dim=16",
    "net.axes_dims_rope=[4,6,6]",
    "net.joint_attention_dim=32",
    "model.text_layers=1",
    "model.text_heads=2",
    "model.max_sequence_length=16",
]


def tiny_qwen_vae() -> AutoencoderKLQwenImage:
    """Qwen-Image's VAE at one level (2x in space: 16 px -> 8 x 8 latents of 4 channels), with per-channel statistics
    far from (0, 1), seeded."""
    torch.manual_seed(0)
    return AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2],
        num_res_blocks=1,
        temperal_downsample=[False],
        latents_mean=[0.1, -0.2, 0.3, 0.0],
        latents_std=[0.5, 1.5, 1.0, 2.0],
    )


@pytest.fixture(scope="module")
def qwen_vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("qwen-vae") / "vae"
    tiny_qwen_vae().save_pretrained(folder)
    return folder


def _qwen_config(root: Path, vae: Path, *overrides: str):
    return compose_config("train", [f"output_root={root}", *TINY, *TINY_QWEN_MODEL, f"model.vae={vae}", *overrides])


@pytest.fixture(scope="module")
def qwen_ckpt(tmp_path_factory: pytest.TempPathFactory, qwen_vae_dir: Path) -> Path:
    """The tiny Qwen-Image trained from scratch for 4 steps (its Qwen2.5-VL built from the captions), at a rate that
    moves its zeroed modulations far enough for the prompt to matter (guidance then changes the images)."""
    fast = ["model.lr=0.01", "model.warmup_steps=0", "trainer.max_steps=4"]
    cfg = _qwen_config(tmp_path_factory.mktemp("qwen"), qwen_vae_dir, "run_name=qwen", *fast)
    train_run(cfg)
    return Path(cfg.run_dir) / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def qwen_export(qwen_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("qwen-export") / "pipeline"
    sample_run(compose_config("sample", [f"ckpt={qwen_ckpt}", f"export={folder}", "steps=3"]))
    return folder


def _images(folder: Path, checkpoint: Path, guidance_scale: float, perturb: float = 0.0) -> tuple[torch.Tensor, ...]:
    """PROMPTS' images (3 steps) drawn by lightdiff from the checkpoint (the scheduler sample.py makes for it) and by
    plain diffusers from the exported QwenImagePipeline, from seeds 0 and 1; guidance as the pipeline's true CFG
    (`negative_prompt=""`). `perturb`: Gaussian noise of that sigma on the exported transformer (the mutation
    control)."""
    pipeline = QwenImagePipeline.from_pretrained(folder)
    if perturb:
        perturb_weights(pipeline.transformer, perturb)
    ours = drawn_from_checkpoint(checkpoint, {"text": PROMPTS}, guidance_scale)
    guidance = {"true_cfg_scale": guidance_scale, "negative_prompt": ""} if guidance_scale > 1 else {}
    theirs = pipeline(
        prompt=PROMPTS, height=16, width=16, num_inference_steps=3, max_sequence_length=16, output_type="pt",
        generator=[torch.Generator().manual_seed(seed) for seed in (0, 1)], **guidance,
    ).images  # fmt: skip
    return ours, theirs


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0], ids=["unguided", "true_cfg"])
def test_qwen_image_trains_and_exports_a_pipeline_that_plain_diffusers_reproduces(
    qwen_ckpt: Path, qwen_export: Path, guidance_scale: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The export is a QwenImagePipeline (the tokenizer built here, the Qwen2.5-VL, the VAE) that draws lightdiff's
    images from the checkpoint, unguided and with true CFG (its per-token norm rescale); with its transformer
    perturbed, or guided without the rescale, it does not (the controls)."""
    meta = load_checkpoint_file(qwen_ckpt)["lightdiff"]
    assert meta["conditioning"]["family"] == "qwen_text" and meta["vae_class"] == "AutoencoderKLQwenImage"
    index = json.loads((qwen_export / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImagePipeline" and index["tokenizer"][1] == "Qwen2Tokenizer"
    ours, theirs = _images(qwen_export, qwen_ckpt, guidance_scale)
    assert theirs.shape == ours.shape == (2, 3, 16, 16)
    assert (theirs - ours).abs().max() < 1e-4
    assert (theirs[0] - theirs[1]).abs().max() > 1e-2  # control: two seeds' images are far apart at this scale
    ours, theirs = _images(qwen_export, qwen_ckpt, guidance_scale, perturb=0.05)
    assert (theirs - ours).abs().max() > 1e-3
    if guidance_scale > 1:  # control: plain CFG, without the pipeline's norm rescale, draws other images
        monkeypatch.setattr(type(QWEN), "guided", Family.guided)
        ours, theirs = _images(qwen_export, qwen_ckpt, guidance_scale)
        assert (theirs - ours).abs().max() > 1e-3


def test_qwen_text_is_the_pipelines_encode_prompt(qwen_export: Path) -> None:
    """The tokenizer built from the captions splits the template's system prefix into QwenImagePipeline's 34 tokens;
    QwenText's states are the pipeline's prompt embeddings (past each prompt's length: zero, and masked), and the
    control without the drop differs."""
    text = load_trained(qwen_export).conditioning
    assert isinstance(text, QwenText)
    assert len(text.tokenizer(QWEN_TEMPLATE.split("{}")[0]).input_ids) == QWEN_DROP_TOKENS
    pipeline = QwenImagePipeline.from_pretrained(qwen_export)
    with torch.no_grad():
        ours = text(dict(text=PROMPTS))
        theirs, mask = pipeline.encode_prompt(PROMPTS, max_sequence_length=16)
    states, our_mask = ours.kwargs["encoder_hidden_states"], ours.kwargs["encoder_hidden_states_mask"]
    length = theirs.shape[1]
    assert torch.equal(our_mask[:, :length], mask.bool()) and not our_mask[:, length:].any()
    assert torch.allclose(states[:, :length], theirs, atol=1e-6) and not states[:, length:].any()
    assert not mask.all() and not states[~our_mask].any()  # a shorter prompt's padding: masked and zero
    pipeline.prompt_template_encode_start_idx = 0  # control: the system prefix kept
    with torch.no_grad():
        kept = pipeline.encode_prompt(PROMPTS, max_sequence_length=16)[0]
    assert kept.shape[1] != length or (kept - theirs).abs().max() > 1e-3


def test_a_new_qwen_transformer_starts_with_identity_blocks() -> None:
    """QwenImage.initialise zeroes every block's image and text modulation: each block returns its input tokens;
    diffusers' random initialisation does not (the control)."""
    torch.manual_seed(0)
    net = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
    )  # fmt: skip
    inputs = {
        "timestep": torch.tensor([0.5]),
        "encoder_hidden_states": torch.randn(1, 5, 32),
        "encoder_hidden_states_mask": torch.ones(1, 5, dtype=torch.bool),
        "img_shapes": [[(1, 4, 4)]],
    }
    x = torch.randn(1, 16, 16)

    def block_changes(net: QwenImageTransformer2DModel) -> list[float]:
        changes: list[float] = []

        def record(module, args, kwargs, out) -> None:
            text, image = out
            changes.append(float((image - kwargs["hidden_states"]).abs().max()))
            changes.append(float((text - kwargs["encoder_hidden_states"]).abs().max()))

        hooks = [block.register_forward_hook(record, with_kwargs=True) for block in net.transformer_blocks]
        with torch.no_grad():
            net(x, **inputs)
        for hook in hooks:
            hook.remove()
        return changes

    assert min(block_changes(net)) > 1e-3
    assert block_changes(QWEN.initialise(net)) == [0.0] * 4
    assert family_of(net) is QWEN and QWEN.token_side(net) == 2 and QWEN.latent_channels(net) == 4


def test_bad_qwen_input_is_named_before_anything_is_written(qwen_vae_dir: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    other_vae = tmp_path / "sd-vae"
    tiny_vae().save_pretrained(other_vae)
    with pytest.raises(ConfigError, match="model.vae: a QwenImageTransformer2DModel learns Qwen-Image's VAE"):
        train_run(_qwen_config(runs, other_vae, "run_name=other-vae", "net.in_channels=16"))
    with pytest.raises(ConfigError, match="net.joint_attention_dim=32 differs from the Qwen2.5-VL encoder's"):
        train_run(_qwen_config(runs, qwen_vae_dir, "run_name=width", "model.text_hidden_size=16"))
    with pytest.raises(ConfigError, match="objective=ddpm: a QwenImageTransformer2DModel \\(qwenimage\\)"):
        train_run(_qwen_config(runs, qwen_vae_dir, "run_name=ddpm", "objective=ddpm"))
    edit = ["model.edit=true", "data=shapes_edit", "data.resolution=16", "data.cache_latents=true"]
    with pytest.raises(ConfigError, match="data.cache_latents=true stores editing sources at the data's size"):
        train_run(_qwen_config(runs, qwen_vae_dir, "run_name=cached-edit", *edit))
    assert not runs.exists() or not any(runs.iterdir())


@pytest.mark.slow  # 8 s: a fine-tuning run on the export
def test_a_qwen_image_folder_fine_tunes_with_its_frozen_encoder(qwen_export: Path, tmp_path: Path) -> None:
    """model.pretrained=<QwenImagePipeline folder>: its Qwen2.5-VL and VAE frozen, its transformer trained."""
    overrides = [f"output_root={tmp_path}", *TINY, *TINY_QWEN_MODEL, f"model.pretrained={qwen_export}"]
    trainer = train_run(compose_config("train", [*overrides, "model.load_pretrained_unet=true", "run_name=tuned"]))
    assert_fine_tune_froze_the_encoder(trainer, QwenImagePipeline.from_pretrained(qwen_export), QwenText)


def test_qwen_image_trains_from_the_latent_cache_without_encoding(
    qwen_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """data.cache_latents with a frozen Qwen2.5-VL: once the cache exists a run encodes no image and no prompt (the
    mask comes from the prompts' token counts)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from .conftest import count_encoded

    calls = count_encoded(monkeypatch, AutoencoderKLQwenImage)
    texts: list[int] = []
    original = Qwen2_5_VLForConditionalGeneration.forward
    monkeypatch.setattr(
        Qwen2_5_VLForConditionalGeneration, "forward", lambda self, *a, **k: texts.append(1) or original(self, *a, **k)
    )
    overrides = [f"output_root={tmp_path}", *TINY, *TINY_QWEN_MODEL, f"model.pretrained={qwen_export}"]
    cache = [f"data.latent_cache_dir={tmp_path / 'cache'}", "data.size=8", "data.cache_latents=true"]
    cache += ["model.load_pretrained_unet=true", "model.cond_drop_prob=0"]
    train_run(compose_config("train", [*overrides, *cache, "run_name=fill"]))
    assert sum(calls) == 8 and texts
    calls.clear(), texts.clear()
    trainer = train_run(
        compose_config("train", [*overrides, *cache, "run_name=cached", "callbacks.samples.final_num_images=0"])
    )
    assert trainer.global_step == 2 and calls == [] and texts == []


@pytest.mark.slow  # 10 s: a LoRA run on the export and two pipelines
def test_lora_on_qwen_image_is_a_diffusers_file_that_its_pipeline_loads(qwen_export: Path, tmp_path: Path) -> None:
    """LoRA on a Qwen-Image base (both streams' attention and MLPs): the export is the base plus diffusers' LoRA file,
    which QwenImagePipeline.load_lora_weights applies so that the pipeline draws lightdiff's images; without it,
    other images (the control)."""
    overrides = [f"output_root={tmp_path}", *TINY, *TINY_QWEN_MODEL, f"model.pretrained={qwen_export}"]
    overrides += ["model.load_pretrained_unet=true", "model.lora.rank=4", "model.lr=0.01", "model.warmup_steps=0"]
    cfg = compose_config("train", [*overrides, "trainer.max_steps=4", "run_name=lora"])
    train_run(cfg)
    checkpoint = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    sample_run(compose_config("sample", [f"ckpt={checkpoint}", f"export={tmp_path / 'export'}"]))
    adapted = ["transformer_blocks.0.txt_mlp.net.0.proj", "transformer_blocks.0.attn.add_k_proj"]
    assert_lora_file_reproduced(
        checkpoint, tmp_path / "export", QwenImagePipeline, PROMPTS, adapted, max_sequence_length=16
    )


# ----- Qwen-Image-Edit ----------------------------------------------------------------------------------------------

EDITS = ["make it red", "move it left"]


def tiny_qwen_edit_vae() -> AutoencoderKLQwenImage:
    """Qwen-Image's VAE at four levels (16x in space): QwenImageEditPipeline resizes every source to about 1024 x 1024,
    which this keeps at 64 x 64 latents (1024 reference tokens); 2 wide (the 1024 x 1024 convolutions are the slow
    part), seeded, statistics far from (0, 1)."""
    torch.manual_seed(0)
    return AutoencoderKLQwenImage(
        base_dim=2, z_dim=4, dim_mult=[1, 1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False] * 4,
        latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[0.5, 1.5, 1.0, 2.0],
    )  # fmt: skip


def _sources() -> list:
    """Two 32 px sources: a red square and a blue circle on black."""
    from PIL import Image, ImageDraw

    images = []
    for shape, colour in (("rectangle", (220, 40, 40)), ("ellipse", (40, 60, 220))):
        image = Image.new("RGB", (32, 32))
        getattr(ImageDraw.Draw(image), shape)((8, 8, 22, 22), fill=colour)
        images.append(image)
    return images


@pytest.fixture(scope="module")
def qwen_edit_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen-Image-Edit trained from scratch for 4 steps on shapes_edit pairs at 32 px (a 2 x 2 latent,
    one token, beside the source's 1024), at a rate that moves it far enough for the source to matter."""
    root = tmp_path_factory.mktemp("qwen-edit")
    vae = root / "vae"
    tiny_qwen_edit_vae().save_pretrained(vae)
    edit = ["model.edit=true", "data=shapes_edit", "data.resolution=32", "data.batch_size=2", f"model.vae={vae}"]
    fast = ["model.lr=0.01", "model.warmup_steps=0", "trainer.max_steps=4", "callbacks.samples.final_num_images=0"]
    cfg = compose_config("train", [f"output_root={root}", *TINY, *TINY_QWEN_MODEL, *edit, *fast, "run_name=edit"])
    train_run(cfg)
    return Path(cfg.run_dir) / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def qwen_edit_export(qwen_edit_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("qwen-edit-export") / "pipeline"
    sample_run(compose_config("sample", [f"ckpt={qwen_edit_ckpt}", f"export={folder}", "steps=3"]))
    return folder


def _edit_pipeline(folder: Path):
    """QwenImageEditPipeline.from_pretrained(folder); without torchvision transformers cannot load a
    Qwen2VLProcessor (it builds a video processor too), so its processor is then read from the same folder's files."""
    import importlib.util

    from diffusers import QwenImageEditPipeline

    from lightdiff.nets.text import load_qwen2_vl_processor

    if importlib.util.find_spec("torchvision") is not None:
        return QwenImageEditPipeline.from_pretrained(folder)
    return QwenImageEditPipeline.from_pretrained(folder, processor=load_qwen2_vl_processor(folder))


def _edits(folder: Path, checkpoint: Path, guidance_scale: float) -> tuple[torch.Tensor, ...]:
    """EDITS of `_sources()` (3 steps, seeds 0 and 1) drawn by lightdiff from the checkpoint, and by plain diffusers
    from the exported QwenImageEditPipeline as it is and with its transformer perturbed by Gaussian noise of sigma
    0.05 (the mutation control), one pair per call (it takes one source); guidance as the pipeline's true CFG."""
    from diffusers.image_processor import VaeImageProcessor

    trained = load_denoiser(checkpoint)
    scheduler, _ = scheduler_for(compose_config("sample", [f"ckpt={checkpoint}"]), trained)  # sample.py's
    sources = _sources()
    inputs = {"text": EDITS, "source_pixel_values": VaeImageProcessor().preprocess(sources)}
    ours = generate(trained.net, scheduler, 3, [0, 1], trained.conditioning, inputs, guidance_scale,
                    vae=trained.vae, size=(32, 32))  # fmt: skip
    guidance = {"true_cfg_scale": guidance_scale, "negative_prompt": ""} if guidance_scale > 1 else {}
    pipeline = _edit_pipeline(folder)
    drawn = []
    for perturb in (0.0, 0.05):
        if perturb:
            perturb_weights(pipeline.transformer, perturb)
        drawn.append(torch.cat([
            pipeline(
                image=source, prompt=edit, height=32, width=32, num_inference_steps=3, output_type="pt",
                generator=torch.Generator().manual_seed(seed), **guidance,
            ).images
            for seed, (source, edit) in enumerate(zip(sources, EDITS))
        ]))  # fmt: skip
    return ours, *drawn


@pytest.mark.slow  # 25-30 s each: every source through the VAE at QwenImageEditPipeline's 1024 x 1024
@pytest.mark.parametrize("guidance_scale", [1.0, 4.0], ids=["unguided", "true_cfg"])
def test_qwen_image_edit_trains_on_pairs_and_exports_a_pipeline_that_plain_diffusers_reproduces(
    qwen_edit_ckpt: Path, qwen_edit_export: Path, guidance_scale: float
) -> None:
    """model.edit=true on a Qwen-Image transformer: the source through Qwen2.5-VL beside the instruction and through
    the VAE as reference tokens. The export is a QwenImageEditPipeline that draws lightdiff's edits from the
    checkpoint, unguided and with true CFG; with its transformer perturbed it does not (the control)."""
    from lightdiff.nets.families.qwenimage import QwenEditText

    meta = load_checkpoint_file(qwen_edit_ckpt)["lightdiff"]
    assert meta["conditioning"]["family"] == "qwen_edit"
    index = json.loads((qwen_edit_export / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImageEditPipeline" and index["processor"] == [
        "transformers",
        "Qwen2VLProcessor",
    ]
    assert isinstance(load_trained(qwen_edit_export).conditioning, QwenEditText)
    ours, theirs, perturbed = _edits(qwen_edit_export, qwen_edit_ckpt, guidance_scale)
    assert theirs.shape == ours.shape == (2, 3, 32, 32)
    assert (theirs - ours).abs().max() < 1e-4
    assert (theirs[0] - theirs[1]).abs().max() > 1e-2  # control: two pairs' edits are far apart at this scale
    assert (perturbed - ours).abs().max() > 1e-3


def test_qwen_edit_text_is_the_edit_pipelines_encode_prompt() -> None:
    """QwenEditText's states are QwenImageEditPipeline's prompt embeddings of the instruction beside its source
    (resized as the pipeline resizes it): the source's vision tokens, then the instruction's, past the 64-token
    prefix, which the tokenizer built from the captions splits as Qwen's does; zero and masked past each row. The
    controls: another source changes the states, and the pipeline without the drop does not match."""
    from diffusers import QwenImageEditPipeline
    from diffusers.image_processor import VaeImageProcessor

    from lightdiff.nets.families.qwenimage import QWEN_EDIT_DROP_TOKENS, QWEN_EDIT_TEMPLATE, QwenEditText
    from lightdiff.nets.text import (
        build_qwen2_tokenizer,
        qwen2_vl_image_processor,
        qwen2_vl_processor,
        qwen_vl_from_scratch,
    )

    tokenizer = build_qwen2_tokenizer(EDITS, [QWEN_EDIT_TEMPLATE])
    torch.manual_seed(0)
    encoder = qwen_vl_from_scratch(tokenizer, 32, 1, 2).eval()
    text = QwenEditText(qwen2_vl_processor(tokenizer, qwen2_vl_image_processor()), encoder, False, 16)
    vae = tiny_qwen_edit_vae()
    text.attach_vae(vae)
    assert len(tokenizer(QWEN_EDIT_TEMPLATE.split("<|vision_start|>")[0]).input_ids) == QWEN_EDIT_DROP_TOKENS
    pipeline = QwenImageEditPipeline(
        scheduler=None, vae=vae, text_encoder=encoder, tokenizer=tokenizer, processor=text.processor, transformer=None
    )
    sources = text.sources(VaeImageProcessor().preprocess(_sources()))
    assert sources[0].size == (1024, 1024)  # calculate_dimensions(1024 * 1024, 1.0)
    with torch.no_grad():
        states, mask = text.encode(EDITS, sources)
        for row, (edit, source) in enumerate(zip(EDITS, sources)):
            theirs = pipeline.encode_prompt(edit, image=source)[0][0]
            length = len(theirs)
            assert torch.allclose(states[row, :length], theirs, atol=1e-5)
            assert mask[row, :length].all() and not mask[row, length:].any() and not states[row, length:].any()
        other = text.encode(EDITS, sources[::-1])[0]
        assert (other - states).abs().max() > 1e-3  # control: the states see the source
        pipeline.prompt_template_encode_start_idx = 0  # control: the system prefix kept
        kept = pipeline.encode_prompt(EDITS[0], image=sources[0])[0][0]
    assert (kept[: len(theirs)] - states[0, : len(theirs)]).abs().max() > 1e-3


@pytest.mark.slow  # 40 s: editing from a text-to-image base, LoRA on the edit export, two pipelines
def test_qwen_image_edit_trains_from_a_base_and_its_lora_is_a_diffusers_file_that_the_edit_pipeline_loads(
    qwen_export: Path, qwen_edit_export: Path, tmp_path: Path
) -> None:
    """model.edit=true from a QwenImagePipeline folder (its tokenizer, Qwen2.5-VL's image processor) trains an
    editing model; an editing folder without model.edit=true is refused by name. LoRA on the edit export is the base
    plus diffusers' LoRA file, which QwenImageEditPipeline.load_lora_weights applies so that the pipeline draws
    lightdiff's edits; without it, other edits (the control)."""
    from diffusers.image_processor import VaeImageProcessor

    from lightdiff.nets.families.qwenimage import QwenEditText

    vae = tmp_path / "vae"
    tiny_qwen_edit_vae().save_pretrained(vae)
    pairs = ["model.edit=true", "data=shapes_edit", "data.resolution=32", "data.batch_size=2"]
    pairs += ["callbacks.samples.final_num_images=0", "model.load_pretrained_unet=true"]
    base = [f"output_root={tmp_path}", *TINY, *TINY_QWEN_MODEL, *pairs]
    from_base = [f"model.pretrained={qwen_export}", "model.allow_other_vae=true", f"model.vae={vae}"]
    method = train_run(compose_config("train", [*base, *from_base, "run_name=from-base"])).lightning_module
    assert isinstance(method.conditioning, QwenEditText) and not method.conditioning.trainable
    unpaired = [f"output_root={tmp_path}", *TINY, *TINY_QWEN_MODEL, f"model.pretrained={qwen_edit_export}"]
    with pytest.raises(ConfigError, match="is an editing pipeline \\(it has a processor/\\): set model.edit=true"):
        train_run(compose_config("train", [*unpaired, "model.load_pretrained_unet=true", "run_name=unpaired"]))
    lora = ["model.lora.rank=4", "model.lr=0.02", "model.warmup_steps=0", "trainer.max_steps=4", "run_name=lora"]
    cfg = compose_config("train", [*base, f"model.pretrained={qwen_edit_export}", *lora])
    train_run(cfg)
    checkpoint = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    folder = tmp_path / "export"
    sample_run(compose_config("sample", [f"ckpt={checkpoint}", f"export={folder}"]))
    trained = load_denoiser(checkpoint)
    scheduler, _ = scheduler_for(compose_config("sample", [f"ckpt={checkpoint}"]), trained)
    sources = _sources()
    inputs = {"text": EDITS, "source_pixel_values": VaeImageProcessor().preprocess(sources)}
    ours = generate(trained.net, scheduler, 3, [0, 1], trained.conditioning, inputs, 1.0, vae=trained.vae,
                    size=(32, 32))  # fmt: skip
    for with_lora, compare in ((True, lambda d: d < 1e-4), (False, lambda d: d > 1e-3)):  # the base alone: control
        pipeline = _edit_pipeline(folder)
        if with_lora:
            pipeline.load_lora_weights(folder)
        theirs = torch.cat([
            pipeline(image=source, prompt=edit, height=32, width=32, num_inference_steps=3, output_type="pt",
                     generator=torch.Generator().manual_seed(seed)).images
            for seed, (source, edit) in enumerate(zip(sources, EDITS))
        ])  # fmt: skip
        assert compare(float((theirs - ours).abs().max())), with_lora
