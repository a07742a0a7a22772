"""Video: the moving-shapes data and the video judge, CogVideoX's layouts, schedule and T5 text, text-to-video
training, sampling to mp4 / gif, CogVideoXPipeline export parity, the autoencoder stage on clips, exact resume and
bad input (tiny models built here, no downloads)."""

import functools
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import (
    CogVideoXDDIMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
)
from diffusers.utils import load_video
from omegaconf import DictConfig
from PIL import Image

from lightdiff.callbacks import random_state
from lightdiff.config import ConfigError
from lightdiff.data.moving_shapes import DIRECTIONS, MovingShapesDataset, clip_path
from lightdiff.data.video_folder import VideoFolderDataset
from lightdiff.diffusion import DDPM, NoiseSchedule
from lightdiff.diffusion.schedules import shift_snr
from lightdiff.drawing import scheduler_for
from lightdiff.metrics.motion import first_frame_kept, motion_metric, video_distance
from lightdiff.nets.families import conditioning_from_state
from lightdiff.nets.families.cogvideox import T5Text
from lightdiff.nets.pretrained import load_vae
from lightdiff.nets.text import build_t5_tokenizer, t5_encoder_from_scratch
from lightdiff.nets.vae import decode_latents, encode_latents, posterior_moments
from lightdiff.sample import run as sample_run
from lightdiff.sampling import frames_grid, generate, to_uint8, write_video
from lightdiff.train import run as train_run
from lightdiff.trained import load_checkpoint_file, load_denoiser, load_trained

from .conftest import TINY, TINY_VIDEO_MODEL, compose_config, count_encoded, perturb_weights, tiny_vae, tiny_video_vae
from .test_exact_resume import _assert_same_state

PROMPTS = ["a red circle moving left", "a blue square moving up"]


@pytest.fixture(scope="module")
def video_vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("video-vae") / "vae"
    tiny_video_vae().save_pretrained(folder)
    return folder


def _video_config(root: Path, vae: Path, *overrides: str):
    return compose_config("train", [f"output_root={root}", *TINY, *TINY_VIDEO_MODEL, f"model.vae={vae}", *overrides])


@pytest.fixture(scope="module")
def video_ckpt(tmp_path_factory: pytest.TempPathFactory, video_vae_dir: Path) -> Path:
    """The tiny text-to-video model trained from scratch for 2 steps (T5 built from the captions)."""
    cfg = _video_config(tmp_path_factory.mktemp("video"), video_vae_dir, "run_name=t2v")
    train_run(cfg)
    return Path(cfg.run_dir) / "checkpoints" / "last.ckpt"


def exported_family_states(folder: Path) -> torch.Tensor:
    """PROMPTS' T5 states as CogVideoXPipeline encodes them from `folder` (its own length: the transformer's)."""
    pipeline = CogVideoXPipeline.from_pretrained(folder)
    length = pipeline.transformer.config.max_text_seq_length
    with torch.no_grad():
        return pipeline.encode_prompt(PROMPTS, None, False, max_sequence_length=length, device="cpu")[0]


def _exported_clips(
    folder: Path, checkpoint: Path, steps: int, guidance_scale: float, seeds: list[int], perturb: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """PROMPTS' clips drawn by lightdiff from the trained checkpoint (its weights and the scheduler sample.py makes
    for it) and by plain diffusers from the exported CogVideoXPipeline folder, from the
    same seeds. `perturb`: Gaussian noise of that sigma added to the exported transformer's weights (a mutation
    control: the comparison must then fail)."""
    pipeline = CogVideoXPipeline.from_pretrained(folder)
    if perturb:
        perturb_weights(pipeline.transformer, perturb)
    trained = load_denoiser(checkpoint)  # EMA weights where the run kept them, as sample.py exports
    scheduler, _ = scheduler_for(compose_config("sample", [f"ckpt={checkpoint}"]), trained)  # sample.py's
    ours = generate(
        trained.net,
        scheduler,
        steps,
        seeds,
        trained.conditioning,
        {"text": PROMPTS},
        guidance_scale,
        vae=trained.vae,
        size=(16, 16),
        num_frames=9,
    )
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


def test_moving_shapes_clips_are_pure_functions_of_seed_and_index() -> None:
    data = MovingShapesDataset(size=32, resolution=16, num_frames=9, seed=3)
    item, again = data[7], MovingShapesDataset(size=32, resolution=16, num_frames=9, seed=3)[7]
    assert item["pixel_values"].shape == (9, 3, 16, 16) and torch.equal(item["pixel_values"], again["pixel_values"])
    assert item["text"] == data.class_names[item["label"]] and len(data.captions()) == 96
    assert not torch.equal(item["pixel_values"], data[8]["pixel_values"])
    _, _, direction, side, corners = clip_path(3, 7, 16, 9)
    steps = np.diff(corners, axis=0)
    assert np.allclose(steps, steps[0]) and np.array_equal(np.sign(steps[0]), DIRECTIONS[direction])  # steady, straight
    assert corners.min() >= 0 and corners.max() <= 16 - side  # the shape stays inside the picture
    assert item["text"].endswith(f"moving {clip_path(3, 7, 16, 9)[2]}")
    with pytest.raises(ValueError, match="data.num_frames=1"):
        MovingShapesDataset(num_frames=1)


def test_video_judge_scores_real_clips_high_and_broken_clips_low() -> None:
    data = MovingShapesDataset(size=48, resolution=32, num_frames=9, seed=1)
    items = [data[index] for index in range(48)]
    clips = to_uint8(torch.stack([item["pixel_values"] for item in items]) / 2 + 0.5)
    prompts = [item["text"] for item in items]
    assert clips.shape == (48, 9, 32, 32, 3)
    assert motion_metric(clips, prompts) == {
        "frames_valid": 1.0,
        "keeps_class": 1.0,
        "direction": 1.0,
        "steady": 1.0,
        "right": 1.0,
    }
    shuffled = np.stack([clip[np.random.default_rng(index).permutation(9)] for index, clip in enumerate(clips)])
    scores = motion_metric(shuffled, prompts)
    assert scores["keeps_class"] == 1.0 and scores["steady"] <= 0.1 and scores["right"] <= 0.1
    assert motion_metric(clips[:, ::-1].copy(), prompts)["direction"] == 0.0  # played backwards: the other way
    assert motion_metric(np.repeat(clips[:, :1], 9, axis=1), prompts)["direction"] == 0.0  # standing still
    other_colour = [p.replace(p.split()[1], "green" if p.split()[1] != "green" else "red", 1) for p in prompts]
    assert motion_metric(clips, other_colour)["keeps_class"] == 0.0  # asked for another colour

    # An image-to-video clip starts from its given frame: the data's own first frames pass, another clip's first frame
    # (the right caption drawn elsewhere) and the frame two steps on (1.1-2.8 px per step here) do not.
    assert first_frame_kept(clips, clips[:, 0]) == 1.0
    assert first_frame_kept(clips, np.roll(clips[:, 0], 1, axis=0)) == 0.0
    assert first_frame_kept(clips, clips[:, 2]) <= 0.1
    with pytest.raises(ValueError, match=r"given frames uint8 \(47, 32, 32, 3\)"):
        first_frame_kept(clips, clips[1:, 0])

    # The FVD substitute: a second draw of the data is nearer than the same clips shuffled in time or standing still.
    def draw(seed: int) -> torch.Tensor:
        data = MovingShapesDataset(size=160, resolution=32, num_frames=9, seed=seed)
        return torch.stack([data[index]["pixel_values"] for index in range(160)]) / 2 + 0.5

    reference, real = draw(1), draw(2)
    order = torch.from_numpy(np.random.default_rng(0).permutation(9))
    second_draw = video_distance(reference, real)
    assert second_draw < 0.6 * video_distance(reference, real[:, order])
    assert second_draw < 0.6 * video_distance(reference, real[:, :1].repeat(1, 9, 1, 1, 1))


def test_mp4_and_gif_files_hold_the_clip(tmp_path: Path) -> None:
    clip = to_uint8(MovingShapesDataset(size=4, resolution=32, num_frames=9)[0]["pixel_values"] / 2 + 0.5)
    for suffix, tolerance in (("mp4", 2.0), ("gif", 0.5)):  # mean |error| in 0..255: H.264 at CRF 18, a gif palette
        path = write_video([Image.fromarray(frame) for frame in clip], tmp_path / f"clip.{suffix}", 8)
        back = np.stack([np.asarray(frame.convert("RGB")) for frame in load_video(str(path))])
        assert back.shape == clip.shape and np.abs(back.astype(float) - clip).mean() < tolerance, suffix
        assert np.abs(back.astype(float) - clip[::-1]).mean() > 4 * tolerance  # control: the frames in their order
    with pytest.raises(ValueError, match="one of"):
        write_video([Image.fromarray(clip[0])], tmp_path / "clip.avi", 8)


@pytest.mark.slow  # 2 s: decodes mp4 and gif files
def test_video_folder_reads_mp4_gif_and_frame_folders_and_names_bad_clips(tmp_path: Path) -> None:
    source = MovingShapesDataset(size=3, resolution=32, num_frames=9, seed=4)
    clips = [to_uint8(source[index]["pixel_values"] / 2 + 0.5) for index in range(3)]
    root = tmp_path / "clips"
    (root / "c").mkdir(parents=True)
    write_video([Image.fromarray(frame) for frame in clips[0]], root / "a.mp4", 8)
    write_video([Image.fromarray(frame) for frame in clips[1]], root / "b.gif", 8)
    for index, frame in enumerate(clips[2]):
        Image.fromarray(frame).save(root / "c" / f"{index:03d}.png")
    captions = {"a.mp4": "first", "b.gif": "second", "c": "third"}
    lines = [json.dumps({"file_name": name, "text": text}) for name, text in captions.items()]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    data = VideoFolderDataset(str(root), 32, 9)
    assert [data[index]["text"] for index in range(3)] == ["first", "second", "third"]
    assert torch.equal(data[2]["pixel_values"], source[2]["pixel_values"])  # PNG frames: exactly the clip
    for index in (0, 1):  # H.264 at CRF 18 and a gif palette: within 2/255 on average
        assert (data[index]["pixel_values"] - source[index]["pixel_values"]).abs().mean() < 4 / 255
    strided = VideoFolderDataset(str(root), 32, 5, frame_stride=2)
    assert torch.equal(strided[2]["pixel_values"], source[2]["pixel_values"][::2])
    with pytest.raises(ValueError, match="has 9 frames, fewer than data.num_frames=17"):
        VideoFolderDataset(str(root), 32, 17)
    (root / "metadata.jsonl").unlink()
    (root / "broken.mp4").write_bytes(b"not a video")
    with pytest.raises(ValueError, match="cannot read video .*broken.mp4"):
        VideoFolderDataset(str(root), 32, 9)
    tolerant = VideoFolderDataset(str(root), 32, 9, skip_bad=True)
    assert len(tolerant) == 3 and [path.name for path in tolerant.skipped] == ["broken.mp4"]


def test_video_vae_layout_and_cogvideox_schedule_match_diffusers() -> None:
    vae = tiny_video_vae().eval()
    clips = torch.rand(2, 9, 3, 16, 16) * 2 - 1
    torch.manual_seed(0)
    latents = encode_latents(vae, clips)
    torch.manual_seed(0)
    expected = vae.encode(clips.transpose(1, 2)).latent_dist.sample().transpose(1, 2) * vae.config.scaling_factor
    assert latents.shape == (2, 3, 4, 4, 4) and torch.equal(latents, expected)  # (B, F, C, H, W), 9 -> 3 frames
    pipeline_decoded = CogVideoXPipeline.decode_latents(
        SimpleNamespace(vae=vae, vae_scaling_factor_image=vae.config.scaling_factor), latents
    )
    decoded = decode_latents(vae, latents)
    # (the pipeline multiplies by 1 / scaling_factor, lightdiff divides by it: last-bit differences)
    assert decoded.shape == (2, 9, 3, 16, 16)
    assert torch.allclose(decoded, pipeline_decoded.transpose(1, 2), atol=1e-5)
    assert not torch.equal(decode_latents(vae, latents.flip(1)), decoded)  # control: the frame order matters

    schedule = NoiseSchedule("scaled_linear", 1000, 0.00085, 0.012, rescale_betas_zero_snr=True, snr_shift_scale=3.0)
    reference = CogVideoXDDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True
    )
    ours = schedule.alphas_cumprod()
    assert torch.allclose(ours, reference.alphas_cumprod.double(), atol=1e-6) and ours[-1] == 0
    unshifted = NoiseSchedule("scaled_linear", 1000, 0.00085, 0.012, rescale_betas_zero_snr=True).alphas_cumprod()
    assert (unshifted - ours).abs().max() > 0.05  # control: the shift moves the schedule
    plain = NoiseSchedule("scaled_linear", 1000, 0.00085, 0.012).alphas_cumprod()
    snr = plain / (1 - plain)
    shifted = shift_snr(plain, 3.0)
    assert torch.allclose(shifted / (1 - shifted), snr / 3)  # every SNR divided by 3
    objective = DDPM(schedule, "v_prediction")
    scheduler = objective.scheduler(functools.partial(DDIMScheduler, timestep_spacing="trailing"))
    assert isinstance(scheduler, CogVideoXDDIMScheduler) and scheduler.config.snr_shift_scale == 3.0
    assert scheduler.config.timestep_spacing == "trailing" and objective.default_sampler_overrides == {
        "timestep_spacing": "trailing"
    }
    with pytest.raises(ConfigError, match="snr_shift_scale=3.0 is sampled by DDIM only"):
        objective.scheduler(DPMSolverMultistepScheduler)


def _tiny_transformer(max_text_seq_length: int = 8, rotary: bool = False) -> CogVideoXTransformer3DModel:
    torch.manual_seed(2)
    return CogVideoXTransformer3DModel(
        use_rotary_positional_embeddings=rotary,  # CogVideoX-5b's positions (their head width split t / h / w)
        num_attention_heads=2,
        attention_head_dim=16 if rotary else 8,
        in_channels=4,
        out_channels=4,
        time_embed_dim=16,
        text_embed_dim=16,
        num_layers=1,
        sample_width=4,
        sample_height=4,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=max_text_seq_length,
    ).eval()


@pytest.mark.slow  # 3 s
def test_rotary_cogvideox_samples_as_its_pipeline() -> None:
    """CogVideoX-5b's 3-D rotary positions, made per call from the latents' shape (nets/denoiser.py), sample what
    CogVideoXPipeline samples (untrained tiny parts: the arithmetic, not the weights, is compared)."""
    tokenizer = build_t5_tokenizer(PROMPTS * 3, model_max_length=8)
    torch.manual_seed(1)
    family = T5Text(tokenizer, t5_encoder_from_scratch(tokenizer, 16, 1, 2, 32).eval(), False, 8)
    net, vae = _tiny_transformer(rotary=True), tiny_video_vae().eval()
    scheduler = CogVideoXDDIMScheduler(
        beta_schedule="scaled_linear",
        rescale_betas_zero_snr=True,
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        clip_sample=False,
    )
    pipeline = CogVideoXPipeline(
        tokenizer=tokenizer, text_encoder=family.text_encoder, vae=vae, transformer=net, scheduler=scheduler
    )
    ours = generate(net, scheduler, 2, [0, 1], family, {"text": PROMPTS}, 4.0, vae=vae, size=(16, 16), num_frames=9)
    generators = [torch.Generator().manual_seed(seed) for seed in (0, 1)]
    theirs = pipeline(
        prompt=PROMPTS,
        num_frames=9,
        height=16,
        width=16,
        num_inference_steps=2,
        guidance_scale=4.0,
        generator=generators,
        output_type="pt",
        max_sequence_length=8,
    ).frames
    assert (theirs - ours).abs().max() < 1e-4
    net.register_to_config(use_rotary_positional_embeddings=False)  # control: without the rotary tables it differs
    plain = generate(net, scheduler, 2, [0, 1], family, {"text": PROMPTS}, 4.0, vae=vae, size=(16, 16), num_frames=9)
    assert (plain - ours).abs().max() > 1e-3


def test_t5_text_is_cogvideox_encode_prompt() -> None:
    tokenizer = build_t5_tokenizer(PROMPTS * 3, model_max_length=8)
    torch.manual_seed(1)
    family = T5Text(tokenizer, t5_encoder_from_scratch(tokenizer, 16, 1, 2, 32).eval(), False, 8)
    pipeline = CogVideoXPipeline(
        tokenizer=tokenizer,
        text_encoder=family.text_encoder,
        vae=tiny_video_vae(),
        transformer=_tiny_transformer(),
        scheduler=CogVideoXDDIMScheduler(),
    )
    positive, negative = pipeline.encode_prompt(PROMPTS, None, True, max_sequence_length=8, device="cpu")
    inputs = {"text": PROMPTS}
    assert torch.equal(family(inputs).kwargs["encoder_hidden_states"], positive)
    unconditional = family.without_condition(inputs, [True, True])
    assert torch.equal(family(unconditional).kwargs["encoder_hidden_states"], negative)
    rebuilt = conditioning_from_state(family.state())
    rebuilt.load_state_dict(family.state_dict())
    assert torch.equal(rebuilt.encode(PROMPTS), family.encode(PROMPTS))
    data = SimpleNamespace(captions=lambda: PROMPTS)
    family.check(_tiny_transformer(), data)
    with pytest.raises(ConfigError, match="model.max_sequence_length=8 differs from net.max_text_seq_length=16"):
        family.check(_tiny_transformer(max_text_seq_length=16), data)


def test_text_to_video_trains_samples_mp4_and_exports_to_cogvideox_pipeline(video_ckpt: Path, tmp_path: Path) -> None:
    meta = load_checkpoint_file(video_ckpt)["lightdiff"]
    assert meta["num_frames"] == 9 and meta["vae_class"] == "AutoencoderKLCogVideoX"
    assert meta["conditioning"]["family"] == "t5_text" and meta["objective"]["prediction_type"] == "v_prediction"
    preview = load_video(str(video_ckpt.parents[1] / "samples" / "final_step0000002.mp4"))
    assert len(preview) == 9  # the final previews: one video of every clip side by side

    out = tmp_path / "samples"
    sample_run(compose_config("sample", [f"ckpt={video_ckpt}", f"out={out}", "num_images=2", "steps=3"]))
    records = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in records] == ["000000.mp4", "000001.mp4"] and records[0]["num_frames"] == 9
    assert records[0]["sampler"] == "CogVideoXDDIMScheduler" and records[0]["timestep_spacing"] == "trailing"
    frames = load_video(str(out / "000001.mp4"))
    assert len(frames) == 9 and frames[0].size == (16, 16)
    gif = ["num_images=1", "steps=3", "video_format=gif"]
    sample_run(compose_config("sample", [f"ckpt={video_ckpt}", f"out={tmp_path / 'gif'}", *gif]))
    gif_frames = load_video(str(tmp_path / "gif" / "000000.gif"))
    assert len(gif_frames) == 9 and np.asarray(gif_frames[0].convert("RGB")).shape == (16, 16, 3)
    # the speed path on clips: bf16, checked against the plain fp32 clips before any file is written
    # (and judged: the video judge on moving shapes and the FVD substitute against the run's data)
    fast = ["num_images=2", "steps=3", "speed.dtype=bfloat16", "speed.check_images=2"]
    judged = ["metrics=fid", "metrics.num_samples=4"]
    sample_run(compose_config("sample", [f"ckpt={video_ckpt}", f"out={tmp_path / 'bf16'}", *fast, *judged]))
    assert len(load_video(str(tmp_path / "bf16" / "000001.mp4"))) == 9
    metrics = json.loads((tmp_path / "bf16" / "metrics.json").read_text())
    assert metrics["num_clips"] == 2 and metrics["fvd_random"] > 0 and set(metrics["motion"]) >= {"right", "steady"}
    # two clips of two captions have no spread to measure: the judge says so and no bar is met
    assert metrics["motion"]["variety"].startswith("not measured (generated: 2 clips, 2 captions")
    assert metrics["motion"]["meets_bar"] is False
    # grid.png holds the sampled clips exactly (a clip per row): what generate() draws for the same seeds
    denoiser = load_denoiser(video_ckpt)
    scheduler = denoiser.objective.scheduler(
        functools.partial(DDIMScheduler, timestep_spacing="trailing", clip_sample=False)
    )
    prompts = [record["text"] for record in records]
    drawn = generate(
        denoiser.net,
        scheduler,
        3,
        [0, 1],
        denoiser.conditioning,
        {"text": prompts},
        4.0,
        vae=denoiser.vae,
        size=(16, 16),
        num_frames=9,
    )
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape == (2 * 16, 9 * 16, 3) and np.array_equal(grid, np.asarray(frames_grid(to_uint8(drawn))))

    folder = tmp_path / "export"
    sample_run(compose_config("sample", [f"ckpt={video_ckpt}", f"export={folder}", "steps=3"]))
    assert json.loads((folder / "lightdiff.json").read_text())["num_frames"] == 9
    ours, theirs = _exported_clips(folder, video_ckpt, steps=3, guidance_scale=4.0, seeds=[0, 1])
    assert theirs.shape == ours.shape == (2, 9, 3, 16, 16)
    assert (theirs - ours).abs().max() < 1e-4
    assert (theirs[0] - theirs[1]).abs().max() > 1e-2  # control: two seeds' clips are far apart at this scale
    # Mutation control: an export whose transformer weights were perturbed (sigma 0.05) fails the comparison.
    ours, theirs = _exported_clips(folder, video_ckpt, steps=3, guidance_scale=4.0, seeds=[0, 1], perturb=0.05)
    assert (theirs - ours).abs().max() > 1e-3


def _on_the_exported_base(video_ckpt: Path, tmp_path: Path, name: str, *extra: str) -> tuple[Path, DictConfig]:
    """(the export of `video_ckpt`, a model=video run on it as model.pretrained with its transformer loaded)."""
    folder = tmp_path / "export"
    sample_run(compose_config("sample", [f"ckpt={video_ckpt}", f"export={folder}"]))
    overrides = [f"output_root={tmp_path}", *TINY, "model=video", f"model.pretrained={folder}"]
    overrides += ["model.load_pretrained_unet=true", f"run_name={name}", *extra]
    return folder, compose_config("train", overrides)


@pytest.mark.slow  # 5 s: an export and a fine-tuning run
def test_a_cogvideox_folder_fine_tunes_with_its_frozen_t5(video_ckpt: Path, tmp_path: Path) -> None:
    # the export as model.pretrained: its T5 (frozen, at the transformer's text length) and VAE, its transformer
    # fine-tuned; the family is the pipeline's to the bit
    folder, tuned = _on_the_exported_base(video_ckpt, tmp_path, "tuned", "model.vae=null")
    trainer = train_run(tuned)
    family = trainer.lightning_module.conditioning
    assert isinstance(family, T5Text) and not family.trainable and family.max_sequence_length == 8
    with torch.no_grad():
        assert torch.equal(family.encode(PROMPTS), exported_family_states(folder))


@pytest.mark.slow  # 6 s: an export and a LoRA run
def test_lora_adapters_on_a_video_base_keep_its_clip_length(video_ckpt: Path, tmp_path: Path) -> None:
    """sample.py's default frame count of an adapter checkpoint is the base's (it was lost: None, so one frame)."""
    folder, adapted = _on_the_exported_base(video_ckpt, tmp_path, "lora", "model.lora.rank=2")
    train_run(adapted)
    trained = load_trained(Path(adapted.run_dir) / "checkpoints" / "last.ckpt")
    assert trained.num_frames == load_trained(folder).num_frames == 9


@pytest.mark.slow  # 8 s; turbo's own tests cover the method on images in the default suite
def test_turbo_distils_a_video_teacher_into_a_one_step_student(video_ckpt: Path, tmp_path: Path) -> None:
    """LADD on a CogVideoX teacher: the discriminator reads the teacher's tokens of whole clips; the student samples in
    1 to 4 steps and exports as a CogVideoXPipeline that plain diffusers reproduces in one step."""
    turbo = [f"output_root={tmp_path}", *TINY, "model=turbo", f"model.teacher={video_ckpt}", "data=moving_shapes"]
    cfg = compose_config("train", [*turbo, "data.num_frames=9", "model.teacher_steps=2", "run_name=video-turbo"])
    train_run(cfg)
    checkpoint = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    meta = load_checkpoint_file(checkpoint)["lightdiff"]
    assert meta["method"] == "turbo" and meta["num_frames"] == 9 and len(meta["student_timesteps"]) == 4
    grid = np.asarray(Image.open(Path(cfg.run_dir) / "samples" / "final_step0000002.png"))
    assert grid.shape == (4 * 16 * 4, 9 * 16 * 4, 3)  # 4 rows (num_images): the student at 1, 2, 4 steps, the teacher
    folder = tmp_path / "export"
    sample_run(compose_config("sample", [f"ckpt={checkpoint}", f"export={folder}"]))
    ours, theirs = _exported_clips(folder, checkpoint, steps=1, guidance_scale=1.0, seeds=[0, 1])
    assert (theirs - ours).abs().max() < 1e-4
    ours, theirs = _exported_clips(folder, checkpoint, steps=1, guidance_scale=1.0, seeds=[0, 1], perturb=0.05)
    assert (theirs - ours).abs().max() > 1e-3  # mutation control: a perturbed export fails
    with pytest.raises(ConfigError, match="a video teacher is distilled against a backbone that judges whole clips"):
        train_run(compose_config("train", [*turbo, "discriminator=patchgan", "run_name=patch"]))


@pytest.mark.slow  # 4 s: a run of the autoencoder stage on clips
def test_autoencoder_stage_trains_a_video_vae(tmp_path: Path) -> None:
    overrides = [
        f"output_root={tmp_path}",
        *TINY,
        "model=autoencoder",
        "data=moving_shapes",
        "data.num_frames=9",
        "model.video_vae.block_out_channels=[8,16,16]",
        "run_name=video-vae",
    ]
    cfg = compose_config("train", overrides)
    train_run(cfg)
    checkpoint = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    meta = load_checkpoint_file(checkpoint)["lightdiff"]
    assert meta["vae_class"] == "AutoencoderKLCogVideoX" and meta["vae_config"]["scaling_factor"] != 1.15258426
    sample_run(compose_config("sample", [f"ckpt={checkpoint}", f"export={tmp_path / 'vae'}"]))
    vae = load_vae(None, str(tmp_path / "vae"))
    assert type(vae).__name__ == "AutoencoderKLCogVideoX"
    assert vae.config.scaling_factor == meta["vae_config"]["scaling_factor"]
    with pytest.raises(ConfigError, match="data.num_frames=5: 5 frames must be 8m \\+ 1 \\(e.g. 9\\)"):
        train_run(compose_config("train", [*overrides[:-1], "data.num_frames=5", "run_name=bad"]))
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow  # 5 s: a run with an FID evaluation
def test_fid_during_video_training_judges_frames(video_vae_dir: Path, tmp_path: Path) -> None:
    """metrics=fid on a video model: the previews' frames against the data's frames (the reference of clips is
    their frames too), logged as val/fid at the end of the run."""
    metrics = ["metrics=fid", "metrics/features=random_conv", "metrics.num_samples=4", "metrics.batch_size=4"]
    cfg = _video_config(tmp_path, video_vae_dir, *metrics, "metrics.every_n_steps=0", "metrics.steps=2", "run_name=f")
    train_run(cfg)
    rows = (Path(cfg.run_dir) / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    values = [row.split(",")[header.index("val/fid")] for row in rows[1:]]
    assert [float(value) for value in values if value] and all(float(v) > 0 for v in values if v)


def test_bad_video_input_is_named_before_anything_is_written(
    video_vae_dir: Path, video_ckpt: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="data.num_frames=6: 6 frames must be 8m \\+ 1"):
        train_run(_video_config(tmp_path, video_vae_dir, "data.num_frames=6", "run_name=six"))
    stills = [override for override in TINY_VIDEO_MODEL if not override.startswith("data.num_frames")]
    with pytest.raises(ConfigError, match="does not denoise images"):
        train_run(
            compose_config(
                "train", [f"output_root={tmp_path}", *TINY, *stills, f"model.vae={video_vae_dir}", "data=shapes"]
            )
        )
    with pytest.raises(ConfigError, match="num_frames=13: 13 frames must be 8m \\+ 1"):
        sample_run(compose_config("sample", [f"ckpt={video_ckpt}", f"out={tmp_path / 'thirteen'}", "num_frames=13"]))
    assert sorted(path.name for path in tmp_path.iterdir()) == []


@pytest.mark.slow  # four tiny runs (10 s); the image runs' exact resume is in the default suite
def test_video_run_resumes_bit_identical(video_vae_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """4 steps straight, and 2 + 2 with a resume in between (two batches an epoch: the resume crosses an epoch):
    the same weights, EMA and optimiser state; without the random state restored, not (the control)."""
    steps = ["data.size=8", "trainer.max_steps=4"]
    whole = _video_config(tmp_path, video_vae_dir, "run_name=whole", *steps)
    train_run(whole)
    expected = load_checkpoint_file(Path(whole.run_dir) / "checkpoints" / "last.ckpt")

    def resumed(name: str) -> dict:
        train_run(_video_config(tmp_path, video_vae_dir, f"run_name={name}", "data.size=8", "trainer.max_steps=2"))
        cfg = _video_config(tmp_path, video_vae_dir, f"run_name={name}", *steps)
        train_run(cfg)
        return load_checkpoint_file(Path(cfg.run_dir) / "checkpoints" / "last.ckpt")

    _assert_same_state(expected, resumed("cut"))
    monkeypatch.setattr(random_state, "restore_random_state", lambda state: None)
    with pytest.raises(AssertionError, match="weights differ"):
        _assert_same_state(expected, resumed("cut-without-rng"))


def test_clip_latent_cache_holds_each_clips_posterior_for_3d_and_frame_wise_vaes(tmp_path: Path) -> None:
    """data.cache_latents on clips: each stored item is the clip's q(z | x) in `posterior_moments`' layout, and
    `encode_latents` draws latents of the on-the-fly shape from it, for CogVideoX's 3-D VAE and a frame-wise one."""
    from lightdiff.data import MovingShapesDataModule

    clips = torch.stack([MovingShapesDataset(size=8, resolution=16, num_frames=9)[i]["pixel_values"] for i in (2, 5)])
    # (VAE, a clip's stored moments, its latents): CogVideoX's (2C, F', h, w) -> (F', C, h, w); frame-wise (F, 2C, h, w)
    for vae, layout, latents in (
        (tiny_video_vae().eval(), (8, 3, 4, 4), (3, 4, 4, 4)),
        (tiny_vae().eval(), (9, 8, 8, 8), (9, 4, 8, 8)),
    ):
        data = MovingShapesDataModule(
            resolution=16, num_frames=9, size=8, batch_size=4, cache_latents=True, latent_cache_dir=str(tmp_path)
        )
        data.use_latent_cache(vae)
        stored = torch.stack([data.dataset[i]["latent_moments"] for i in (2, 5)])
        with torch.no_grad():
            expected = posterior_moments(vae, clips)
        assert tuple(stored.shape[1:]) == layout
        torch.testing.assert_close(stored, expected, atol=2e-2, rtol=1e-2)  # stored as float16
        torch.manual_seed(0)
        from_cache = encode_latents(vae, None, stored)
        torch.manual_seed(0)
        on_the_fly = encode_latents(vae, clips)
        assert from_cache.shape == on_the_fly.shape == (2, *latents)
        torch.testing.assert_close(from_cache, on_the_fly, atol=0.1, rtol=0.05)
        assert not torch.allclose(from_cache[0], from_cache[1], atol=0.1)  # two clips, not one broadcast
    assert len(list(tmp_path.glob("latents-*.pt"))) == 2  # one cache per VAE


def test_text_to_video_trains_from_the_clip_latent_cache_without_encoding(
    video_vae_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the cache exists, a run encodes no clip; the control without data.cache_latents encodes every step's."""
    from diffusers import AutoencoderKLCogVideoX

    calls = count_encoded(monkeypatch, AutoencoderKLCogVideoX)
    cache = [f"data.latent_cache_dir={tmp_path / 'cache'}", "data.size=8"]
    train_run(_video_config(tmp_path, video_vae_dir, "run_name=fill", "data.cache_latents=true", *cache))
    assert sum(calls) == 8 and len(list((tmp_path / "cache").glob("latents-*.pt"))) == 1  # every clip once
    calls.clear()
    cfg = _video_config(tmp_path, video_vae_dir, "run_name=cached", "data.cache_latents=true", *cache)
    trainer = train_run(cfg)
    assert trainer.global_step == 2 and calls == []
    assert (Path(cfg.run_dir) / "checkpoints" / "last.ckpt").is_file()
    train_run(_video_config(tmp_path, video_vae_dir, "run_name=uncached", *cache))
    assert calls == [4, 4]  # the control: two steps of 4 clips encoded on the fly
