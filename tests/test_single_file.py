"""Single-file Stable Diffusion checkpoints (`sample.py export=FILE.safetensors export_format=single_file`,
lightdiff/nets/single_file.py): the file is read back by diffusers' own single-file loader (`from_single_file`, with the
pipeline's configs given, offline) to the very same weights, for SD 1.x, SD 2.x (OpenCLIP) and SDXL layouts, and a
model loaded back draws sample.py's pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lightdiff.config import ConfigError
from lightdiff.nets.single_file import stable_diffusion_single_file
from lightdiff.nets.text import build_caption_tokenizer
from lightdiff.sample import run as sample_run

from .conftest import compose_config, tiny_sd2_unet, tiny_vae


def _same_weights(expected: torch.nn.Module, actual: torch.nn.Module) -> bool:
    a, b = expected.state_dict(), actual.state_dict()
    return set(a) == set(b) and all(torch.equal(a[key], b[key]) for key in a)


def _images(folder: Path, out: Path) -> list[np.ndarray]:
    sample_run(
        compose_config("sample", [f"ckpt={folder}", f"out={out}", "num_images=2", "steps=3", "prompt=a red circle"])
    )
    return [np.asarray(Image.open(path)) for path in sorted(out.glob("0*.png"))]


@pytest.fixture(scope="module")
def sd_files(text_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The session's tiny text model as (a pipeline folder, one original-layout file), both written by sample.py."""
    root = tmp_path_factory.mktemp("single_file")
    folder = sample_run(compose_config("sample", [f"ckpt={text_ckpt}", f"export={root / 'folder'}"]))
    single = root / "model.safetensors"
    sample_run(compose_config("sample", [f"ckpt={text_ckpt}", f"export={single}", "export_format=single_file"]))
    return folder, single


def test_a_trained_model_round_trips_through_one_original_layout_file(
    sd_files: tuple[Path, Path], tmp_path: Path
) -> None:
    folder, single = sd_files
    with safe_open(str(single), framework="pt") as handle:
        keys = set(handle.keys())
    assert (
        "model.diffusion_model.input_blocks.0.0.weight" in keys and "first_stage_model.encoder.conv_in.weight" in keys
    )
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in keys
    original = StableDiffusionPipeline.from_pretrained(folder)
    loaded = StableDiffusionPipeline.from_single_file(str(single), config=str(folder), local_files_only=True)
    for part in ("unet", "vae", "text_encoder"):
        assert _same_weights(getattr(original, part), getattr(loaded, part)), part
    loaded.save_pretrained(tmp_path / "back")  # folder -> single file -> folder
    assert all(
        np.array_equal(a, b)
        for a, b in zip(_images(folder, tmp_path / "a"), _images(tmp_path / "back", tmp_path / "b"), strict=True)
    )
    # negative control: one weight changed in the file is a changed weight after loading
    with safe_open(str(single), framework="pt") as handle:
        state = {key: handle.get_tensor(key) for key in handle.keys()}
    state["model.diffusion_model.out.2.bias"] = state["model.diffusion_model.out.2.bias"] + 1
    save_file(state, str(tmp_path / "changed.safetensors"))
    changed = StableDiffusionPipeline.from_single_file(str(tmp_path / "changed.safetensors"), config=str(folder))
    assert not _same_weights(original.unet, changed.unet)


def test_a_single_file_is_model_pretrained_with_its_configs_offline(
    sd_files: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """model.pretrained=FILE model.pretrained_config=DIR: diffusers' from_single_file makes a pipeline folder once
    (cached), which a run fine-tunes from (and model.teacher=FILE model.teacher_config=DIR distils); a .ckpt of
    tensors loads the same, one needing more unpickling is refused, and a file of another pipeline's shapes, or no
    config, are errors naming the file."""
    from lightdiff.nets.pretrained import as_pipeline_folder
    from lightdiff.train import run as train_run

    from .conftest import TINY

    folder, single = sd_files
    monkeypatch.setenv("LIGHTDIFF_CACHE", str(tmp_path / "cache"))
    made = Path(as_pipeline_folder(str(single), str(folder)))
    assert made.parent == tmp_path / "cache" / "single_file" and as_pipeline_folder(str(single), str(folder)) == str(
        made
    )
    original = StableDiffusionPipeline.from_pretrained(folder)
    for part in ("unet", "vae", "text_encoder"):
        assert _same_weights(getattr(original, part), getattr(StableDiffusionPipeline.from_pretrained(made), part))
    cfg = compose_config(
        "train",
        [f"output_root={tmp_path}", *TINY, "run_name=from_file", "model=latent", f"model.pretrained={single}"]
        + [f"model.pretrained_config={folder}", "model.load_pretrained_unet=true", "model.vae=null"],
    )
    module = train_run(cfg).lightning_module
    # The file's weights, not one config value: its frozen text encoder and VAE as they are, and its UNet two small
    # optimiser steps away (a new UNet would be far from it everywhere).
    assert _same_weights(original.text_encoder, module.conditioning.text_encoder)
    assert _same_weights(original.vae, module.vae)
    pairs = zip(original.unet.state_dict().values(), module.net.state_dict().values(), strict=True)
    assert max(float((a - b).abs().max()) for a, b in pairs) < 0.01
    turbo = compose_config(
        "train",
        [f"output_root={tmp_path}", *TINY, "run_name=turbo_from_file", "model=turbo", f"model.teacher={single}"]
        + [f"model.teacher_config={folder}", "trainer.max_steps=1"],
    )
    assert _same_weights(original.unet, train_run(turbo).lightning_module.teacher.net)  # model.teacher=FILE too

    with safe_open(str(single), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    torch.save({"state_dict": tensors}, tmp_path / "model.ckpt")  # the original .ckpt layout: tensors only
    from_ckpt = Path(as_pipeline_folder(str(tmp_path / "model.ckpt"), str(folder)))
    assert _same_weights(original.unet, StableDiffusionPipeline.from_pretrained(from_ckpt).unet)
    torch.save({"state_dict": tensors, "callback": Path("x")}, tmp_path / "pickled.ckpt")  # an object to unpickle
    with pytest.raises(ConfigError, match="pickled.ckpt' cannot be read as tensors only"):
        as_pipeline_folder(str(tmp_path / "pickled.ckpt"), str(folder))
    with pytest.raises(ConfigError, match="is a single file: give the pipeline"):
        as_pipeline_folder(str(single), None)
    other = tmp_path / "other"
    StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=_clip(32, "gelu"),
        tokenizer=original.tokenizer,
        unet=tiny_sd2_unet(),
        scheduler=DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(other)
    with pytest.raises(ConfigError, match="model.safetensors' does not load as the StableDiffusionPipeline"):
        as_pipeline_folder(str(single), str(other))
    save_file({"unknown.weight": torch.zeros(3)}, str(tmp_path / "unknown.safetensors"))  # no known layout
    del tensors["model.diffusion_model.out.2.bias"]  # one weight short: never a partly random network
    save_file(tensors, str(tmp_path / "short.safetensors"))
    for name in ("unknown", "short"):
        with pytest.raises(ConfigError, match=f"{name}.safetensors' does not load as"):
            as_pipeline_folder(str(tmp_path / f"{name}.safetensors"), str(folder))
    assert len(list((tmp_path / "cache" / "single_file").iterdir())) == 2  # nothing half-written for the refused


def _clip(width: int, act: str, projection: bool = False) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=1000,  # above every id of the caption tokenizer
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=8,
        hidden_act=act,
        projection_dim=width,
    )
    torch.manual_seed(width)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def test_sd2_and_sdxl_layouts_round_trip_with_their_openclip_encoders(tmp_path: Path) -> None:
    """SD 2.x's OpenCLIP encoder (told by its GELU) under cond_stage_model.model. with q / k / v joined; SDXL's CLIP-L
    and OpenCLIP-bigG-shaped encoders (of other widths, as the real ones are) under conditioner.embedders.0 / .1."""
    tokenizer = build_caption_tokenizer(["a red circle", "a blue square"] * 5, vocab_size=300, model_max_length=8)
    sd2 = StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=_clip(32, "gelu"),
        tokenizer=tokenizer,
        unet=tiny_sd2_unet(),
        scheduler=DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    sd2_config = {key: value for key, value in tiny_sd2_unet().config.items() if not key.startswith("_")}
    sdxl_unet = UNet2DConditionModel(
        **{
            **sd2_config,
            "cross_attention_dim": 16 + 24,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 4,
            "projection_class_embeddings_input_dim": 6 * 4 + 24,
        }
    )
    sdxl = StableDiffusionXLPipeline(
        vae=tiny_vae(),
        text_encoder=_clip(16, "quick_gelu"),
        text_encoder_2=_clip(24, "gelu", projection=True),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=sdxl_unet,
        scheduler=DDIMScheduler(),
        add_watermarker=False,
    )
    for name, pipeline, parts, key in (
        (
            "sd2",
            sd2,
            ("unet", "vae", "text_encoder"),
            "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight",
        ),
        (
            "sdxl",
            sdxl,
            ("unet", "vae", "text_encoder", "text_encoder_2"),
            "conditioner.embedders.1.model.text_projection",
        ),
    ):
        pipeline.save_pretrained(tmp_path / name)
        encoders = [getattr(pipeline, part) for part in parts if part.startswith("text_encoder")]
        state = stable_diffusion_single_file(pipeline.unet, pipeline.vae, encoders)
        assert key in state
        save_file(state, str(tmp_path / f"{name}.safetensors"))
        loaded = type(pipeline).from_single_file(
            str(tmp_path / f"{name}.safetensors"), config=str(tmp_path / name), local_files_only=True
        )
        for part in parts:
            assert _same_weights(getattr(pipeline, part), getattr(loaded, part)), (name, part)
        loaded.save_pretrained(tmp_path / f"{name}_back")  # and sample.py draws the same from what came back
        shown, again = (
            _images(tmp_path / name, tmp_path / f"{name}_a"),
            _images(tmp_path / f"{name}_back", tmp_path / f"{name}_b"),
        )
        assert all(np.array_equal(a, b) for a, b in zip(shown, again, strict=True))


def test_single_file_export_refuses_what_it_cannot_write(pixel_ckpt: Path, tmp_path: Path) -> None:
    target = tmp_path / "pixel.safetensors"
    with pytest.raises(ConfigError, match="writes Stable Diffusion 1.x / 2.x / SDXL models"):
        sample_run(compose_config("sample", [f"ckpt={pixel_ckpt}", f"export={target}", "export_format=single_file"]))
    assert not target.exists()
    with pytest.raises(ConfigError, match="writes a .safetensors file"):
        sample_run(compose_config("sample", [f"ckpt={pixel_ckpt}", f"export={tmp_path}", "export_format=single_file"]))
