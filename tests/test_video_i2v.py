"""Image-to-video as Stable Video Diffusion: the EDM objective against diffusers' Euler scheduler, the first-frame
conditioning, training from scratch and from an SVD pipeline folder, sample.py's image input, and
StableVideoDiffusionPipeline export parity (tiny models built here, no downloads)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKLTemporalDecoder,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableVideoDiffusionPipeline,
    UNetSpatioTemporalConditionModel,
)
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from lightdiff.config import ConfigError
from lightdiff.data.moving_shapes import MovingShapesDataset
from lightdiff.diffusion import EDM, Objective, weighted_mse
from lightdiff.diffusion.edm import sigma_of
from lightdiff.drawing import scheduler_for
from lightdiff.sample import run as sample_run
from lightdiff.sampling import frames_grid, generate, to_uint8
from lightdiff.train import run as train_run
from lightdiff.trained import load_checkpoint_file, load_denoiser

from .conftest import TINY, compose_config, perturb_weights, tiny_vae, tiny_video_vae

# A 32/64-channel SVD UNet (its GroupNorms take 32 groups) over tiny_vae's 8 x 8 latents of 16 px frames, a
# 1-layer CLIP image encoder of width 16.
TINY_I2V_MODEL = [
    "model=video_i2v",
    "data.resolution=16",
    "data.num_frames=9",
    "net.sample_size=8",
    "net.num_attention_heads=[2,2]",
    "net.cross_attention_dim=16",
    "net.addition_time_embed_dim=4",
    "net.projection_class_embeddings_input_dim=12",
    "model.first_frame.encoder_width=16",
    "model.first_frame.encoder_layers=1",
    "model.first_frame.encoder_heads=2",
]


def _first_frames(count: int, resolution: int = 16) -> torch.Tensor:
    data = MovingShapesDataset(size=count, resolution=resolution, num_frames=9, seed=5)
    return torch.stack([data[index]["pixel_values"][0] for index in range(count)])


def _exported_clips(
    folder: Path, checkpoint: Path, frames: torch.Tensor, seeds: list[int], size: int, perturb: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips of `frames` at guidance 1 -> 3 over the frames: drawn by lightdiff from the trained checkpoint (its
    weights, the scheduler sample.py makes for it) and by plain diffusers from the exported
    StableVideoDiffusionPipeline folder, one pipeline call per conditioning frame (its image batch is one picture;
    [0, 1] tensors in). `perturb`: noise of that sigma on the exported UNet's weights (a mutation control)."""
    pipeline = StableVideoDiffusionPipeline.from_pretrained(folder)
    if perturb:
        perturb_weights(pipeline.unet, perturb)
    trained = load_denoiser(checkpoint)  # EMA weights where the run kept them, as sample.py exports
    ours = generate(
        trained.net,
        scheduler_for(compose_config("sample", [f"ckpt={checkpoint}"]), trained)[0],  # sample.py's scheduler
        3,
        seeds,
        trained.conditioning,
        {"image": frames},
        3.0,
        vae=trained.vae,
        size=(size, size),
        num_frames=9,
    )
    clips = [
        pipeline(
            image=frame[None] / 2 + 0.5,
            height=size,
            width=size,
            num_frames=9,
            num_inference_steps=3,
            min_guidance_scale=1.0,
            max_guidance_scale=3.0,
            generator=torch.Generator().manual_seed(seed),
            output_type="pt",
        ).frames
        for frame, seed in zip(frames, seeds)
    ]
    return ours, torch.cat(clips)


@pytest.fixture(scope="module")
def i2v_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny image-to-video model trained from scratch for 2 steps (CLIP image encoder built for 16 px)."""
    root = tmp_path_factory.mktemp("i2v")
    tiny_vae().save_pretrained(root / "vae")
    cfg = compose_config(
        "train", [f"output_root={root}", *TINY, *TINY_I2V_MODEL, f"model.vae={root / 'vae'}", "run_name=i2v"]
    )
    train_run(cfg)
    return Path(cfg.run_dir) / "checkpoints" / "last.ckpt"


def test_edm_objective_is_svd_euler_scheduler() -> None:
    """The network input, its timestep and the x_0 of a v output are what EulerDiscreteScheduler (SVD's) computes,
    and the unit-weighted v loss is EDM's lambda(sigma)-weighted x_0 loss."""
    objective = EDM()
    scheduler = objective.scheduler(EulerDiscreteScheduler)
    scheduler.set_timesteps(6)
    x0, noise, output = torch.randn(3, 2, 4, 4, 4), torch.randn(3, 2, 4, 4, 4), torch.randn(3, 2, 4, 4, 4)
    step = 2
    sigma, timestep = scheduler.sigmas[step], scheduler.timesteps[step]
    assert torch.allclose(sigma_of(timestep), sigma, rtol=1e-5)  # c_noise = ln(sigma) / 4
    timesteps = timestep.expand(3)
    x_t = objective.noised(x0, noise, timesteps)
    assert torch.allclose(x_t, scheduler.scale_model_input(x0 + sigma * noise, timestep), atol=1e-6)
    scheduler._step_index = step  # (its step(): the denoised sample of a v output at this sigma)
    expected = scheduler.step(output, timestep, x0 + sigma * noise).pred_original_sample
    assert torch.allclose(objective.predicted_x0(output, x_t, timesteps), expected, atol=1e-5)
    # training: v = alpha eps - s x0, weight 1, equals (sigma^2 + 1) / sigma^2 ||D - x0||^2 per element
    torch.manual_seed(0)
    example = objective.training_example(x0, noise)
    lam = (sigma_of(example.timesteps) ** 2 + 1) / sigma_of(example.timesteps) ** 2
    edm_loss = (
        lam * (objective.predicted_x0(output, example.x_t, example.timesteps) - x0).pow(2).flatten(1).mean(1)
    ).mean()
    assert torch.allclose(weighted_mse(output, example.target, example.weight), edm_loss, rtol=1e-4)
    # the Objective interface inverts itself on clips, at every kind of time a method draws
    assert isinstance(objective, Objective)
    assert torch.allclose(objective.predicted_x0(example.target, example.x_t, example.timesteps), x0, atol=1e-4)
    for times in (objective.uniform_timesteps(3, "cpu"), objective.high_noise_timesteps(3, 1.0, 1.0, "cpu")):
        alpha, s = objective.alpha_sigma(times)
        assert torch.allclose(alpha**2 + s**2, torch.ones(3), atol=1e-6)  # variance-preserving
        assert torch.allclose(
            objective.noised(x0, noise, times), alpha.view(-1, 1, 1, 1, 1) * x0 + s.view(-1, 1, 1, 1, 1) * noise
        )
    with pytest.raises(ConfigError, match="samples with sampler=euler"):
        objective.scheduler(DDIMScheduler)
    with pytest.raises(ConfigError, match="few-step distillation of an objective=edm teacher"):
        objective.student_timesteps(4, None)


@pytest.mark.slow  # 15 s: a training run, sample.py, an export and four pipeline calls
def test_image_to_video_trains_samples_and_exports_to_svd_pipeline(i2v_ckpt: Path, tmp_path: Path) -> None:
    meta = load_checkpoint_file(i2v_ckpt)["lightdiff"]
    assert meta["conditioning"]["family"] == "first_frame" and meta["objective"]["name"] == "edm"
    frame = tmp_path / "frame.png"
    Image.fromarray(to_uint8(_first_frames(1)[0] / 2 + 0.5)).save(frame)
    out = tmp_path / "samples"
    sample_run(
        compose_config("sample", [f"ckpt={i2v_ckpt}", f"out={out}", f"image={frame}", "num_images=2", "steps=3"])
    )
    records = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in records] == ["000000.mp4", "000001.mp4"] and records[0]["image"] == str(frame)
    assert records[0]["sampler"] == "EulerDiscreteScheduler" and records[0]["num_frames"] == 9
    denoiser = load_denoiser(i2v_ckpt)
    scheduler = denoiser.objective.scheduler(EulerDiscreteScheduler)
    scheduler.register_to_config(timestep_spacing="linspace", steps_offset=1)  # sampler=euler as sample.py builds it
    loaded = torch.from_numpy(np.asarray(Image.open(frame).convert("RGB")).copy()).permute(2, 0, 1).float() / 127.5 - 1
    drawn = generate(
        denoiser.net,
        scheduler,
        3,
        [0, 1],
        denoiser.conditioning,
        {"image": loaded[None].expand(2, -1, -1, -1)},
        4.0,
        vae=denoiser.vae,
        size=(16, 16),
        num_frames=9,
    )
    assert np.array_equal(np.asarray(Image.open(out / "grid.png")), np.asarray(frames_grid(to_uint8(drawn))))

    folder = tmp_path / "export"
    sample_run(compose_config("sample", [f"ckpt={i2v_ckpt}", f"export={folder}"]))
    frames = _first_frames(2)
    ours, theirs = _exported_clips(folder, i2v_ckpt, frames, [0, 1], 16)
    assert theirs.shape == ours.shape == (2, 9, 3, 16, 16)
    assert (theirs - ours).abs().max() < 1e-4
    assert (theirs[0] - theirs[1]).abs().max() > 1e-2  # control: two seeds' clips are far apart at this scale
    ours, theirs = _exported_clips(folder, i2v_ckpt, frames, [0, 1], 16, perturb=0.05)
    assert (theirs - ours).abs().max() > 1e-3  # mutation control: an export with perturbed UNet weights fails

    with pytest.raises(ConfigError, match="give image=FILE"):
        sample_run(compose_config("sample", [f"ckpt={i2v_ckpt}", f"out={tmp_path / 'none'}"]))
    with pytest.raises(ConfigError, match="cannot be read as an image"):
        sample_run(compose_config("sample", [f"ckpt={i2v_ckpt}", f"out={tmp_path / 'bad'}", f"image={tmp_path}"]))
    assert not (tmp_path / "none").exists() and not (tmp_path / "bad").exists()


def _tiny_svd_pipeline(folder: Path) -> None:
    """A StableVideoDiffusionPipeline as diffusers' own tests build it, for 32 px frames: SVD's temporal-decoder VAE,
    a CLIP image encoder of 32 px input, the UNet, SVD's scheduler settings."""
    torch.manual_seed(0)
    unet = UNetSpatioTemporalConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=8,
        out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=16,
        num_attention_heads=2,
        num_frames=9,
        projection_class_embeddings_input_dim=12,
        addition_time_embed_dim=4,
    )
    vae = AutoencoderKLTemporalDecoder(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        latent_channels=4,
    )
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=16,
            projection_dim=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            intermediate_size=32,
            patch_size=4,
        )
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        interpolation_type="linear",
        prediction_type="v_prediction",
        sigma_max=700.0,
        sigma_min=0.002,
        steps_offset=1,
        timestep_spacing="leading",
        timestep_type="continuous",
        use_karras_sigmas=True,
    )
    StableVideoDiffusionPipeline(
        vae=vae,
        image_encoder=encoder,
        unet=unet,
        scheduler=scheduler,
        feature_extractor=CLIPImageProcessor(crop_size=32, size=32),
    ).save_pretrained(folder)


@pytest.mark.slow  # 20 s: a 32 px pipeline (its CLIP encoder's size); the from-scratch test covers the rest quickly
def test_svd_pipeline_fine_tunes_and_exports_with_its_temporal_decoder(tmp_path: Path) -> None:
    _tiny_svd_pipeline(tmp_path / "svd")
    overrides = [
        f"output_root={tmp_path}",
        *TINY,
        "model=video_i2v",
        "data.resolution=32",
        "data.num_frames=9",
        f"model.pretrained={tmp_path / 'svd'}",
        "model.load_pretrained_unet=true",
        "model.vae=null",
        "run_name=svd",
    ]
    cfg = compose_config("train", overrides)
    train_run(cfg)
    checkpoint = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    meta = load_checkpoint_file(checkpoint)["lightdiff"]
    assert (
        meta["vae_class"] == "AutoencoderKLTemporalDecoder" and meta["net_class"] == "UNetSpatioTemporalConditionModel"
    )
    folder = tmp_path / "export"
    sample_run(compose_config("sample", [f"ckpt={checkpoint}", f"export={folder}"]))
    ours, theirs = _exported_clips(folder, checkpoint, _first_frames(2, resolution=32), [0, 1], 32)
    assert (theirs - ours).abs().max() < 1e-4  # SVD's VAE decodes each clip's frames together (num_frames)
    tiny_video_vae().save_pretrained(tmp_path / "video-vae")
    with pytest.raises(ConfigError, match="takes a frame-wise VAE"):
        train_run(compose_config("train", [*overrides[:-3], f"model.vae={tmp_path / 'video-vae'}", "run_name=wrong"]))
    assert not (tmp_path / "wrong").exists()
    with pytest.raises(ConfigError, match="first frame in pixels"):  # its conditioning reads the clips' pixels
        train_run(compose_config("train", [*overrides[:-1], "data.cache_latents=true", "run_name=cached"]))
    assert not list((tmp_path / "cached" / "checkpoints").glob("*.ckpt"))
