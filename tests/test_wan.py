"""Wan 2.x text-to-video: a WanTransformer3DModel with UMT5 text behind Wan's VAE, trained by flow matching on moving
shapes, sampled to mp4 and exported as a WanPipeline that plain diffusers reproduces from the same seeds; fine-tuning
a Wan folder, the clip latent cache, bad input (tiny models built here, no downloads)."""

import copy
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
from diffusers.utils import load_video

from lightdiff.config import ConfigError
from lightdiff.drawing import scheduler_for
from lightdiff.nets.families import Condition, Family, family_of
from lightdiff.nets.families.wan import FAMILY as WAN
from lightdiff.nets.families.wan import UMT5Text, WanExperts
from lightdiff.sample import run as sample_run
from lightdiff.sampling import generate
from lightdiff.train import run as train_run
from lightdiff.trained import load_checkpoint_file, load_denoiser, load_trained

from .conftest import TINY, compose_config, count_encoded, perturb_weights, tiny_video_vae, tiny_wan_vae

PROMPTS = ["a red circle moving left", "a blue square moving up"]

# The tiny Wan (model=video net=wan_tiny) for tiny_wan_vae: 9-frame clips of 16 px, a 1-layer transformer of width
# 24 over 1 x 2 x 2 patches of its 4 latent channels, a 1-layer, 16-wide UMT5 of 8 tokens, rectified flow.
TINY_WAN_MODEL = [
    "model=video",
    "net=wan_tiny",
    "objective=flow_matching",
    "data.num_frames=9",
    "net.in_channels=4",
    "net.out_channels=4",
    "net.num_layers=1",
    "net.num_attention_heads=2",
    "net.attention_head_dim=12",
    "net.text_dim=16",
    "net.ffn_dim=32",
    "net.freq_dim=32",
    "model.text_layers=1",
    "model.text_heads=2",
    "model.max_sequence_length=8",
]


@pytest.fixture(scope="module")
def wan_vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("wan-vae") / "vae"
    tiny_wan_vae().save_pretrained(folder)
    return folder


def _wan_config(root: Path, vae: Path | None, *overrides: str):
    return compose_config("train", [f"output_root={root}", *TINY, *TINY_WAN_MODEL, f"model.vae={vae}", *overrides])


@pytest.fixture(scope="module")
def wan_ckpt(tmp_path_factory: pytest.TempPathFactory, wan_vae_dir: Path) -> Path:
    """The tiny Wan trained from scratch for 2 steps (UMT5 built from the captions)."""
    cfg = _wan_config(tmp_path_factory.mktemp("wan"), wan_vae_dir, "run_name=wan")
    train_run(cfg)
    return Path(cfg.run_dir) / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def wan_export(wan_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("wan-export") / "pipeline"
    sample_run(compose_config("sample", [f"ckpt={wan_ckpt}", f"export={folder}", "steps=3"]))
    return folder


def _clips(
    folder: Path,
    checkpoint: Path,
    seeds: list[int],
    perturb: float = 0.0,
    lora: bool = False,
    steps: int = 3,
    guidance_scale: float = 4.0,
    perturbed: str = "transformer",
) -> tuple[torch.Tensor, ...]:
    """PROMPTS' clips (`steps`, `guidance_scale`) drawn by lightdiff from the trained checkpoint (its weights and the
    scheduler sample.py makes for it) and by plain diffusers from the exported WanPipeline folder, from the same
    seeds. `perturb`: Gaussian noise of that sigma on the weights of the exported `perturbed` part (the mutation
    control); `lora`: the folder's LoRA file loaded into the pipeline (`load_lora_weights`)."""
    pipeline = WanPipeline.from_pretrained(folder)
    if lora:
        pipeline.load_lora_weights(folder)
    if perturb:
        perturb_weights(getattr(pipeline, perturbed), perturb)
    trained = load_denoiser(checkpoint)
    scheduler, _ = scheduler_for(compose_config("sample", [f"ckpt={checkpoint}"]), trained)  # sample.py's
    inputs, clip = {"text": PROMPTS}, {"vae": trained.vae, "size": (16, 16), "num_frames": 9}
    ours = generate(trained.net, scheduler, steps, seeds, trained.conditioning, inputs, guidance_scale, **clip)
    theirs = pipeline(
        prompt=PROMPTS,
        num_frames=9,
        height=16,
        width=16,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        generator=[torch.Generator().manual_seed(seed) for seed in seeds],
        output_type="pt",
        max_sequence_length=8,
    ).frames
    return ours, theirs


def test_wan_trains_samples_mp4_and_exports_to_wan_pipeline(
    wan_ckpt: Path, wan_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    meta = load_checkpoint_file(wan_ckpt)["lightdiff"]
    assert meta["num_frames"] == 9 and meta["vae_class"] == "AutoencoderKLWan"
    assert meta["conditioning"]["family"] == "umt5_text" and meta["objective"]["name"] == "flow_matching"
    out = tmp_path / "samples"
    sample_run(compose_config("sample", [f"ckpt={wan_ckpt}", f"out={out}", "num_images=2", "steps=2"]))
    records = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in records] == ["000000.mp4", "000001.mp4"] and records[0]["num_frames"] == 9
    frames = load_video(str(out / "000001.mp4"))
    assert len(frames) == 9 and frames[0].size == (16, 16)

    recorded = json.loads((wan_export / "lightdiff.json").read_text())
    assert recorded["num_frames"] == 9 and recorded["max_sequence_length"] == 8
    index = json.loads((wan_export / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline" and index["text_encoder"][1] == "UMT5EncoderModel"
    ours, theirs = _clips(wan_export, wan_ckpt, [0, 1])
    assert theirs.shape == ours.shape == (2, 9, 3, 16, 16)
    assert (theirs - ours).abs().max() < 1e-4
    assert (theirs[0] - theirs[1]).abs().max() > 1e-2  # control: two seeds' clips are far apart at this scale
    # Mutation control: an export whose transformer weights were perturbed (sigma 0.05) fails the comparison.
    ours, theirs = _clips(wan_export, wan_ckpt, [0, 1], perturb=0.05)
    assert (theirs - ours).abs().max() > 1e-3
    # Control of the noise layout: drawn in lightdiff's (F, C, H, W) order, a seed is another clip than WanPipeline's.
    monkeypatch.setattr(type(WAN), "initial_noise", Family.initial_noise)
    ours, theirs = _clips(wan_export, wan_ckpt, [0, 1])
    assert (theirs - ours).abs().max() > 1e-2


def test_umt5_text_is_wan_encode_prompt(wan_export: Path) -> None:
    """UMT5 under the attention mask, zero past each prompt's tokens: WanPipeline.encode_prompt to the bit; without
    the mask (as CogVideoX's T5Text encodes) the states differ."""
    text = load_trained(wan_export).conditioning
    assert isinstance(text, UMT5Text) and text.max_sequence_length == 8
    pipeline = WanPipeline.from_pretrained(wan_export)
    prompts = [*PROMPTS, ""]
    with torch.no_grad():
        ours = text.encode(prompts)
        theirs = pipeline.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=8)[0]
        lengths = [len(text.tokenizer(prompt).input_ids) for prompt in prompts]
        unmasked = text.text_encoder(
            text.tokenizer(prompts, padding="max_length", max_length=8, return_tensors="pt").input_ids
        )
    assert ours.shape == (3, 8, 16) and torch.equal(ours, theirs)
    assert lengths[2] == 1 and ours[2, 1:].abs().max() == 0 and ours[2, 0].abs().max() > 0  # "": </s> alone
    assert all(ours[i, lengths[i] :].abs().max() == 0 for i in range(3) if lengths[i] < 8)
    assert (unmasked.last_hidden_state[2, :1] - ours[2, :1]).abs().max() > 1e-4


def test_a_new_wan_transformer_starts_with_identity_blocks() -> None:
    """Wan.initialise (`zero_adaln_single`): every block returns its input tokens; diffusers' random initialisation
    does not (the control)."""
    torch.manual_seed(0)
    net = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2,
    )  # fmt: skip
    inputs = {"timestep": torch.tensor([500.0]), "encoder_hidden_states": torch.randn(1, 8, 16)}
    x = torch.randn(1, 4, 3, 4, 4)

    def block_changes(net: WanTransformer3DModel) -> list[float]:
        changes: list[float] = []
        hooks = [
            block.register_forward_hook(lambda m, args, out: changes.append(float((out - args[0]).abs().max())))
            for block in net.blocks
        ]
        with torch.no_grad():
            net(x, **inputs)
        for hook in hooks:
            hook.remove()
        return changes

    assert min(block_changes(net)) > 1e-3
    assert block_changes(WAN.initialise(net)) == [0.0, 0.0]
    assert family_of(net) is WAN and WAN.token_side(net) == 2 and len(WAN.blocks(net)) == 2


def test_bad_wan_input_is_named_before_anything_is_written(wan_vae_dir: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    cogvideox_vae = tmp_path / "cogvideox-vae"
    tiny_video_vae().save_pretrained(cogvideox_vae)
    with pytest.raises(ConfigError, match="model.vae: a WanTransformer3DModel learns Wan's VAE"):
        train_run(_wan_config(runs, cogvideox_vae, "run_name=other-vae"))
    with pytest.raises(
        ConfigError, match="objective=ddpm: a WanTransformer3DModel \\(wan\\) is trained with objective=flow"
    ):
        train_run(_wan_config(runs, wan_vae_dir, "run_name=ddpm", "objective=ddpm"))
    with pytest.raises(ConfigError, match="data.num_frames=7: 7 frames must be 4m \\+ 1 \\(e.g. 9\\)"):
        train_run(_wan_config(runs, wan_vae_dir, "run_name=seven", "data.num_frames=7"))
    with pytest.raises(ConfigError, match="net.text_dim=16 differs from the UMT5 encoder's d_model=32"):
        train_run(_wan_config(runs, wan_vae_dir, "run_name=width", "model.text_hidden_size=32"))
    assert not runs.exists()
    # without model.vae (nor model.pretrained): the moving-shapes Wan VAE lightdiff ships
    shipped = compose_config("train", [f"output_root={runs}", *TINY, *TINY_WAN_MODEL]).model.vae
    assert Path(shipped).name == "vae_moving_shapes_wan" and (Path(shipped) / "config.json").is_file()


def test_the_wan_vae_trains_on_its_unclamped_decoder_output() -> None:
    """AutoencoderKLWan.decode clamps to [-1, 1]: where a pixel overshoots, no gradient reaches the decoder (the
    control), which stopped a moving-shapes VAE at 14 dB; `decode_for_training` is the same pixels before the clamp."""
    from lightdiff.nets.vae import decode, decode_for_training

    vae = tiny_wan_vae()
    with torch.no_grad():
        vae.decoder.conv_out.bias.fill_(-3.0)  # every pixel far below -1
    latents = torch.randn(1, 4, 3, 4, 4)
    clamped, unclamped = decode(vae, latents), decode_for_training(vae, latents)
    assert clamped.shape == unclamped.shape == (1, 9, 3, 16, 16)
    assert torch.equal(clamped, unclamped.clamp(-1, 1)) and unclamped.max() < -1
    clamped.sum().backward()
    assert vae.decoder.conv_out.bias.grad.abs().max() == 0  # the control: the clamp passes nothing back
    vae.zero_grad()
    decode_for_training(vae, latents).sum().backward()
    assert vae.decoder.conv_out.bias.grad.abs().min() > 0


@pytest.mark.slow  # 6 s: a fine-tuning run on the export
def test_a_wan_folder_fine_tunes_with_its_frozen_umt5(wan_export: Path, tmp_path: Path) -> None:
    """model.pretrained=<WanPipeline folder>: its UMT5 and VAE frozen, its transformer trained."""
    overrides = [f"output_root={tmp_path}", *TINY, *TINY_WAN_MODEL, f"model.pretrained={wan_export}"]
    cfg = compose_config("train", [*overrides, "model.load_pretrained_unet=true", "run_name=tuned"])
    trainer = train_run(cfg)
    method, base = trainer.lightning_module, WanPipeline.from_pretrained(wan_export)
    text = method.conditioning
    assert isinstance(text, UMT5Text) and not text.trainable and isinstance(method.vae, AutoencoderKLWan)
    for ours, theirs in ((text.text_encoder, base.text_encoder), (method.vae, base.vae)):
        assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))
    moved = [not torch.equal(a, b) for a, b in zip(method.net.parameters(), base.transformer.parameters())]
    assert any(moved)  # control: the transformer did train


def test_wan_trains_from_the_clip_latent_cache_without_encoding(
    wan_vae_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """data.cache_latents with Wan's VAE and UMT5: once the cache exists a run encodes no clip."""
    calls = count_encoded(monkeypatch, AutoencoderKLWan)
    cache = [f"data.latent_cache_dir={tmp_path / 'cache'}", "data.size=8", "data.cache_latents=true"]
    train_run(_wan_config(tmp_path, wan_vae_dir, "run_name=fill", *cache))
    assert sum(calls) == 8 and len(list((tmp_path / "cache").glob("latents-*.pt"))) == 1  # every clip once
    calls.clear()
    trainer = train_run(_wan_config(tmp_path, wan_vae_dir, "run_name=cached", *cache))
    assert trainer.global_step == 2 and calls == []


def test_autoencoder_stage_trains_a_wan_vae_and_writes_its_channel_statistics(tmp_path: Path) -> None:
    """video_vae@model.video_vae=wan: the run writes each latent channel's mean and std, which normalise the training
    clips' latents to about (0, 1) per channel; the VAE's default statistics (Wan 2.1's) do not (the control)."""
    from lightdiff.data.moving_shapes import MovingShapesDataset
    from lightdiff.nets.pretrained import load_vae
    from lightdiff.nets.vae import encode_latents

    overrides = [f"output_root={tmp_path}", *TINY, "model=autoencoder", "data=moving_shapes", "data.num_frames=9"]
    overrides += ["video_vae@model.video_vae=wan", "model.video_vae.base_dim=8", "model.video_vae.z_dim=4"]
    cfg = compose_config("train", [*overrides, "run_name=wan-vae"])
    train_run(cfg)
    checkpoint = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    sample_run(compose_config("sample", [f"ckpt={checkpoint}", f"export={tmp_path / 'vae'}"]))
    vae = load_vae(None, str(tmp_path / "vae"))
    assert isinstance(vae, AutoencoderKLWan) and len(vae.config.latents_mean) == len(vae.config.latents_std) == 4
    clips = torch.stack([item["pixel_values"] for item in MovingShapesDataset(size=32, resolution=16, num_frames=9)])
    torch.manual_seed(0)
    channels = encode_latents(vae, clips).transpose(0, 2).flatten(1)  # (B, F, C, h, w) -> (C, ...)
    assert channels.mean(1).abs().max() < 0.25 and (channels.std(1) - 1).abs().max() < 0.25
    vae.register_to_config(latents_mean=AutoencoderKLWan().config.latents_mean[:4], latents_std=[1.0] * 4)
    torch.manual_seed(0)
    default = encode_latents(vae, clips).transpose(0, 2).flatten(1)
    assert (default.mean(1).abs().max() > 0.25) or ((default.std(1) - 1).abs().max() > 0.25)


# Image-to-video, Wan 2.1's layout (net=wan_i2v_tiny with CLIP image tokens): 4 noisy + 4 mask + 4 frame channels,
# a 1-layer, 8-wide CLIP of 16 px frames in 4 px patches, UMT5 at the 512 tokens the I2V attention splits after.
TINY_WAN_I2V = [
    "net=wan_i2v_tiny",
    "net.in_channels=12",
    "net.image_dim=8",
    "model.max_sequence_length=512",
    "model.first_frame.encoder_layers=1",
    "model.first_frame.encoder_heads=2",
    "model.first_frame.encoder_patch_size=4",
]


def _first_frames(count: int) -> tuple[torch.Tensor, list]:
    """The first frames of moving-shapes clips 0..count-1: as lightdiff takes them ((B, 3, H, W) in [-1, 1], as
    sample.py reads an image) and as PIL images, for the pipeline."""
    from PIL import Image

    from lightdiff.data.moving_shapes import MovingShapesDataset

    data = MovingShapesDataset(size=count, resolution=16, num_frames=9)
    pixels = [((data[i]["pixel_values"][0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8) for i in range(count)]
    images = [Image.fromarray(frame.permute(1, 2, 0).numpy()) for frame in pixels]
    return torch.stack(pixels).float() / 127.5 - 1, images


def _i2v_clips(folder: Path, checkpoint: Path, perturb: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two clips (3 steps, guidance 4) from the same first frames and prompts, drawn by lightdiff from the checkpoint
    and by WanImageToVideoPipeline from the export, one clip per pipeline call (it takes one image a call)."""
    from diffusers import WanImageToVideoPipeline

    pipeline = WanImageToVideoPipeline.from_pretrained(folder)
    if perturb:
        perturb_weights(pipeline.transformer, perturb)
    trained = load_denoiser(checkpoint)
    scheduler, _ = scheduler_for(compose_config("sample", [f"ckpt={checkpoint}"]), trained)
    frames, images = _first_frames(2)
    inputs = {"text": PROMPTS, "image": frames}
    clip = {"vae": trained.vae, "size": (16, 16), "num_frames": 9}
    ours = generate(trained.net, scheduler, 3, [0, 1], trained.conditioning, inputs, 4.0, **clip)
    length = json.loads((folder / "lightdiff.json").read_text())["max_sequence_length"]
    theirs = [
        pipeline(
            image=image,
            prompt=prompt,
            num_frames=9,
            height=16,
            width=16,
            num_inference_steps=3,
            guidance_scale=4.0,
            generator=torch.Generator().manual_seed(seed),
            output_type="pt",
            max_sequence_length=length,
        ).frames[0]
        for seed, (image, prompt) in enumerate(zip(images, PROMPTS))
    ]
    return ours, torch.stack(theirs)


# Wan 2.2 A14B's image-to-video layout: the frame's latents and mask channels alone (no CLIP, any text length).
TINY_WAN_22_I2V = ["net=wan_i2v_tiny", "net.in_channels=12"]


@pytest.mark.parametrize(
    "layout",
    [TINY_WAN_I2V, pytest.param(TINY_WAN_22_I2V, marks=pytest.mark.slow)],  # 2.2's: 10 s, in the slow suite
    ids=["wan21_clip", "wan22"],
)
def test_wan_image_to_video_trains_and_exports_to_its_pipeline(
    layout: list[str], wan_vae_dir: Path, tmp_path: Path
) -> None:
    """Wan's image-to-video: the first frame's latents and mask channels (and Wan 2.1's CLIP image tokens); the export
    is a WanImageToVideoPipeline that reproduces lightdiff's clips from the checkpoint, and a perturbed one does not."""
    from diffusers import WanImageToVideoPipeline

    from lightdiff.nets.families.wan import I2V_FAMILY, WanFirstFrame

    cfg = _wan_config(tmp_path, wan_vae_dir, "run_name=i2v", *layout)
    trainer = train_run(cfg)
    method = trainer.lightning_module
    assert family_of(method.net) is I2V_FAMILY and isinstance(method.conditioning, WanFirstFrame)
    checkpoint = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    folder = tmp_path / "export"
    sample_run(compose_config("sample", [f"ckpt={checkpoint}", f"export={folder}", "steps=3"]))
    with_clip = method.net.config.image_dim is not None
    assert (WanImageToVideoPipeline.from_pretrained(folder).image_encoder is not None) == with_clip
    ours, theirs = _i2v_clips(folder, checkpoint)
    assert theirs.shape == ours.shape == (2, 9, 3, 16, 16)
    assert (theirs - ours).abs().max() < 1e-4
    assert (theirs[0] - theirs[1]).abs().max() > 1e-2  # control: two frames' clips are far apart at this scale
    ours, theirs = _i2v_clips(folder, checkpoint, perturb=0.05)
    assert (theirs - ours).abs().max() > 1e-3  # the mutation control


def test_wan_image_to_video_trains_from_the_latent_cache_with_each_clips_first_frame_condition(
    wan_vae_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """data.cache_latents with Wan 2.2's image-to-video: the first frame's condition (the frame and black frames
    through the VAE, with the mask) is cached per clip beside the latents, equal to the one made
    from the pixels (to float16) and different from clip to clip; once the caches exist a run encodes no clip. Wan
    2.1's CLIP image encoder reads pixels: refused by name."""
    from lightdiff.data.latent_cache import LatentCacheDataset

    calls = count_encoded(monkeypatch, AutoencoderKLWan)
    cache = [f"data.latent_cache_dir={tmp_path / 'cache'}", "data.size=8", "data.cache_latents=true"]
    no_previews = ["callbacks.samples.final_num_images=0"]  # the previews encode their given frames
    train_run(_wan_config(tmp_path, wan_vae_dir, "run_name=fill", *TINY_WAN_22_I2V, *cache, *no_previews))
    assert sum(calls) == 16  # every clip once for its latents, once for its first frame's condition
    assert len(list((tmp_path / "cache").glob("first-frames-*.pt"))) == 1
    calls.clear()
    trainer = train_run(_wan_config(tmp_path, wan_vae_dir, "run_name=cached", *TINY_WAN_22_I2V, *cache, *no_previews))
    assert trainer.global_step == 2 and calls == []
    data, conditioning = trainer.datamodule.dataset, trainer.lightning_module.conditioning
    assert isinstance(data, LatentCacheDataset) and data.first_frames is not None
    clips = torch.stack([trainer.datamodule.source_dataset[index]["pixel_values"] for index in range(2)])
    made = conditioning.first_frame_encoding().encode(clips)
    cached = torch.stack([data[index]["first_frame_condition"] for index in range(2)])
    assert cached.shape == made.shape == (2, 8, 3, 4, 4)  # 4 mask + 4 latent channels, 3 latent frames
    assert (cached - made).abs().max() < 1e-2 and (made[0] - made[1]).abs().max() > 0.1
    with pytest.raises(ConfigError, match="WanFirstFrame reads each clip's first frame in pixels"):
        train_run(_wan_config(tmp_path, wan_vae_dir, "run_name=refused", *TINY_WAN_I2V, *cache))
    assert not (tmp_path / "refused").exists()


def test_an_image_to_video_wan_starts_from_a_text_to_video_folder(wan_export: Path, tmp_path: Path) -> None:
    """model.input_channels: the folder's transformer with its patch embedding widened to the first frame's mask and
    latents through zero weights computes the text-to-video velocity whatever the frame holds (a random kernel there
    does not: the control); the run reads the folder's UMT5 and VAE, trains, and exports a WanImageToVideoPipeline
    that reproduces its clips from the checkpoint."""
    from lightdiff.nets.families.base import Condition
    from lightdiff.nets.families.wan import I2V_FAMILY, WanFirstFrame

    t2v = WanPipeline.from_pretrained(wan_export).transformer
    wide = WAN.widened_input(t2v, 12)  # 4 noisy latent channels + 4 mask + 4 first-frame latents
    assert family_of(wide) is I2V_FAMILY and wide.config.in_channels == 12
    generator = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, 3, 4, 4, 4, generator=generator)  # (B, F, C, H, W) latents of 9 frames of 16 px
    timesteps, text = torch.tensor([300.0, 700.0]), torch.randn(2, 8, 16, generator=generator)
    frame = torch.randn(2, 8, 3, 4, 4, generator=generator)  # the condition, channels first as the pipeline's
    with torch.no_grad():
        before = WAN.output(t2v, x_t, timesteps, Condition({"encoder_hidden_states": text}))
        condition = Condition({"encoder_hidden_states": text, "condition_latents": frame})
        after = I2V_FAMILY.output(wide, x_t, timesteps, condition)
        assert (after - before).abs().max() < 1e-6 and before.abs().max() > 0.1
        wide.patch_embedding.weight[:, 4:].normal_(generator=generator)  # the control: the frame read from step 0
        assert (I2V_FAMILY.output(wide, x_t, timesteps, condition) - before).abs().max() > 1e-2

    overrides = [f"output_root={tmp_path}", *TINY, *TINY_WAN_MODEL, f"model.pretrained={wan_export}"]
    cfg = compose_config("train", [*overrides, "model.load_pretrained_unet=true", "model.input_channels=12"])
    trainer = train_run(cfg)
    method, base = trainer.lightning_module, WanPipeline.from_pretrained(wan_export)
    assert family_of(method.net) is I2V_FAMILY and isinstance(method.conditioning, WanFirstFrame)
    encoder = method.conditioning.text.text_encoder
    assert all(
        torch.equal(a, b) for a, b in zip(encoder.state_dict().values(), base.text_encoder.state_dict().values())
    )
    final = json.loads((Path(cfg.run_dir) / "final_metrics.json").read_text())
    assert 0.0 <= final["final/motion_first_frame_kept"] <= 1.0  # the previews are judged on their given frames
    checkpoint, folder = Path(cfg.run_dir) / "checkpoints" / "last.ckpt", tmp_path / "export"
    sample_run(compose_config("sample", [f"ckpt={checkpoint}", f"export={folder}", "steps=3"]))
    ours, theirs = _i2v_clips(folder, checkpoint)
    assert (theirs - ours).abs().max() < 1e-4

    def refused(*extra: str) -> str:
        with pytest.raises(ConfigError) as error:
            train_run(compose_config("train", [*overrides, "run_name=refused", *extra]))
        assert not (tmp_path / "refused").exists()
        return str(error.value)

    assert "model.load_pretrained_unet=true" in refused("model.input_channels=12")  # a new net: net.in_channels
    assert "must exceed the pretrained WanTransformer3DModel's 4" in refused(
        "model.load_pretrained_unet=true", "model.input_channels=4"
    )
    with pytest.raises(ConfigError, match="model.input_channels=8: lightdiff widens a pretrained Wan"):
        Family.widened_input(WAN, torch.nn.Linear(1, 1), 8)  # the default of every other family


@pytest.mark.slow  # 10 s: a LoRA run on the export and two pipelines
def test_lora_on_wan_is_written_in_diffusers_format_that_wan_pipeline_loads(wan_export: Path, tmp_path: Path) -> None:
    """LoRA on a Wan base (attention and MLP of every block): the export is the base plus diffusers' LoRA file, which
    WanPipeline.load_lora_weights applies so that the pipeline draws lightdiff's clips; without it, other clips."""
    overrides = [f"output_root={tmp_path}", *TINY, *TINY_WAN_MODEL, f"model.pretrained={wan_export}"]
    overrides += ["model.load_pretrained_unet=true", "model.lora.rank=4", "model.lr=0.01", "model.warmup_steps=0"]
    overrides += ["trainer.max_steps=4", "run_name=lora"]
    cfg = compose_config("train", overrides)
    train_run(cfg)
    checkpoint = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    folder = tmp_path / "export"
    sample_run(compose_config("sample", [f"ckpt={checkpoint}", f"export={folder}"]))
    adapted = load_denoiser(checkpoint)
    adapters = [name for name, _ in adapted.net.named_parameters() if ".lora_A." in name]
    assert any(".ffn.net.0.proj.lora_A." in name for name in adapters)
    assert any(".attn2.to_k.lora_A." in name for name in adapters)
    ours, theirs = _clips(folder, checkpoint, [0, 1], lora=True)
    assert (theirs - ours).abs().max() < 1e-4
    ours, theirs = _clips(folder, checkpoint, [0, 1])  # control: the base alone
    assert (theirs - ours).abs().max() > 1e-3


def _assert_student_export_reproduced(checkpoint: Path, folder: Path, steps: int) -> None:
    """A few-step Wan student's WanPipeline export draws sample.py's clips unguided at `steps`; perturbed: it does
    not."""
    sample_run(compose_config("sample", [f"ckpt={checkpoint}", f"export={folder}"]))
    ours, theirs = _clips(folder, checkpoint, [0, 1], steps=steps, guidance_scale=1.0)
    assert (theirs - ours).abs().max() < 1e-4
    ours, theirs = _clips(folder, checkpoint, [0, 1], perturb=0.05, steps=steps, guidance_scale=1.0)
    assert (theirs - ours).abs().max() > 1e-3


@pytest.mark.slow  # 15 s: a turbo run on the Wan teacher and two pipelines
def test_turbo_distils_a_wan_teacher_into_a_one_step_student(wan_ckpt: Path, tmp_path: Path) -> None:
    """LADD on a Wan teacher: the discriminator reads the teacher's `blocks` (Wan names them so) on whole clips; the
    student exports as a WanPipeline that plain diffusers reproduces in one step, and a perturbed export does not."""
    turbo = [f"output_root={tmp_path}", *TINY, "model=turbo", f"model.teacher={wan_ckpt}", "data=moving_shapes"]
    cfg = compose_config("train", [*turbo, "data.num_frames=9", "model.teacher_steps=2", "run_name=wan-turbo"])
    trainer = train_run(cfg)
    features = trainer.lightning_module.discriminator.backbone
    assert features.blocks == list(features.transformer.blocks)  # Wan's one block: its tokens are the features
    checkpoint = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    meta = load_checkpoint_file(checkpoint)["lightdiff"]
    assert meta["method"] == "turbo" and meta["num_frames"] == 9
    _assert_student_export_reproduced(checkpoint, tmp_path / "export", steps=1)


@pytest.mark.slow  # a DMD2 run on the Wan teacher and two pipelines
def test_dmd2_distils_a_wan_teacher_into_a_two_step_student(wan_ckpt: Path, tmp_path: Path) -> None:
    """DMD2 on a Wan teacher (a flow transformer on clips, with DMD's regression pairs of clips): the classifier reads
    the fake transformer's block tokens of whole clips, the student walks FlowMatchEuler's own steps, and the export
    reproduces sample.py at 2 steps; a perturbed export does not."""
    dmd2 = [f"output_root={tmp_path}", *TINY, "model=dmd2", f"model.teacher={wan_ckpt}", "data=moving_shapes"]
    extra = ["data.num_frames=9", "model.teacher_steps=2", "model.fake_updates=1", "run_name=wan-dmd2"]
    regression = ["model.student_steps=2", "model.regression_pairs=2"]  # DMD's pairs (on by default) are clips here
    module = train_run(compose_config("train", [*dmd2, *extra, *regression])).lightning_module
    assert module.classifier.backbone.transformer is module.fake_net and not module.sampler.fresh_noise
    assert module.pairs is not None and module.pairs.images.shape[:2] == (2, 3)  # 9 frames: 3 latent frames
    checkpoint = tmp_path / "wan-dmd2" / "checkpoints" / "last.ckpt"
    _assert_student_export_reproduced(checkpoint, tmp_path / "export", steps=2)


def test_a_clip_patchgan_judges_each_wan_frame_with_its_neighbours(wan_ckpt: Path, tmp_path: Path) -> None:
    """discriminator=patchgan_video: 3-D convolutions over the student's clean clips, each frame's logits its own (a
    change to the first latent frame leaves the third's untouched: the control that frames are not pooled); ADD on a
    Wan teacher trains with it, and an image PatchGAN is refused for clips by name."""
    from lightdiff.nets.feature_discriminator import ClipPatchFeatures, FeatureDiscriminator

    discriminator = FeatureDiscriminator(ClipPatchFeatures(in_channels=4, base_channels=8), head_channels=16)
    clips = torch.randn(2, 3, 4, 8, 8, generator=torch.Generator().manual_seed(0))  # (B, F, C, H, W)
    none = torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        maps = discriminator.features(clips, none, Condition())
        assert [tuple(m.shape) for m in maps] == [(2, 8, 4, 12), (2, 16, 2, 6)]  # frames side by side
        changed = clips.clone()
        changed[:, 0] += 1.0
        first = discriminator.features(changed, none, Condition())[0]
        assert (first[..., :4] - maps[0][..., :4]).abs().max() > 1e-3  # the changed frame's columns move
        assert torch.equal(first[..., 8:], maps[0][..., 8:])  # the third frame sees frames 2-4 only
    with pytest.raises(ValueError, match=r"judges clips \(B, F, C, H, W\)"):
        discriminator.features(clips[:, 0], none, Condition())

    turbo = [f"output_root={tmp_path}", *TINY, "model=turbo", f"model.teacher={wan_ckpt}", "data=moving_shapes"]
    video = [*turbo, "data.num_frames=9", "model.teacher_steps=2"]
    cfg = compose_config("train", [*video, "discriminator=patchgan_video", "discriminator.backbone.in_channels=4"])
    trainer = train_run(cfg)
    assert isinstance(trainer.lightning_module.discriminator.backbone, ClipPatchFeatures)
    assert trainer.global_step == 2
    with pytest.raises(ConfigError, match="discriminator.backbone=PatchFeatures: a video teacher"):
        train_run(compose_config("train", [*video, "discriminator=patchgan", "run_name=refused"]))
    assert not (tmp_path / "refused").exists()


# ----- Wan 2.2 A14B: two experts ------------------------------------------------------------------------------------


def _tiny_transformer(seed: int) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=32, num_layers=1,
    )  # fmt: skip


def test_wan_experts_send_each_sample_to_the_expert_of_its_timestep() -> None:
    """WanExperts: a sample at timestep >= boundary_ratio * 1000 goes through `transformer`, the rest through
    `transformer_2` (WanPipeline's switch), gradients reach the expert that denoised; the pair rebuilds from its
    config; experts of two architectures are refused."""
    pair = WanExperts(_tiny_transformer(0), _tiny_transformer(1), boundary_ratio=0.875)
    x, text = torch.randn(2, 4, 3, 4, 4), torch.randn(2, 8, 16)
    timesteps = torch.tensor([900.0, 100.0])
    out = pair(x, timestep=timesteps, encoder_hidden_states=text).sample
    with torch.no_grad():
        high = pair.transformer(x[:1], timestep=timesteps[:1], encoder_hidden_states=text[:1]).sample
        low = pair.transformer_2(x[1:], timestep=timesteps[1:], encoder_hidden_states=text[1:]).sample
        swapped = pair.transformer(x[1:], timestep=timesteps[1:], encoder_hidden_states=text[1:]).sample
    assert torch.allclose(out[:1], high, atol=1e-6) and torch.allclose(out[1:], low, atol=1e-6)
    assert (swapped - low).abs().max() > 1e-3  # control: the experts differ, so the routing is what matched
    out.square().mean().backward()
    assert all(
        p.grad is not None for expert in (pair.transformer, pair.transformer_2) for p in expert.proj_out.parameters()
    )
    pair.zero_grad(set_to_none=True)
    pair(x, timestep=torch.tensor([900.0, 950.0]), encoder_hidden_states=text).sample.square().mean().backward()
    assert pair.transformer_2.proj_out.weight.grad is None  # control: high noise alone never calls transformer_2
    assert family_of(pair) is WAN and len(WAN.blocks(pair)) == 2 and pair.config.in_channels == 4
    i2v = [_tiny_transformer(seed) for seed in (2, 3)]
    for expert in i2v:
        expert.register_to_config(in_channels=12)  # Wan 2.2 A14B I2V's layout: latents, mask and first frame
    assert family_of(WanExperts(*i2v, boundary_ratio=0.9)).name == "wan_i2v"
    rebuilt = WanExperts.from_config(dict(pair.config))
    assert rebuilt.boundary_ratio == 0.875 and rebuilt.config == pair.config
    wider = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=32, num_layers=1,
    )  # fmt: skip
    with pytest.raises(ConfigError, match="share one architecture; their configs differ in \\['attention_head_dim'\\]"):
        WanExperts(_tiny_transformer(0), wider)


def test_timesteps_within_draw_training_density_restricted_to_the_range() -> None:
    """`timesteps_within`: every draw lies in [low, high], distributed as training's own timesteps conditioned on the
    range (rejection sampling of `training_example`'s draws agrees); the unrestricted draws fall outside (the
    control). DDPM's integer steps likewise."""
    from lightdiff.diffusion import DDPM, FlowMatching, NoiseSchedule, timesteps_within

    torch.manual_seed(0)
    flow, x0 = FlowMatching(shift=3.0), torch.zeros(20000, 1, 2, 2)
    drawn = timesteps_within(flow, 875.0, 1000.0, x0)
    assert drawn.min() >= 875.0 and drawn.max() <= 1000.0
    everywhere = flow.training_example(x0, torch.randn_like(x0)).timesteps
    assert (everywhere < 875.0).float().mean() > 0.5  # control: training at large mostly lies below the boundary
    kept = everywhere[everywhere >= 875.0]
    # the same conditional density (standard error of the difference of means about 0.5); drawing uniformly over
    # the range instead would put the mean at 937.5, about 19 above
    assert len(kept) > 3000 and abs(float(drawn.mean() - kept.mean())) < 3.0
    assert abs(float(drawn.quantile(0.1) - kept.quantile(0.1))) < 4.0
    ddpm = DDPM(schedule=NoiseSchedule("linear"))
    steps = timesteps_within(ddpm, 0.0, 200.0, x0[:4000])
    assert steps.dtype == torch.long and steps.min() == 0 and steps.max() == 199
    assert abs(float(steps.float().mean()) - 99.5) < 3.0  # uniform over 0..199


@pytest.fixture(scope="module")
def wan_pair(wan_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Wan 2.2 A14B-like folder: the tiny export's transformer as the high-noise expert, a perturbed copy as the
    low-noise `transformer_2`, switched at boundary_ratio 0.875."""
    base = WanPipeline.from_pretrained(wan_export)
    low_noise = copy.deepcopy(base.transformer)
    perturb_weights(low_noise, 0.05)
    parts = {name: getattr(base, name) for name in ("tokenizer", "text_encoder", "vae", "scheduler", "transformer")}
    folder = tmp_path_factory.mktemp("wan-a14b") / "pipeline"
    WanPipeline(**parts, transformer_2=low_noise, boundary_ratio=0.875).save_pretrained(folder)
    shutil.copy(wan_export / "lightdiff.json", folder / "lightdiff.json")  # the clip length and UMT5's tokens
    return folder


def _pair_run(root: Path, pair: Path, name: str, *overrides: str):
    base = [
        f"output_root={root}",
        *TINY,
        *TINY_WAN_MODEL,
        f"model.pretrained={pair}",
        "model.load_pretrained_unet=true",
    ]
    return compose_config("train", [*base, f"run_name={name}", *overrides])


def _same(first: torch.nn.Module, second: torch.nn.Module) -> bool:
    return all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def test_two_wan_experts_train_in_one_run_and_export_a_pipeline_that_samples_with_both(
    wan_pair: Path, tmp_path: Path
) -> None:
    """model.pretrained=<Wan 2.2 A14B folder>: both experts load as one net and train on the whole range; the export
    has `transformer`, `transformer_2` and `boundary_ratio`, and WanPipeline reproduces sample.py's clips from the
    checkpoint (3 steps: t = 1000 on the high-noise expert, 667 and 333 on the low-noise one). Perturbing either
    exported expert breaks the match (the controls: each is used, and each is the trained one)."""
    cfg = _pair_run(
        tmp_path, wan_pair, "both", "objective.shift=3.0", "objective.logit_std=2.0"
    )  # both experts see samples
    method = train_run(cfg).lightning_module
    base = WanPipeline.from_pretrained(wan_pair)
    assert isinstance(method.net, WanExperts) and method.net.trains == "both" and method.timestep_range is None
    assert not _same(method.net.transformer, base.transformer) and not _same(
        method.net.transformer_2, base.transformer_2
    )
    checkpoint = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    folder = tmp_path / "export"
    sample_run(compose_config("sample", [f"ckpt={checkpoint}", f"export={folder}", "steps=3"]))
    index = json.loads((folder / "model_index.json").read_text())
    assert index["transformer_2"] == ["diffusers", "WanTransformer3DModel"] and index["boundary_ratio"] == 0.875
    ours, theirs = _clips(folder, checkpoint, [0, 1])
    assert (theirs - ours).abs().max() < 1e-4
    for part in ("transformer", "transformer_2"):
        ours, theirs = _clips(folder, checkpoint, [0, 1], perturb=0.05, perturbed=part)
        assert (theirs - ours).abs().max() > 1e-3, part


def test_one_wan_expert_trains_on_its_side_of_the_boundary_and_resumes_only_as_itself(
    wan_pair: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """model.train_expert=low_noise: every training timestep lies below the boundary (875), so the high-noise expert,
    frozen, stays the folder's to the bit; the low-noise one trains; the checkpoint rebuilds the pair with its EMA.
    Resuming the run as the other expert is refused (its optimiser state belongs to this one)."""
    import lightdiff.methods.diffusion as diffusion

    drawn: list[torch.Tensor] = []
    draw = diffusion.timesteps_within
    monkeypatch.setattr(diffusion, "timesteps_within", lambda *args: drawn.append(draw(*args)) or drawn[-1])
    cfg = _pair_run(tmp_path, wan_pair, "low", "model.train_expert=low_noise")
    method = train_run(cfg).lightning_module
    base = WanPipeline.from_pretrained(wan_pair)
    assert method.timestep_range == (0.0, 875.0)
    assert len(drawn) == 2 and max(float(t.max()) for t in drawn) < 875.0
    assert _same(method.net.transformer, base.transformer) and not _same(method.net.transformer_2, base.transformer_2)
    checkpoint = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    trained = load_denoiser(checkpoint)
    assert isinstance(trained.net, WanExperts) and trained.net.trains == "low_noise" and trained.uses_ema
    assert _same(trained.net.transformer, base.transformer)
    with pytest.raises(ConfigError, match="trained model.train_expert=low_noise, this config says .*=high_noise"):
        train_run(_pair_run(tmp_path, wan_pair, "low", "model.train_expert=high_noise", "trainer.max_steps=3"))
    resumed = train_run(_pair_run(tmp_path, wan_pair, "low", "model.train_expert=low_noise", "trainer.max_steps=3"))
    assert resumed.global_step == 3


def test_bad_expert_settings_are_named(wan_export: Path, wan_pair: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model.train_expert=high_noise: a WanTransformer3DModel is one network"):
        train_run(_pair_run(tmp_path, wan_export, "one", "model.train_expert=high_noise"))
    with pytest.raises(ConfigError, match="leaves the high_noise expert's side \\[875, 1000\\]"):
        train_run(
            _pair_run(tmp_path, wan_pair, "side", "model.train_expert=high_noise", "model.timestep_range=[500,1000]")
        )
    with pytest.raises(ConfigError, match="model.timestep_range=\\[900, 100\\] must satisfy 0 <= low < high"):
        train_run(_pair_run(tmp_path, wan_pair, "order", "model.timestep_range=[900,100]"))
    assert not (tmp_path / "one").exists() and not (tmp_path / "side").exists()


def _pair_clips(
    folder: Path, checkpoint: Path, lora_files: dict[str, bool], base: Path | None = None
) -> tuple[torch.Tensor, ...]:
    """`_clips` for a pair's LoRA export: the pipeline of `base` (default: `folder`) with each of `folder`'s
    `lora_files` loaded as diffusers documents it (file name -> into transformer_2)."""
    pipeline = WanPipeline.from_pretrained(base or folder)
    for name, second in lora_files.items():
        pipeline.load_lora_weights(folder, weight_name=name, load_into_transformer_2=second)
    trained = load_denoiser(checkpoint)
    scheduler, _ = scheduler_for(compose_config("sample", [f"ckpt={checkpoint}"]), trained)
    clip = {"vae": trained.vae, "size": (16, 16), "num_frames": 9}
    ours = generate(trained.net, scheduler, 3, [0, 1], trained.conditioning, {"text": PROMPTS}, 4.0, **clip)
    theirs = pipeline(
        prompt=PROMPTS, num_frames=9, height=16, width=16, num_inference_steps=3, guidance_scale=4.0,
        generator=[torch.Generator().manual_seed(seed) for seed in (0, 1)], output_type="pt", max_sequence_length=8,
    ).frames  # fmt: skip
    return ours, theirs


@pytest.mark.parametrize(
    "expert", ["low_noise", pytest.param("both", marks=pytest.mark.slow)], ids=["low_noise", "both"]
)  # both: 12 s, in the slow suite
def test_lora_on_wan_experts_writes_a_diffusers_file_per_expert(expert: str, wan_pair: Path, tmp_path: Path) -> None:
    """LoRA on a Wan 2.2 pair: adapters on the experts that train only; the export is the pair plus one diffusers LoRA
    file per adapted expert (the low-noise one's loaded with `load_into_transformer_2=True`), with which WanPipeline
    draws lightdiff's clips; the pipeline without them draws others (the control). sample.py reads the folder back
    with its adapters."""
    from lightdiff.nets.lora import EXPERT_2_LORA_FILE, LORA_WEIGHTS_FILE

    lora = ["model.lora.rank=4", "model.lora.alpha=8", "model.lr=0.01", "model.warmup_steps=0", "trainer.max_steps=3"]
    cfg = _pair_run(tmp_path, wan_pair, "lora", f"model.train_expert={expert}", "objective.shift=3.0", *lora)
    net = train_run(cfg).lightning_module.net
    adapted = {name.split(".")[0] for name, _ in net.named_parameters() if ".lora_A." in name}
    assert adapted == ({"transformer_2"} if expert == "low_noise" else {"transformer", "transformer_2"})
    checkpoint = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    folder = tmp_path / "export"
    sample_run(compose_config("sample", [f"ckpt={checkpoint}", f"export={folder}"]))
    files = {EXPERT_2_LORA_FILE: True} | ({LORA_WEIGHTS_FILE: False} if expert == "both" else {})
    assert sorted(p.name for p in folder.glob("*.safetensors")) == sorted(files)
    ours, theirs = _pair_clips(folder, checkpoint, files)
    assert (theirs - ours).abs().max() < 1e-4
    ours, theirs = _pair_clips(folder, checkpoint, {})  # control: the base pair alone
    assert (theirs - ours).abs().max() > 1e-3
    reread = load_trained(folder).net
    assert {name.split(".")[0] for name, _ in reread.named_parameters() if ".lora_A." in name} == adapted
    if expert == "low_noise":
        _check_comfyui_files(checkpoint, folder, tmp_path)


def _check_comfyui_files(checkpoint: Path, folder: Path, tmp_path: Path) -> None:
    """export_format=comfyui on a pair whose low-noise expert has adapters: one file, `<name>_low_noise`, in Wan's
    original layer names under `diffusion_model.`, with lora_down / lora_up / alpha. diffusers' own reader of such
    files (its converter from the original Wan names) applies it to transformer_2 and the pipeline draws lightdiff's
    clips; with the self-attention's q and k names swapped in the file (a wrong mapping) it does not."""
    from safetensors.torch import load_file, save_file

    target = tmp_path / "comfy" / "wan_lora.safetensors"
    target.parent.mkdir()
    sample_run(compose_config("sample", [f"ckpt={checkpoint}", f"export={target}", "export_format=comfyui"]))
    written = target.with_name("wan_lora_low_noise.safetensors")
    assert sorted(p.name for p in target.parent.iterdir()) == [written.name]
    state = load_file(written)
    assert "diffusion_model.blocks.0.self_attn.q.lora_down.weight" in state
    assert "diffusion_model.blocks.0.ffn.2.lora_up.weight" in state
    assert float(state["diffusion_model.blocks.0.cross_attn.o.alpha"]) == 8.0  # alpha / rank = 2: the scale is read
    assert not any("attn1" in key or "to_q" in key for key in state)
    pipeline_file = {written.name: True}
    ours, theirs = _pair_clips(target.parent, checkpoint, pipeline_file, base=folder)
    assert (theirs - ours).abs().max() < 1e-4
    swapped = {
        key.replace("self_attn.q.", "@").replace("self_attn.k.", "self_attn.q.").replace("@", "self_attn.k."): v
        for key, v in state.items()
    }
    save_file(swapped, written)
    ours, theirs = _pair_clips(target.parent, checkpoint, pipeline_file, base=folder)
    assert (theirs - ours).abs().max() > 1e-3  # control: a wrong name mapping is seen
    with pytest.raises(ConfigError, match="wan_lora_low_noise.safetensors exists"):
        sample_run(compose_config("sample", [f"ckpt={checkpoint}", f"export={target}", "export_format=comfyui"]))


@pytest.mark.skipif(not os.environ.get("COMFYUI_DIR"), reason="COMFYUI_DIR: a ComfyUI checkout (its comfy/ package)")
def test_comfyui_loads_every_key_of_a_wan_lora_file() -> None:
    """ComfyUI's own key mapping (comfy.lora.model_lora_keys_unet + load_lora, run offline on its WanModel of the same
    size, Wan 2.1 image-to-video so the image layers exist) loads every key of lightdiff's `export_format=comfyui`
    tensors, for adapters on every layer lightdiff maps, each patch the shape of the weight it lands on. A diffusers
    name left in the file is reported unloaded (the control). experiments/wan_comfyui_lora records a run."""
    import logging
    import sys
    import types

    from lightdiff.nets.families.wan import ORIGINAL_BLOCK_LAYERS, ORIGINAL_LAYERS, original_layer_name
    from lightdiff.nets.lora import LoraSettings, adapt, comfyui_state_dicts

    for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional", "torchvision.io"):
        sys.modules.setdefault(name, types.ModuleType(name))  # imported by ComfyUI modules these checks never call
    sys.path.insert(0, os.environ["COMFYUI_DIR"])
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.lora
    import comfy.ops
    from comfy.ldm.wan.model import WanModel

    torch.manual_seed(0)
    heads, head_dim, layers = 2, 16, 2
    net = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=36, out_channels=16,
        text_dim=64, freq_dim=32, ffn_dim=64, num_layers=layers, image_dim=1280, added_kv_proj_dim=heads * head_dim,
    )  # fmt: skip
    targets = [*ORIGINAL_BLOCK_LAYERS, *ORIGINAL_LAYERS]
    adapt(net, LoraSettings(rank=4, alpha=8.0, target_modules=targets), base_source="tiny")
    state = comfyui_state_dicts(net, original_layer_name)["transformer"]
    comfy_model = WanModel(
        model_type="i2v", patch_size=(1, 2, 2), in_dim=36, dim=heads * head_dim, ffn_dim=64, freq_dim=32, text_dim=64,
        out_dim=16, num_heads=heads, num_layers=layers, operations=comfy.ops.disable_weight_init,
    )  # fmt: skip
    weights = {f"diffusion_model.{k}": v for k, v in comfy_model.state_dict().items()}

    class Loaded:  # what model_lora_keys_unet reads of a ComfyUI model
        model_config = types.SimpleNamespace(unet_config={})

        def state_dict(self) -> dict[str, torch.Tensor]:
            return weights

    key_map = comfy.lora.model_lora_keys_unet(Loaded(), {})

    def load(lora: dict[str, torch.Tensor]) -> tuple[dict, list[str]]:
        missed: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda record: missed.append(record.getMessage())  # type: ignore[method-assign]
        logging.getLogger().addHandler(handler)
        try:
            return comfy.lora.load_lora(lora, key_map), missed
        finally:
            logging.getLogger().removeHandler(handler)

    patches, missed = load(state)
    layers_adapted = len(state) // 3  # lora_down, lora_up, alpha per layer
    assert layers_adapted == layers * len(ORIGINAL_BLOCK_LAYERS) + len(ORIGINAL_LAYERS)
    assert missed == [] and len(patches) == layers_adapted
    for key, patch in patches.items():
        up, down = patch.weights[0], patch.weights[1]
        assert (up.shape[0], down.shape[1]) == weights[key].shape[:2], key
    renamed = {k.replace("self_attn.q.", "attn1.to_q."): v for k, v in state.items()}  # a diffusers name left in
    _, missed = load(renamed)
    assert any("attn1.to_q" in message for message in missed)
