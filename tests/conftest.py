"""Shared fixtures: compose the real Hydra configs in-process, with tiny sizes, writing under tmp_path; the tiny
networks and the tiny trained checkpoints that several test files use, built once per session (read them, never
write into them: copy a checkpoint before changing it)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderKLCogVideoX, AutoencoderKLWan, UNet2DConditionModel, UNet2DModel
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import lightdiff.config  # noqa: F401  (registers the config resolvers, as train.py's import does)

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

# Torch threads of every test and of the training processes tests start: float sums depend on the thread count, so
# both sides of an exactness test must use the same. Two on their own; one per worker where pytest-xdist runs the
# suite in parallel (pyproject addopts: a worker per core), exported so that child processes take it too.
TEST_THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2
os.environ["OMP_NUM_THREADS"] = str(TEST_THREADS)
torch.set_num_threads(TEST_THREADS)  # session and module fixtures run before the autouse fixture below sets it again

# A run that takes seconds on a CPU: every size shrunk, every feature on.
TINY = [
    "logger=csv",
    "trainer.max_steps=2",
    "trainer.log_every_n_steps=1",
    "data.batch_size=4",
    "data.size=64",
    "data.resolution=16",
    "callbacks.samples.every_n_steps=0",
    "callbacks.samples.steps=2",
    "callbacks.samples.num_images=4",
    "callbacks.samples.final_num_images=4",
]


# The tiny text model's sizes (model=latent): a 1-layer, 16-wide text encoder and a 16/32-channel UNet.
TINY_TEXT_MODEL = [
    "model.text_hidden_size=16",
    "model.text_layers=1",
    "model.text_heads=2",
    "net.block_out_channels=[16,32]",
    "net.cross_attention_dim=16",
    "net.attention_head_dim=4",
    "net.norm_num_groups=8",
]


def compose_config(config_name: str, overrides: list[str]) -> DictConfig:
    """What `python train.py overrides...` would see, with the `hydra:` resolver working."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fast_and_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.set_num_threads(TEST_THREADS)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def tiny_train_config(tmp_path: Path):
    def make(*overrides: str) -> DictConfig:
        return compose_config("train", [f"output_root={tmp_path}", *TINY, *overrides])

    return make


# The tiny SDXL model (model=latent net=sdxl_tiny): two 1-layer, 16-wide text encoders side by side (32), the pooled
# 16-wide projection plus six 4-wide size / crop ids (6 x 4 + 16 = 40), a 16/32-channel UNet.
TINY_SDXL_MODEL = [
    "net=sdxl_tiny",
    "model.text_layers=1",
    "model.text_heads=2",
    "net.block_out_channels=[16,32]",
    "net.attention_head_dim=[2,4]",
    "net.norm_num_groups=8",
    "net.cross_attention_dim=32",
    "net.addition_time_embed_dim=4",
    "net.projection_class_embeddings_input_dim=40",
]


def count_encoded(monkeypatch: pytest.MonkeyPatch, vae_class: type) -> list[int]:
    """Patch `vae_class.encode` to record each call's batch size in the returned list (what a cached run must not
    encode again)."""
    encoded: list[int] = []
    encode = vae_class.encode

    def counted(self, pixels, *args, **kwargs):  # noqa: ANN001, ANN202
        encoded.append(len(pixels))
        return encode(self, pixels, *args, **kwargs)

    monkeypatch.setattr(vae_class, "encode", counted)
    return encoded


def losses_by_step(run_dir: Path) -> dict[int, float]:
    """step -> train/loss over every CSV version of a run (a resumed session writes a new version)."""
    losses: dict[int, float] = {}
    for path in sorted((run_dir / "csv").glob("version_*/metrics.csv")):
        with path.open() as handle:
            for row in csv.DictReader(handle):
                if row.get("train/loss"):
                    losses[int(row["step"])] = float(row["train/loss"])
    return losses


# An interruptible run: the real train.py in a child process (`KILLABLE.format(repo=..., overrides=[...])`), slowed
# by a callback that sleeps after every batch so the parent can kill it part-way (the sleep touches no random state).
# Its torch threads are this process's (`_fast_and_offline`): float sums depend on the thread count.
KILLABLE = """
import sys, time
import pytorch_lightning as pl
import torch
torch.set_num_threads(__THREADS__)
sys.path.insert(0, {repo!r})
from tests.conftest import compose_config
from lightdiff import train

class Slow(pl.Callback):
    def on_train_batch_end(self, *args):
        time.sleep(0.4)

cfg = compose_config("train", {overrides!r})
original_build = train.build
def build(node, **kwargs):
    made = original_build(node, **kwargs)
    if isinstance(made, pl.Trainer):
        made.callbacks.append(Slow())
    return made
train.build = build
from lightdiff.callbacks.preemption import PREEMPTED_EXIT_STATUS, Preempted
try:
    train.run(cfg)
except Preempted:  # as train.py's entry does
    sys.exit(PREEMPTED_EXIT_STATUS)
""".replace("__THREADS__", str(TEST_THREADS))


def _trained_checkpoint(root: Path, name: str, *overrides: str) -> Path:
    from lightdiff.train import run

    cfg = compose_config("train", [f"output_root={root}", *TINY, f"run_name={name}", *overrides])
    run(cfg)
    return Path(cfg.run_dir) / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def pixel_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default pixel model (unet_tiny, unconditional DDPM) trained for 3 steps."""
    return _trained_checkpoint(tmp_path_factory.mktemp("pixel"), "uncond", "trainer.max_steps=3")


@pytest.fixture(scope="session")
def class_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A class-conditional pixel model (experiment=shapes_class) trained for 3 steps: also the turbo tests' teacher."""
    return _trained_checkpoint(
        tmp_path_factory.mktemp("class"), "class", "experiment=shapes_class", "trainer.max_steps=3"
    )


def tiny_unet(sample_size: int = 8) -> UNet2DModel:
    """A pixel UNet of two 8/16-channel levels, seeded: the same weights in every test that builds it."""
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=[8, 16],
        down_block_types=["DownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "UpBlock2D"],
        layers_per_block=1,
        norm_num_groups=4,
    )


def perturb_weights(module: torch.nn.Module, sigma: float) -> None:
    """Gaussian noise of `sigma` (seeded) added to every weight of `module`: the mutation control of the export
    parity tests (a perturbed export must fail the comparison a faithful one passes)."""
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for parameter in module.parameters():
            parameter.add_(sigma * torch.randn(parameter.shape, generator=generator))


def tiny_vae() -> AutoencoderKL:
    """A two-level AutoencoderKL with 4 latent channels (16 px images -> 8 x 8 latents), seeded."""
    torch.manual_seed(0)
    return AutoencoderKL(
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        block_out_channels=[8, 16],
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )


def tiny_video_vae() -> AutoencoderKLCogVideoX:
    """A three-level CogVideoX VAE (4x in space and in time: 9 frames of 16 px -> 3 latent frames of 4 x 4 with 4
    channels), seeded."""
    torch.manual_seed(0)
    return AutoencoderKLCogVideoX(
        down_block_types=("CogVideoXDownBlock3D",) * 3,
        up_block_types=("CogVideoXUpBlock3D",) * 3,
        block_out_channels=(8, 16, 16),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        temporal_compression_ratio=4,
    )


def tiny_wan_vae() -> AutoencoderKLWan:
    """A Wan VAE of two levels, both down-sampling time too (4x in space and in time, causal: 9 frames of 16 px -> 3
    latent frames of 4 x 4 with 4 channels), with per-channel statistics far from (0, 1), seeded."""
    torch.manual_seed(0)
    return AutoencoderKLWan(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[True, True],
        latents_mean=[0.1, -0.2, 0.3, 0.0],
        latents_std=[0.5, 1.5, 1.0, 2.0],
        scale_factor_spatial=4,
        scale_factor_temporal=4,
    )


# The tiny text-to-video model (model=video) for tiny_video_vae: 9-frame clips of 16 px, a 1-layer CogVideoX
# transformer of width 16 over 2 x 2 patches of its 4 latent channels, a 1-layer, 16-wide T5 of 8 tokens.
TINY_VIDEO_MODEL = [
    "model=video",
    "data.num_frames=9",
    "net.in_channels=4",
    "net.out_channels=4",
    "net.num_layers=1",
    "net.num_attention_heads=2",
    "net.attention_head_dim=8",
    "net.time_embed_dim=16",
    "net.text_embed_dim=16",
    "net.max_text_seq_length=8",
    "net.sample_height=4",
    "net.sample_width=4",
    "net.sample_frames=9",
    "model.text_layers=1",
    "model.text_heads=2",
]


TINY_PIPELINE_CAPTIONS = ["a red circle", "a blue square", "a green triangle", "a white circle"]


@pytest.fixture(scope="session")
def pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Stable-Diffusion-layout folder made offline from tiny parts, as `from_pretrained` expects on a hub."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from lightdiff.diffusion import NoiseSchedule
    from lightdiff.nets.text import build_caption_tokenizer, text_encoder_from_scratch

    tokenizer = build_caption_tokenizer(TINY_PIPELINE_CAPTIONS * 5, vocab_size=300, model_max_length=8)
    pipeline = StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=text_encoder_from_scratch(tokenizer, hidden_size=16, num_hidden_layers=1, num_attention_heads=2),
        tokenizer=tokenizer,
        unet=tiny_cond_unet(16),
        scheduler=DDIMScheduler(**NoiseSchedule("scaled_linear", 1000, 0.00085, 0.012).scheduler_kwargs()),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    folder = tmp_path_factory.mktemp("pipeline") / "tiny-sd"
    pipeline.save_pretrained(folder)
    return folder


def tiny_cond_unet(cross_attention_dim: int = 16) -> UNet2DConditionModel:
    """A text-conditioned UNet for tiny_vae's latents, seeded."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=[16, 32],
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        norm_num_groups=8,
    )


def tiny_sd2_unet(**sdxl: object) -> UNet2DConditionModel:
    """An SD 2.x-shaped UNet (linear projections, attention at the second level only) for tiny_vae's latents and 32-wide
    text, seeded; `sdxl` adds SDXL's arguments (tiny_sdxl_unet)."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=[16, 32],
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
        layers_per_block=1,
        attention_head_dim=[2, 4],
        use_linear_projection=True,
        cross_attention_dim=32,
        norm_num_groups=8,
        **sdxl,
    )


def tiny_sdxl_unet() -> UNet2DConditionModel:
    """An SDXL-shaped UNet (text_time added embedding) for tiny_vae's latents and two 16-wide encoders, seeded."""
    return tiny_sd2_unet(
        transformer_layers_per_block=[1, 2],
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=40,  # 6 ids x 4 + the 16-wide pooled text
    )


def tiny_dinov2_overrides(folder: Path) -> list[str]:
    """`discriminator=dinov2` on a 2-layer, 32-wide DINOv2 saved to `folder` (16 px inputs), as overrides."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=4, image_size=16
    )
    Dinov2Model(config).save_pretrained(folder)
    return [
        "discriminator=dinov2",
        f"discriminator.backbone.model={folder}",
        "discriminator.backbone.layers=[1,2]",
        "discriminator.backbone.image_size=16",
    ]


@pytest.fixture(scope="session")
def sdxl_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SDXL-shaped latent model trained from scratch for 2 steps (both text encoders from the captions)."""
    root = tmp_path_factory.mktemp("sdxl")
    tiny_vae().save_pretrained(root / "vae")
    return _trained_checkpoint(root, "sdxl", "model=latent", f"model.vae={root / 'vae'}", *TINY_SDXL_MODEL)


@pytest.fixture(scope="session")
def text_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A text-conditioned latent model (tiny VAE, 1-layer text encoder from the captions, 16/32-channel UNet) trained
    for 2 steps: the teacher of the text distillation tests (turbo, lcm, dmd2)."""
    root = tmp_path_factory.mktemp("text")
    tiny_vae().save_pretrained(root / "vae")
    return _trained_checkpoint(root, "text", "model=latent", f"model.vae={root / 'vae'}", *TINY_TEXT_MODEL)


@pytest.fixture(scope="session")
def text_student_ckpt(text_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-step turbo student of `text_ckpt` (2 updates): the few-step base of model=few_step_finetune's tests."""
    root = tmp_path_factory.mktemp("text_student")
    return _trained_checkpoint(root, "student", "model=turbo", f"model.teacher={text_ckpt}", "model.teacher_steps=2")


# ----- parity with plain diffusers: one helper every family's export test uses -----------------------------------


def sample_py_images(ckpt: Path | str, out: Path, *overrides: str, count: int = 2) -> np.ndarray:
    """sample.py's first `count` images (seeds 0, 1, ...) from a checkpoint or an exported folder, as integers
    (count, H, W, 3); a video model's clips as (count, F, H, W, 3) from its frame folders or mp4 frames."""
    from PIL import Image

    from lightdiff.sample import run as sample_run

    folder = sample_run(compose_config("sample", [f"ckpt={ckpt}", f"out={out}", f"num_images={count}", *overrides]))
    return np.stack([np.asarray(Image.open(folder / f"{i:06d}.png")).astype(int) for i in range(count)])


def pipeline_images(
    pipeline: object,
    prompts: list[str] | None,
    count: int = 2,
    seeds: list[int] | None = None,  # None: 0 .. count - 1
    rounded: bool = True,  # as sample.py's PNGs: integers; False: floats in [0, 1], to compare with `generate`
    **call: object,
) -> np.ndarray:
    """A plain diffusers pipeline's images from `seeds` (sample.py's generators), (count, H, W, 3)."""
    from lightdiff.sampling import generators_for

    seeds = list(range(count)) if seeds is None else seeds
    arguments = {"generator": generators_for(seeds), "output_type": "np", **call}
    images = pipeline(prompts, **arguments) if prompts is not None else pipeline(batch_size=len(seeds), **arguments)
    images = np.asarray(images.images)
    return (images * 255).round().astype(int) if rounded else images


def assert_reproduced(ours: np.ndarray | torch.Tensor, theirs: np.ndarray, tolerance: float = 1) -> None:
    """lightdiff's images and the pipeline's agree to `tolerance` (8-bit levels for PNGs: 1 is the rounding of one
    side's float arithmetic; a float tolerance for `generate`'s (B, C, H, W) tensors, compared channels last), and
    are images at all (not both blank)."""
    if isinstance(ours, torch.Tensor):
        ours = ours.permute(0, 2, 3, 1).cpu().numpy()
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    difference = float(np.abs(ours - theirs).max())
    assert difference <= tolerance, f"lightdiff and the pipeline differ by up to {difference}"
    assert ours.std() > 0, "both sides drew blank images"


def assert_discriminator_heads_learnt(module: object) -> None:
    """A turbo student's discriminator heads were updated: each is in the discriminator's optimiser, which stepped,
    and every weight matrix holds a non-zero first moment (AdamW then moved it), so a variant that builds but never
    trains fails. (An output bias may see none: the hinge loss's real and fake terms cancel on it exactly.)"""
    _, discriminator_optimizer = (optimizer.optimizer for optimizer in module.optimizers())
    heads = module.discriminator.head_parameters()
    assert heads and all(p in discriminator_optimizer.state for p in heads)
    assert all(discriminator_optimizer.state[p]["step"].item() >= 1 for p in heads)
    assert all(discriminator_optimizer.state[p]["exp_avg"].abs().sum() > 0 for p in heads if p.ndim > 1)


def drawn_from_checkpoint(
    checkpoint: Path, inputs: dict[str, object], guidance_scale: float, size: int = 16, steps: int = 3
) -> torch.Tensor:
    """What lightdiff draws from a checkpoint for `inputs` (seeds 0, 1, ...) with the scheduler sample.py makes for it:
    the lightdiff side of a family's parity test."""
    from lightdiff.drawing import scheduler_for
    from lightdiff.sampling import generate
    from lightdiff.trained import load_denoiser

    trained = load_denoiser(checkpoint)
    scheduler, _ = scheduler_for(compose_config("sample", [f"ckpt={checkpoint}"]), trained)
    seeds = list(range(len(next(iter(inputs.values())))))
    return generate(
        trained.net, scheduler, steps, seeds, trained.conditioning, inputs, guidance_scale, vae=trained.vae,
        size=(size, size),
    )  # fmt: skip


def assert_fine_tune_froze_the_encoder(trainer: object, base: object, text_class: type) -> None:
    """A run from `model.pretrained=<pipeline folder>` with its denoiser loaded: the text encoder and VAE are the
    pipeline's (`base`), frozen, and the denoiser trained (the control: it moved)."""
    method = trainer.lightning_module
    text = method.conditioning
    assert isinstance(text, text_class) and not text.trainable
    for ours, theirs in ((text.text_encoder, base.text_encoder), (method.vae, base.vae)):
        assert type(ours) is type(theirs)
        assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))
    denoiser = getattr(base, "transformer", None) or base.unet
    assert any(not torch.equal(a, b) for a, b in zip(method.net.parameters(), denoiser.parameters()))


def assert_lora_file_reproduced(
    checkpoint: Path, folder: Path, pipeline_class: type, prompts: list[str], adapted: list[str], **call: object
) -> None:
    """A LoRA run's export (`folder`: the base and diffusers' LoRA file): the layers named in `adapted` carry
    adapters, and `pipeline_class.load_lora_weights` makes the pipeline draw lightdiff's unguided images (3 steps,
    16 px, seeds 0, 1, `call`: the pipeline's own arguments); the base alone draws others (the control)."""
    from lightdiff.trained import load_denoiser

    names = [name for name, _ in load_denoiser(checkpoint).net.named_parameters() if ".lora_A." in name]
    for layer in adapted:
        assert any(f"{layer}.lora_A." in name for name in names), layer
    ours = drawn_from_checkpoint(checkpoint, {"text": prompts}, 1.0)
    for lora, compare in ((True, lambda d: d < 1e-4), (False, lambda d: d > 1e-3)):
        pipeline = pipeline_class.from_pretrained(folder)
        if lora:
            pipeline.load_lora_weights(folder)
        theirs = pipeline(
            prompt=prompts, height=16, width=16, num_inference_steps=3, output_type="pt",
            generator=[torch.Generator().manual_seed(seed) for seed in range(len(prompts))], **call,
        ).images  # fmt: skip
        assert compare(float((theirs - ours).abs().max())), lora


# How far (relative) a low-precision base's LoRA losses may stray from the full-precision run's over 4 steps: about 5x
# what tiny SDXL and FLUX bases showed (int8 0.06%, fp8 storage 0.34%, NF4 0.78% at most). int8 rounds a weight by at
# most half its row's step; fp8 e4m3 keeps 3 mantissa bits; NF4 16 levels per block of 64: the errors average out over
# a layer's sums, so the outputs move far less than the worst weight.
LOW_PRECISION_LOSS_GAP = {"int8": 0.005, "fp8_storage": 0.02, "nf4": 0.04}


def low_precision_lora_runs(overrides: list[str], root: Path, steps: int = 4) -> dict[str, tuple[Path, object]]:
    """A LoRA run of `overrides` (LoRA on a pipeline's base) `steps` steps long four times, the frozen base at full
    precision, quantised to int8 or NF4 (model.base_quantization) and stored in fp8 (model.base_storage): name -> (its
    checkpoint, its module). Every run draws the same batches, noise and adapter initialisation (one seed)."""
    from lightdiff.train import run as train_run

    variants = {"full": [], "int8": ["model.base_quantization=int8"], "fp8_storage": ["model.base_storage=fp8"]}
    variants["nf4"] = ["model.base_quantization=nf4"]
    runs = {}
    for name, option in variants.items():
        run = [f"output_root={root}", f"run_name={name}", f"trainer.max_steps={steps}", *option]
        cfg = compose_config("train", [*overrides, *run])
        module = train_run(cfg).lightning_module
        runs[name] = (Path(cfg.run_dir) / "checkpoints" / "last.ckpt", module)
    return runs


def assert_low_precision_losses_follow_full_precision(
    runs: dict[str, tuple[Path, object]], within: dict[str, float]
) -> None:
    """The base really was stored low (int8 and NF4 tensors; fp8 weights between layer calls), and each step's loss
    is within `within[variant]` (relative) of the full-precision run's but not equal to it (equal would mean the
    option did nothing)."""
    _, fp8 = runs["fp8_storage"]
    for name, kind in (("int8", "Int8"), ("nf4", "NF4")):
        _, quantised = runs[name]
        types = {type(m.weight).__name__ for n, m in quantised.net.named_modules() if n.endswith("base_layer")}
        assert types and all(kind in t for t in types), types
    fp8_dtypes = {m.weight.dtype for n, m in fp8.net.named_modules() if n.endswith("base_layer")}
    assert torch.float8_e4m3fn in fp8_dtypes, fp8_dtypes
    adapters = [p for n, p in runs["nf4"][1].net.named_parameters() if ".lora_" in n]
    assert adapters and all(p.dtype == torch.float32 and p.requires_grad for p in adapters)  # trained at fp32
    full = losses_by_step(Path(runs["full"][0]).parents[1])
    for name in ("int8", "fp8_storage", "nf4"):
        low = losses_by_step(Path(runs[name][0]).parents[1])
        assert sorted(low) == sorted(full) and full
        gaps = [abs(low[step] - full[step]) / abs(full[step]) for step in full]
        assert max(gaps) < within[name], (name, gaps)
        assert max(gaps) > 0, name  # the control: the same losses would mean the base was not stored low
