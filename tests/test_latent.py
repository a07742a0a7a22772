"""Latent diffusion: text side, frozen parts, condition dropout, guidance, pretrained folders, a tiny run."""

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
from hydra.utils import instantiate
from PIL import Image
from torch.utils.data import default_collate

from lightdiff.config import ConfigError
from lightdiff.diffusion import NoiseSchedule
from lightdiff.nets.families import drop_conditions
from lightdiff.nets.families import sd as stable_diffusion_family
from lightdiff.nets.families.sd import CLIPText
from lightdiff.nets.text import (
    build_caption_tokenizer,
    text_encoder_fingerprint,
    text_encoder_from_scratch,
    tokenize_prompts,
    tokenizer_from_state,
    tokenizer_state,
)
from lightdiff.sample import run as sample_run
from lightdiff.sampling import for_latents, generate
from lightdiff.train import run as train_run
from lightdiff.trained import load_checkpoint_file, load_denoiser

from .conftest import (
    TINY,
    TINY_TEXT_MODEL,
    assert_reproduced,
    compose_config,
    pipeline_images,
    tiny_cond_unet,
    tiny_vae,
)
from .conftest import TINY_PIPELINE_CAPTIONS as CAPTIONS


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("vae") / "vae"
    tiny_vae().save_pretrained(folder)
    return folder


def _latent_overrides(root: Path, vae: Path, *extra: str) -> list[str]:
    return [
        f"output_root={root}",
        *TINY,
        "model=latent",
        f"model.vae={vae}",
        *TINY_TEXT_MODEL,
        *extra,
    ]


def test_condition_dropout_rate() -> None:
    tokenizer = build_caption_tokenizer(CAPTIONS, model_max_length=8)
    family = CLIPText(tokenizer, text_encoder_from_scratch(tokenizer, 16, 1, 2), trainable=False)
    random.seed(0)
    inputs, which = drop_conditions(family, {"text": ["a red circle"] * 20000}, 0.1, 20000)
    dropped = inputs["text"]
    assert abs(dropped.count("") / len(dropped) - 0.1) < 0.01
    assert set(dropped) == {"", "a red circle"} and [c == "" for c in dropped] == which.tolist()
    assert drop_conditions(family, {"text": ["x"] * 100}, 0.0, 100)[0]["text"] == ["x"] * 100


def test_guidance_scale_one_is_the_conditional_prediction() -> None:
    tokenizer = build_caption_tokenizer(CAPTIONS, model_max_length=8)
    encoder = text_encoder_from_scratch(tokenizer, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    vae, unet = tiny_vae().eval(), tiny_cond_unet().eval()
    schedule = NoiseSchedule("scaled_linear", 1000, 0.00085, 0.012)

    def sample(scale: float, negative: str = "") -> torch.Tensor:
        scheduler = DDIMScheduler(**schedule.scheduler_kwargs())
        text = CLIPText(tokenizer, encoder, trainable=False)
        return generate(unet, scheduler, 3, [0, 1], text, {"text": CAPTIONS[:2]}, scale, negative, vae=vae)

    plain = sample(1.0)  # no guidance: the conditional network alone
    guided_by_one = sample(1.0 + 1e-7)  # the guided path with w ~ 1: uncond + (cond - uncond) = cond
    torch.testing.assert_close(plain, guided_by_one, atol=1e-5, rtol=0)
    assert not torch.allclose(sample(4.0), plain, atol=1e-3)
    assert not torch.allclose(sample(4.0, "a white circle"), sample(4.0), atol=1e-4)  # the negative prompt matters


def test_two_step_run_trains_text_and_unet_keeps_vae_frozen(vae_dir: Path, tmp_path: Path) -> None:
    cfg = compose_config("train", _latent_overrides(tmp_path, vae_dir, "run_name=lat"))
    trainer = train_run(cfg)
    module = trainer.lightning_module
    assert not any(p.requires_grad for p in module.vae.parameters())
    reference = AutoencoderKL.from_pretrained(vae_dir)
    for name, value in reference.state_dict().items():
        assert torch.equal(value, module.vae.state_dict()[name]), name  # the VAE never moved
    checkpoint = load_checkpoint_file(Path(cfg.run_dir) / "checkpoints" / "last.ckpt")
    meta = checkpoint["lightdiff"]
    assert meta["method"] == "diffusion" and meta["net_class"] == "UNet2DConditionModel"
    tokenizer = tokenizer_from_state(meta["conditioning"]["tokenizer"])
    assert tokenizer.tokenize("a red circle") == ["a</w>", "red</w>", "circle</w>"]
    text_keys = [k for k in checkpoint["state_dict"] if k.startswith("conditioning.text_encoder.")]
    assert text_keys  # the from-scratch text encoder is saved and was optimised
    optimised = sum(len(group["params"]) for group in checkpoint["optimizer_states"][0]["param_groups"])
    assert optimised == len(list(module.net.parameters())) + len(list(module.conditioning.text_encoder.parameters()))
    assert (Path(cfg.run_dir) / "final_metrics.json").exists()


def test_pretrained_folder_gives_frozen_text_side(pipeline_dir: Path, tmp_path: Path) -> None:
    cfg = compose_config(
        "train",
        _latent_overrides(tmp_path, pipeline_dir, "run_name=pre", f"model.pretrained={pipeline_dir}", "model.vae=null"),
    )
    trainer = train_run(cfg)
    module = trainer.lightning_module
    assert not any(p.requires_grad for p in module.conditioning.text_encoder.parameters())
    assert (
        module.conditioning.tokenizer.model_max_length == 8
    )  # the pipeline's tokenizer, not one built from the captions
    unfrozen = compose_config(
        "train",
        _latent_overrides(
            tmp_path,
            pipeline_dir,
            "run_name=pre2",
            f"model.pretrained={pipeline_dir}",
            "model.vae=null",
            "model.train_text_encoder=true",
        ),
    )
    assert all(p.requires_grad for p in train_run(unfrozen).lightning_module.conditioning.text_encoder.parameters())


def test_pretrained_folder_missing_a_part_is_named(pipeline_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(pipeline_dir, broken)
    shutil.rmtree(broken / "text_encoder")
    cfg = compose_config("train", _latent_overrides(tmp_path, broken, f"model.pretrained={broken}", "model.vae=null"))
    with pytest.raises(ConfigError, match="text_encoder"):
        train_run(cfg)
    assert not Path(cfg.run_dir).exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("net.cross_attention_dim=32", "net.cross_attention_dim=32 differs from the text encoder's hidden_size=16"),
        ("net.in_channels=3", "latent_channels=4"),
        ("net.sample_size=16", "net.sample_size=16 does not match data.resolution=16"),
    ],
)
def test_mismatched_networks_are_named(override: str, message: str, vae_dir: Path, tmp_path: Path) -> None:
    cfg = compose_config("train", _latent_overrides(tmp_path, vae_dir, override))
    with pytest.raises(ConfigError, match=message):
        train_run(cfg)
    assert not Path(cfg.run_dir).exists()


@pytest.fixture(scope="module")
def latent_ckpt(vae_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("latent")
    cfg = compose_config("train", _latent_overrides(root, vae_dir, "run_name=lat", "trainer.max_steps=3"))
    train_run(cfg)
    return Path(cfg.run_dir) / "checkpoints" / "last.ckpt"


def test_a_format_1_latent_checkpoint_still_samples_the_same_images(latent_ckpt: Path, tmp_path: Path) -> None:
    """Checkpoints written before conditioning families (format 1: the text encoder under `text_encoder.`, its
    config, tokenizer, schedule and prediction type beside the objective's name) load and sample as before."""
    checkpoint = load_checkpoint_file(latent_ckpt)
    meta = checkpoint["lightdiff"]
    text = meta["conditioning"]
    objective = meta["objective"]
    legacy = {
        "format": 1,
        "method": "latent",
        "net_class": meta["net_class"],
        "net_config": meta["net_config"],
        "vae_config": meta["vae_config"],
        "text_encoder_class": text["text_encoder_class"],
        "text_encoder_config": text["text_encoder_config"],
        "tokenizer": text["tokenizer"],
        "schedule": objective["schedule"],
        "prediction_type": objective["prediction_type"],
        "objective": {"name": "ddpm"},
        "class_names": meta["class_names"],
    }
    renamed = {
        k.replace("conditioning.text_encoder.", "text_encoder.", 1): v for k, v in checkpoint["state_dict"].items()
    }
    assert renamed.keys() != checkpoint["state_dict"].keys()  # the text encoder's weights really moved
    torch.save({**checkpoint, "state_dict": renamed, "lightdiff": legacy}, tmp_path / "format1.ckpt")
    new, old = load_denoiser(latent_ckpt), load_denoiser(tmp_path / "format1.ckpt")
    assert old.objective == new.objective and old.conditioning.state() == new.conditioning.state()
    scheduler = for_latents(new.objective.scheduler(DDIMScheduler))
    inputs = {"text": ["a red circle", "a blue square"]}
    images = [generate(d.net, scheduler, 3, [0, 1], d.conditioning, inputs, 4.0, vae=d.vae) for d in (new, old)]
    assert torch.equal(images[0], images[1])


def test_sample_prompts_and_metadata(latent_ckpt: Path, tmp_path: Path) -> None:
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("a red circle\n\na blue square\n")
    out = sample_run(
        compose_config(
            "sample",
            [
                f"ckpt={latent_ckpt}",
                f"out={tmp_path / 's'}",
                "num_images=3",
                "steps=3",
                f"prompts_file={prompts_file}",
                "guidance_scale=3",
            ],
        )
    )
    records = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["text"] for r in records] == ["a red circle", "a blue square", "a red circle"]
    assert records[0]["guidance_scale"] == 3.0
    single = sample_run(
        compose_config(
            "sample",
            [f"ckpt={latent_ckpt}", f"out={tmp_path / 'p'}", "num_images=2", "steps=3", "prompt=a blue square"],
        )
    )
    first = np.asarray(Image.open(single / "000000.png"))
    assert first.shape == (16, 16, 3)
    with pytest.raises(ConfigError, match="not both"):
        sample_run(
            compose_config(
                "sample", [f"ckpt={latent_ckpt}", f"out={tmp_path / 'x'}", "prompt=a", f"prompts_file={prompts_file}"]
            )
        )


def test_export_round_trip_with_plain_diffusers(latent_ckpt: Path, tmp_path: Path) -> None:
    folder = sample_run(compose_config("sample", [f"ckpt={latent_ckpt}", f"export={tmp_path / 'sd'}"]))
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (folder / part).is_dir(), part
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    pipeline = StableDiffusionPipeline.from_pretrained(folder)
    prompts, seeds = ["a red circle", "a blue square"], [3, 4]
    theirs = pipeline_images(
        pipeline,
        prompts,
        seeds=seeds,
        rounded=False,
        num_inference_steps=5,
        guidance_scale=4.0,
        negative_prompt=["", ""],
    )
    denoiser = load_denoiser(latent_ckpt)
    sampler = instantiate(compose_config("sample", ["ckpt=x", "sampler=ddim"]).sampler)
    scheduler = for_latents(denoiser.objective.scheduler(sampler))
    inputs = {"text": prompts}
    ours = generate(denoiser.net, scheduler, 5, seeds, denoiser.conditioning, inputs, 4.0, "", vae=denoiser.vae)
    assert_reproduced(ours, theirs, 1e-4)
    # sample.py gives the same images from the checkpoint and from the exported folder
    a = sample_run(
        compose_config(
            "sample", [f"ckpt={latent_ckpt}", f"out={tmp_path / 'a'}", "num_images=2", "steps=4", "prompt=a red circle"]
        )
    )
    b = sample_run(
        compose_config(
            "sample", [f"ckpt={folder}", f"out={tmp_path / 'b'}", "num_images=2", "steps=4", "prompt=a red circle"]
        )
    )
    assert np.array_equal(np.asarray(Image.open(a / "000001.png")), np.asarray(Image.open(b / "000001.png")))


def test_latent_cache_hit_miss_and_invalidation(
    vae_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from lightdiff.data import ShapesDataModule

    cache = tmp_path / "cache"
    data = ShapesDataModule(resolution=16, size=24, batch_size=8, cache_latents=True, latent_cache_dir=str(cache))
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    with caplog.at_level("INFO"):
        data.use_latent_cache(vae)
    assert "latent cache miss" in caplog.text and len(list(cache.glob("latents-*.pt"))) == 1
    item = data.dataset[5]
    with torch.no_grad():
        expected = vae.encode(data.source_dataset[5]["pixel_values"][None]).latent_dist.parameters[0]
    torch.testing.assert_close(item["latent_moments"], expected, atol=2e-2, rtol=1e-2)  # stored as float16
    assert item["text"] == data.source_dataset[5]["text"] and item["label"] == data.source_dataset[5]["label"]

    caplog.clear()
    with caplog.at_level("INFO"):
        ShapesDataModule(
            resolution=16, size=24, batch_size=8, cache_latents=True, latent_cache_dir=str(cache)
        ).use_latent_cache(vae)
    assert "latent cache hit" in caplog.text and len(list(cache.glob("latents-*.pt"))) == 1

    changed = AutoencoderKL.from_pretrained(vae_dir).eval()
    with torch.no_grad():
        changed.decoder.conv_out.bias.add_(0.1)  # another VAE: the cache must not be reused
    ShapesDataModule(
        resolution=16, size=24, batch_size=8, cache_latents=True, latent_cache_dir=str(cache)
    ).use_latent_cache(changed)
    other_data = ShapesDataModule(
        resolution=16, size=24, seed=1, batch_size=8, cache_latents=True, latent_cache_dir=str(cache)
    )
    other_data.use_latent_cache(vae)  # another data set: likewise
    assert len(list(cache.glob("latents-*.pt"))) == 3

    with pytest.raises(ConfigError, match="random_flip=false"):
        ShapesDataModule(resolution=16, size=24, batch_size=8, random_flip=True, cache_latents=True)


def test_training_from_the_latent_cache(vae_dir: Path, tmp_path: Path) -> None:
    cfg = compose_config(
        "train",
        _latent_overrides(
            tmp_path,
            vae_dir,
            "run_name=cached",
            "data.cache_latents=true",
            f"data.latent_cache_dir={tmp_path / 'cache'}",
        ),
    )
    trainer = train_run(cfg)
    assert trainer.global_step == 2
    assert len(list((tmp_path / "cache").glob("latents-*.pt"))) == 1
    assert "latent_moments" in trainer.datamodule.dataset[0]
    with pytest.raises(ConfigError, match="for model=latent"):
        train_run(
            compose_config("train", [f"output_root={tmp_path}", *TINY, "run_name=pix", "data.cache_latents=true"])
        )


def test_text_cache_for_a_frozen_encoder_hit_miss_and_invalidation(tmp_path: Path) -> None:
    from lightdiff.data import ShapesDataModule

    cache = tmp_path / "cache"
    vae = tiny_vae().eval()
    tokenizer = build_caption_tokenizer(CAPTIONS * 5, vocab_size=300, model_max_length=8)
    encoder = text_encoder_from_scratch(tokenizer, hidden_size=16, num_hidden_layers=1, num_attention_heads=2).eval()
    calls: list[list[str]] = []

    def encode(prompts: list[str]) -> torch.Tensor:
        calls.append(list(prompts))
        return encoder(tokenize_prompts(tokenizer, prompts))[0]

    def data() -> ShapesDataModule:
        return ShapesDataModule(resolution=16, size=48, batch_size=8, cache_latents=True, latent_cache_dir=str(cache))

    first = data()
    first.use_latent_cache(vae, text_encoder_fingerprint(tokenizer, encoder), encode)
    texts = [first.source_dataset[i]["text"] for i in range(48)]
    assert sorted(sum(calls, [])) == sorted(set(texts))  # each distinct caption encoded once, not once per image
    for index in (0, 7, 31):
        with torch.no_grad():
            expected = encoder(tokenize_prompts(tokenizer, [texts[index]]))[0][0]
        torch.testing.assert_close(first.dataset[index]["text_states"], expected, atol=5e-3, rtol=1e-2)  # float16

    calls.clear()
    data().use_latent_cache(vae, text_encoder_fingerprint(tokenizer, encoder), encode)
    assert calls == []  # a hit encodes nothing
    with torch.no_grad():
        encoder.final_layer_norm.bias.add_(0.1)  # another encoder: new text cache, same latents
    data().use_latent_cache(vae, text_encoder_fingerprint(tokenizer, encoder), encode)
    assert calls and len(list(cache.glob("text-*.pt"))) == 2 and len(list(cache.glob("latents-*.pt"))) == 1
    latents_only = data()
    latents_only.use_latent_cache(vae)  # no text side given: latents only
    assert "text_states" not in latents_only.dataset[0]


def test_training_step_from_cached_text_states_matches_encoding(
    pipeline_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    overrides = [
        f"model.pretrained={pipeline_dir}",
        "model.vae=null",
        "model.cond_drop_prob=0.5",
        "data.cache_latents=true",
        f"data.latent_cache_dir={tmp_path / 'cache'}",
    ]
    trainer = train_run(compose_config("train", _latent_overrides(tmp_path, pipeline_dir, "run_name=tc", *overrides)))
    module = trainer.lightning_module
    assert len(list((tmp_path / "cache").glob("text-*.pt"))) == 1
    cached = module.trainer.datamodule.dataset
    batch = default_collate([cached[i] for i in range(8)])
    assert "text_states" in batch
    monkeypatch.setattr(module, "log", lambda *args, **kwargs: None)  # outside fit there is no loop to log to
    received: list[torch.Tensor] = []
    module.net.register_forward_pre_hook(
        lambda net, args, kwargs: received.append(kwargs["encoder_hidden_states"]), with_kwargs=True
    )

    def step(batch: dict) -> torch.Tensor:
        random.seed(3)  # the same captions are dropped
        torch.manual_seed(3)  # the same z, noise and timesteps
        return module.training_step(batch, 0)

    family = module.conditioning
    encode, encoded_prompts = family.encode, []
    monkeypatch.setattr(family, "encode", lambda prompts: encoded_prompts.append(prompts) or encode(prompts))
    with torch.no_grad():
        from_cache = step(batch)
        assert encoded_prompts == [[""]]  # only the dropped captions' state is computed; the rest come from the cache
        encoded = step({key: value for key, value in batch.items() if key != "text_states"})
    torch.testing.assert_close(received[0], received[1], atol=5e-3, rtol=1e-2)
    torch.testing.assert_close(from_cache, encoded)

    trainable = train_run(
        compose_config(
            "train",
            _latent_overrides(tmp_path, pipeline_dir, "run_name=tc2", *overrides, "model.train_text_encoder=true"),
        )
    )
    assert "text_states" not in trainable.datamodule.dataset[0]  # a text encoder that learns is never cached
    assert len(list((tmp_path / "cache").glob("text-*.pt"))) == 1


def test_sampling_speed_path_on_a_text_model(latent_ckpt: Path, tmp_path: Path) -> None:
    """bf16 + fused QKV on the cross-attention UNet: VAE and text encoder follow the dtype, the check passes."""
    common = [f"ckpt={latent_ckpt}", "num_images=2", "steps=3", "prompt=a red circle"]
    plain = sample_run(compose_config("sample", [*common, f"out={tmp_path / 'plain'}"]))
    fast = sample_run(
        compose_config("sample", [*common, f"out={tmp_path / 'fast'}", "speed.dtype=bfloat16", "speed.fuse_qkv=true"])
    )
    a, b = (
        np.stack([np.asarray(Image.open(p), dtype=np.float64) for p in sorted(f.glob("0*.png"))]) for f in (plain, fast)
    )
    assert np.abs(a - b).mean(axis=(1, 2, 3)).max() / 255 <= 3e-2
    assert json.loads((fast / "metadata.jsonl").read_text().splitlines()[0])["speed"]["fuse_qkv"] is True


def test_resume_takes_the_checkpoints_tokenizer_not_a_rebuilt_one(
    vae_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A from-scratch tokenizer is rebuilt from the captions when a run starts, and the `tokenizers` BPE trainer
    numbers tokens differently from one process to the next: a resumed run must use the checkpoint's tokenizer, or
    its trained text encoder reads every prompt through the wrong embedding rows."""
    first = train_run(compose_config("train", _latent_overrides(tmp_path, vae_dir, "run_name=tok")))
    saved = first.lightning_module.conditioning.tokenizer
    state = tokenizer_state(saved)
    red, blue = state["vocab"]["red</w>"], state["vocab"]["blue</w>"]
    state["vocab"]["red</w>"], state["vocab"]["blue</w>"] = blue, red  # what another process may number
    renumbered = tokenizer_from_state(state)
    monkeypatch.setattr(stable_diffusion_family, "build_caption_tokenizer", lambda *args, **kwargs: renumbered)
    resumed = train_run(
        compose_config("train", _latent_overrides(tmp_path, vae_dir, "run_name=tok", "trainer.max_steps=3"))
    )
    assert resumed.global_step == 3
    tokenizer = resumed.lightning_module.conditioning.tokenizer
    assert tokenizer("a red circle").input_ids == saved("a red circle").input_ids
    # Negative control: the tokenizer the resumed run built reads "red" as another token.
    assert renumbered("a red circle").input_ids != saved("a red circle").input_ids
