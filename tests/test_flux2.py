"""FLUX.2 [klein]: a Flux2Transformer2DModel with a Qwen3 text encoder (tokenizer built from the captions, with Qwen3's
chat template; three layers' states side by side) behind FLUX.2's VAE (2x2 patches normalised by its BatchNorm
statistics), trained by flow matching on shapes and exported as a Flux2KleinPipeline that plain diffusers reproduces
from the same seeds (tiny models built here, no downloads)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel

from lightdiff.config import ConfigError
from lightdiff.nets.families import family_of
from lightdiff.nets.families.flux2 import FAMILY as FLUX2
from lightdiff.nets.families.flux2 import Flux2KleinText, out_layers
from lightdiff.nets.vae import decode_latents, latent_channels, normalised_latents, vae_scale_factor
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
    tiny_vae,
)

PROMPTS = ["a red circle", "a blue square in the top left"]

# The tiny FLUX.2 [klein] (model=latent net=flux2_tiny) for tiny_flux2_vae: 16 px images, 8 x 8 latents of 4 channels
# cut into 4 x 4 patches of 16 (16 tokens), one double- and one single-stream block of width 32, a 2-layer, 32-wide
# Qwen3 whose states at layers (1, 1, 1) make 96-wide text of 16 rows.
TINY_FLUX2_MODEL = [
    "model=latent",
    "net=flux2_tiny",
    "objective=flow_matching",
    "net.in_channels=16",
    "net.num_layers=1",
    "net.num_single_layers=1",
    "net.num_attention_heads=2",
    "net.attention_head_dim=16",
    "net.axes_dims_rope=[4,4,4,4]",
    "net.joint_attention_dim=96",
    "model.text_layers=2",
    "model.text_heads=2",
    "model.max_sequence_length=16",
]


def tiny_flux2_vae() -> AutoencoderKLFlux2:
    """FLUX.2's VAE at two levels (2x in space, then its 2x2 patches: 16 px -> 4 x 4 latents of 16 channels), its
    BatchNorm statistics far from (0, 1), seeded."""
    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        block_out_channels=[8, 16], latent_channels=4, norm_num_groups=4, layers_per_block=1, sample_size=16,
    )  # fmt: skip
    vae.bn.running_mean.copy_(torch.linspace(-0.5, 0.5, 16))
    vae.bn.running_var.copy_(torch.linspace(0.25, 4.0, 16))
    return vae


@pytest.fixture(scope="module")
def flux2_vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("flux2-vae") / "vae"
    tiny_flux2_vae().save_pretrained(folder)
    return folder


def _flux2_config(root: Path, vae: Path, *overrides: str):
    return compose_config("train", [f"output_root={root}", *TINY, *TINY_FLUX2_MODEL, f"model.vae={vae}", *overrides])


@pytest.fixture(scope="module")
def flux2_ckpt(tmp_path_factory: pytest.TempPathFactory, flux2_vae_dir: Path) -> Path:
    """The tiny FLUX.2 [klein] trained from scratch for 4 steps (its Qwen3 built from the captions), at a rate that
    moves its zeroed modulations far enough for the prompt to matter (guidance then changes the images)."""
    fast = ["model.lr=0.01", "model.warmup_steps=0", "trainer.max_steps=4"]
    cfg = _flux2_config(tmp_path_factory.mktemp("flux2"), flux2_vae_dir, "run_name=flux2", *fast)
    train_run(cfg)
    return Path(cfg.run_dir) / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def flux2_export(flux2_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("flux2-export") / "pipeline"
    sample_run(compose_config("sample", [f"ckpt={flux2_ckpt}", f"export={folder}", "steps=3"]))
    return folder


def _images(folder: Path, checkpoint: Path, guidance_scale: float, perturb: float = 0.0) -> tuple[torch.Tensor, ...]:
    """PROMPTS' images (3 steps) drawn by lightdiff from the checkpoint (the scheduler sample.py makes for it) and by
    plain diffusers from the exported Flux2KleinPipeline, from seeds 0 and 1, with lightdiff.json's pipeline
    arguments. `perturb`: Gaussian noise of that sigma on the exported transformer (the mutation control)."""
    pipeline = Flux2KleinPipeline.from_pretrained(folder)
    if perturb:
        perturb_weights(pipeline.transformer, perturb)
    recorded = json.loads((folder / "lightdiff.json").read_text())
    ours = drawn_from_checkpoint(checkpoint, {"text": PROMPTS}, guidance_scale)
    theirs = pipeline(
        prompt=PROMPTS, height=16, width=16, num_inference_steps=3, output_type="pt", guidance_scale=guidance_scale,
        max_sequence_length=recorded["max_sequence_length"],
        text_encoder_out_layers=tuple(recorded["text_encoder_out_layers"]),
        generator=[torch.Generator().manual_seed(seed) for seed in (0, 1)],
    ).images  # fmt: skip
    return ours, theirs


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0], ids=["unguided", "guided"])
def test_flux2_klein_trains_and_exports_a_pipeline_that_plain_diffusers_reproduces(
    flux2_ckpt: Path, flux2_export: Path, guidance_scale: float
) -> None:
    """The export is a Flux2KleinPipeline (the tokenizer built here with its chat template, the Qwen3, FLUX.2's VAE)
    that draws lightdiff's images from the checkpoint, unguided and guided; with its transformer perturbed it does
    not (the control)."""
    meta = load_checkpoint_file(flux2_ckpt)["lightdiff"]
    assert meta["conditioning"]["family"] == "flux2_klein_text" and meta["vae_class"] == "AutoencoderKLFlux2"
    index = json.loads((flux2_export / "model_index.json").read_text())
    assert index["_class_name"] == "Flux2KleinPipeline" and index["text_encoder"][1] == "Qwen3ForCausalLM"
    assert json.loads((flux2_export / "lightdiff.json").read_text())["text_encoder_out_layers"] == [1, 1, 1]
    ours, theirs = _images(flux2_export, flux2_ckpt, guidance_scale)
    assert theirs.shape == ours.shape == (2, 3, 16, 16)
    assert (theirs - ours).abs().max() < 1e-4
    assert (theirs[0] - theirs[1]).abs().max() > 1e-2  # control: two seeds' images are far apart at this scale
    ours, theirs = _images(flux2_export, flux2_ckpt, guidance_scale, perturb=0.05)
    assert (theirs - ours).abs().max() > 1e-3


def test_flux2_klein_text_is_the_pipelines_encode_prompt(flux2_export: Path) -> None:
    """Flux2KleinText's states are the pipeline's prompt embeddings at lightdiff.json's layers (every padded row), and
    the control at other layers differs."""
    text = load_trained(flux2_export).conditioning
    assert isinstance(text, Flux2KleinText) and text.layers == (1, 1, 1)
    pipeline = Flux2KleinPipeline.from_pretrained(flux2_export)
    with torch.no_grad():
        ours = text(dict(text=PROMPTS)).kwargs["encoder_hidden_states"]
        theirs, ids = pipeline.encode_prompt(PROMPTS, max_sequence_length=16, text_encoder_out_layers=(1, 1, 1))
        other, _ = pipeline.encode_prompt(PROMPTS, max_sequence_length=16, text_encoder_out_layers=(0, 1, 2))
    assert ours.shape == theirs.shape == (2, 16, 96) and torch.allclose(ours, theirs, atol=1e-6)
    assert (other - theirs).abs().max() > 1e-3
    assert out_layers(36) == (9, 18, 27)  # the rule gives the pipeline's default for klein's 36-layer Qwen3s


def test_flux2_latents_are_the_pipelines_normalised_patches() -> None:
    """A FLUX.2 VAE's lightdiff latents are z cut into 2x2 patches and normalised by its BatchNorm statistics, as
    Flux2KleinPipeline encodes reference images and decodes samples; an AutoencoderKL's are not patched (control)."""
    vae = tiny_flux2_vae().eval()
    z = torch.randn(2, 4, 8, 8)
    ours = normalised_latents(vae, z)
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    theirs = (Flux2KleinPipeline._patchify_latents(z) - mean) / std
    assert ours.shape == (2, 16, 4, 4) and torch.allclose(ours, theirs, atol=1e-6)
    assert latent_channels(vae) == 16 and vae_scale_factor(vae) == 4
    with torch.no_grad():
        pixels = decode_latents(vae, ours)
        expected = vae.decode(Flux2KleinPipeline._unpatchify_latents(theirs * std + mean)).sample
    assert torch.allclose(pixels, expected, atol=1e-5)
    plain = tiny_vae()
    assert normalised_latents(plain, z).shape == z.shape and vae_scale_factor(plain) == 2


def test_a_new_flux2_transformer_starts_with_identity_blocks() -> None:
    """Flux2.initialise zeroes the shared modulations: each block returns its input tokens; diffusers' random
    initialisation does not (the control)."""
    torch.manual_seed(0)
    net = Flux2Transformer2DModel(
        in_channels=16, num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=16,
        joint_attention_dim=96, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
    )  # fmt: skip
    from lightdiff.nets.families.flux2 import token_ids

    image_ids, text_ids = token_ids(1, 4, 4, 5, torch.device("cpu"))
    inputs = dict(
        hidden_states=torch.randn(1, 16, 16), encoder_hidden_states=torch.randn(1, 5, 96), timestep=torch.tensor([0.5]),
        img_ids=image_ids, txt_ids=text_ids, guidance=None,
    )  # fmt: skip

    def block_changes(net: Flux2Transformer2DModel) -> list[float]:
        changes: list[float] = []

        def record(module, args, kwargs, out) -> None:
            before = kwargs["hidden_states"]
            after = out[-1] if isinstance(out, tuple) else out
            changes.append(float((after - before).abs().max()))

        blocks = [*net.transformer_blocks, *net.single_transformer_blocks]
        hooks = [block.register_forward_hook(record, with_kwargs=True) for block in blocks]
        with torch.no_grad():
            net(**inputs)
        for hook in hooks:
            hook.remove()
        return changes

    assert min(block_changes(net)) > 1e-3
    assert block_changes(FLUX2.initialise(net)) == [0.0] * 2
    assert family_of(net) is FLUX2 and FLUX2.token_side(net) == 1 and FLUX2.latent_channels(net) == 16


def test_bad_flux2_input_is_named_before_anything_is_written(flux2_vae_dir: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    other_vae = tmp_path / "sd-vae"
    tiny_vae().save_pretrained(other_vae)
    with pytest.raises(ConfigError, match="model.vae: a Flux2Transformer2DModel learns FLUX.2's VAE"):
        train_run(_flux2_config(runs, other_vae, "run_name=other-vae", "net.in_channels=4"))
    with pytest.raises(ConfigError, match="net.joint_attention_dim=96 differs from 3 x the Qwen3 encoder's"):
        train_run(_flux2_config(runs, flux2_vae_dir, "run_name=width", "model.text_hidden_size=16"))
    with pytest.raises(ConfigError, match="objective=ddpm: a Flux2Transformer2DModel \\(flux2\\)"):
        train_run(_flux2_config(runs, flux2_vae_dir, "run_name=ddpm", "objective=ddpm"))
    assert not runs.exists() or not any(runs.iterdir())


@pytest.mark.slow  # a fine-tuning run on the export
def test_a_flux2_klein_folder_fine_tunes_with_its_frozen_encoder(flux2_export: Path, tmp_path: Path) -> None:
    """model.pretrained=<Flux2KleinPipeline folder>: its Qwen3 and VAE frozen, its transformer trained."""
    overrides = [f"output_root={tmp_path}", *TINY, *TINY_FLUX2_MODEL, f"model.pretrained={flux2_export}"]
    trainer = train_run(compose_config("train", [*overrides, "model.load_pretrained_unet=true", "run_name=tuned"]))
    assert_fine_tune_froze_the_encoder(trainer, Flux2KleinPipeline.from_pretrained(flux2_export), Flux2KleinText)


@pytest.mark.slow  # a LoRA run on the export and two pipelines
def test_lora_on_flux2_klein_is_a_diffusers_file_that_its_pipeline_loads(flux2_export: Path, tmp_path: Path) -> None:
    """LoRA on a FLUX.2 [klein] base (attention, SwiGLU MLPs, the single-stream blocks' fused projections): the export
    is the base plus diffusers' LoRA file, which Flux2KleinPipeline.load_lora_weights applies so that the pipeline
    draws lightdiff's images; without it, other images (the control)."""
    overrides = [f"output_root={tmp_path}", *TINY, *TINY_FLUX2_MODEL, f"model.pretrained={flux2_export}"]
    overrides += ["model.load_pretrained_unet=true", "model.lora.rank=4", "model.lr=0.01", "model.warmup_steps=0"]
    cfg = compose_config("train", [*overrides, "trainer.max_steps=4", "run_name=lora"])
    train_run(cfg)
    checkpoint = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    sample_run(compose_config("sample", [f"ckpt={checkpoint}", f"export={tmp_path / 'export'}"]))
    adapted = [
        "transformer_blocks.0.ff.linear_in",
        "single_transformer_blocks.0.attn.to_qkv_mlp_proj",
        "single_transformer_blocks.0.attn.to_out",
    ]
    assert_lora_file_reproduced(
        checkpoint, tmp_path / "export", Flux2KleinPipeline, PROMPTS, adapted, max_sequence_length=16,
        guidance_scale=1.0, text_encoder_out_layers=(1, 1, 1),
    )  # fmt: skip


# ----- reference images (model.edit=true on pairs) ------------------------------------------------------------------


def test_flux2_klein_trains_on_edit_pairs_through_its_reference_image_path(flux2_vae_dir: Path, tmp_path: Path) -> None:
    """model.edit=true with a FLUX.2 transformer on data=shapes_edit: the source's normalised patches join the noisy
    tokens as reference 0 (time id 10); the export is a Flux2KleinPipeline that, given the source as `image` (at 64 px:
    it refuses smaller references, and a reference's size need not be the target's), draws lightdiff's guided edits
    from the checkpoint; with another source, or the transformer perturbed, it does not (the controls)."""
    from PIL import Image

    from lightdiff.data.shapes_edit import ShapesEditDataset
    from lightdiff.nets.families.flux2 import Flux2KleinEdit
    from lightdiff.sampling import to_uint8

    overrides = ["data=shapes_edit", "data.resolution=16", "model.edit=true", "model.lr=0.02", "model.warmup_steps=0"]
    cfg = _flux2_config(tmp_path, flux2_vae_dir, "run_name=edit", "trainer.max_steps=6", *overrides)
    method = train_run(cfg).lightning_module
    assert isinstance(method.conditioning, Flux2KleinEdit)
    final = json.loads((Path(cfg.run_dir) / "final_metrics.json").read_text())
    assert {"final/edit_accuracy", "final/edit_preservation", "final/edit_right"} <= set(final)
    checkpoint = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    folder = tmp_path / "export"
    sample_run(compose_config("sample", [f"ckpt={checkpoint}", f"export={folder}", "steps=3"]))
    data = ShapesEditDataset(size=2, resolution=16)
    pairs = [data[0], data[1]]
    instructions = [str(pair["text"]) for pair in pairs]

    def upscaled(index: int) -> Image.Image:
        """Pair `index`'s source at 64 px (nearest): the pipeline takes no reference image under 64 px a side."""
        source = to_uint8(pairs[index]["source_pixel_values"][None] / 2 + 0.5)[0]
        return Image.fromarray(source).resize((64, 64), Image.NEAREST)

    def edits(source_index: int, perturb: float = 0.0, drawn_from: int | None = None) -> tuple[torch.Tensor, ...]:
        """Both instructions on pair `source_index`'s source (at 64 px), by lightdiff and by the pipeline (given the
        source of pair `drawn_from`, by default the same)."""
        source = torch.from_numpy(np.asarray(upscaled(source_index))).permute(2, 0, 1).float() / 127.5 - 1
        inputs = {"text": instructions, "source_pixel_values": source.expand(2, -1, -1, -1)}
        ours = drawn_from_checkpoint(checkpoint, inputs, 4.0)
        pipeline = Flux2KleinPipeline.from_pretrained(folder)
        if perturb:
            perturb_weights(pipeline.transformer, perturb)
        theirs = pipeline(
            image=[upscaled(source_index if drawn_from is None else drawn_from)], prompt=instructions, height=16,
            width=16, num_inference_steps=3, guidance_scale=4.0, max_sequence_length=16,
            text_encoder_out_layers=(1, 1, 1), output_type="pt",
            generator=[torch.Generator().manual_seed(seed) for seed in (0, 1)],
        ).images  # fmt: skip
        return ours, theirs

    ours, theirs = edits(0)
    assert theirs.shape == ours.shape == (2, 3, 16, 16) and (theirs - ours).abs().max() < 1e-4
    ours, theirs = edits(0, drawn_from=1)  # control: the source is read
    assert (theirs - ours).abs().max() > 2e-4
    ours, theirs = edits(0, perturb=0.05)
    assert (theirs - ours).abs().max() > 1e-3


def test_flux2_references_take_time_ids_ten_apart() -> None:
    """Reference k's tokens carry time id 10 (k + 1) after the noisy tokens' 0, as Flux2KleinPipeline._prepare_image_ids
    numbers them; two references give two such grids."""
    from lightdiff.nets.families.flux2 import image_ids

    grids = [image_ids(10 * (k + 1), 2, 3, torch.device("cpu")) for k in range(2)]
    theirs = Flux2KleinPipeline._prepare_image_ids([torch.zeros(1, 4, 2, 3), torch.zeros(1, 4, 2, 3)])[0]
    assert torch.equal(torch.cat(grids), theirs)


def test_flux2_klein_edits_train_from_a_latent_cache_of_pairs_without_encoding(
    flux2_vae_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """data.cache_latents on edit pairs encodes every target and its source once; a second run encodes nothing, and
    its reference tokens are the cached sources' modes, as encoding the source now gives them (to float16)."""
    from lightdiff.nets.families.flux2 import Flux2KleinEdit

    from .conftest import count_encoded

    calls = count_encoded(monkeypatch, AutoencoderKLFlux2)
    overrides = ["data=shapes_edit", "data.resolution=16", "model.edit=true", "data.size=8", "data.cache_latents=true"]
    overrides += [f"data.latent_cache_dir={tmp_path / 'cache'}", "callbacks.samples.final_num_images=0"]
    train_run(_flux2_config(tmp_path, flux2_vae_dir, "run_name=fill", *overrides))
    assert sum(calls) == 16  # 8 targets and 8 sources
    calls.clear()
    trainer = train_run(_flux2_config(tmp_path, flux2_vae_dir, "run_name=cached", *overrides))
    assert trainer.global_step == 2 and calls == []
    item, conditioning = trainer.datamodule.dataset[0], trainer.lightning_module.conditioning
    assert isinstance(conditioning, Flux2KleinEdit)
    with torch.no_grad():
        cached = conditioning.reference_latents(
            {"text": ["x"], "source_latent_moments": item["source_latent_moments"][None]}
        )
        pixels = trainer.datamodule.source_dataset[0]["source_pixel_values"][None]
        encoded = conditioning.reference_latents({"text": ["x"], "source_pixel_values": pixels})
    assert cached.shape == encoded.shape == (1, 1, 16, 4, 4) and torch.allclose(
        cached, encoded, atol=2e-3
    )  # float16 cache
