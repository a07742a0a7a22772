"""LoRA adapters (issue 18): only the adapters train and are saved, the base stays bit-identical, resume is exact,
diffusers reads the exports (LoRA file and fused), a turbo LoRA student is the teacher with adapters off, and bad
input is refused by name before anything is written."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DiTTransformer2DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from hydra.utils import instantiate
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextModel

from lightdiff.config import ConfigError, check_config
from lightdiff.nets.lora import (
    LORA_WEIGHTS_FILE,
    LoraSettings,
    adapter_parameters,
    adapters_disabled,
    add_adapters,
    base_fingerprint,
    has_adapters,
    load_lora_file,
    lora_config,
    without_adapters,
    write_lora_file,
)
from lightdiff.sample import run as sample_run
from lightdiff.sampling import for_latents, generate
from lightdiff.train import run as train_run
from lightdiff.trained import load_checkpoint_file, load_denoiser

from .conftest import TINY, TINY_TEXT_MODEL, assert_reproduced, compose_config, pipeline_images


@pytest.fixture(scope="module")
def sd_base(text_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's tiny text model exported as a StableDiffusionPipeline folder: the base every LoRA run adapts."""
    folder = tmp_path_factory.mktemp("lora_base") / "sd"
    return sample_run(compose_config("sample", [f"ckpt={text_ckpt}", f"export={folder}"]))


def _lora_overrides(root: Path, base: Path, *extra: str) -> list[str]:
    return [
        f"output_root={root}",
        *TINY,
        "model=latent",
        f"model.pretrained={base}",
        "model.load_pretrained_unet=true",
        "model.vae=null",
        "model.lora.rank=4",
        "model.lr=0.05",  # adapters that move visibly in 2 steps: the exports below must show them
        "model.warmup_steps=0",
        *TINY_TEXT_MODEL,
        *extra,
    ]


@pytest.fixture(scope="module")
def lora_ckpt(sd_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lora_run")
    cfg = compose_config("train", _lora_overrides(root, sd_base, "run_name=lora"))
    train_run(cfg)
    return Path(cfg.run_dir) / "checkpoints" / "last.ckpt"


def _base_unet(base: Path) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(base / "unet")


def test_only_adapters_train_and_are_saved_and_the_base_stays_bit_identical(sd_base: Path, lora_ckpt: Path) -> None:
    checkpoint = load_checkpoint_file(lora_ckpt)
    weights = checkpoint["state_dict"]
    assert weights and all(".lora_A." in key or ".lora_B." in key for key in weights)  # no base, VAE or text encoder
    assert all(key.startswith("net.") for key in weights)
    record = checkpoint["lightdiff"]["lora"]
    assert record["config"]["r"] == 4 and record["base"]["source"] == str(sd_base.resolve())
    assert record["config"]["target_modules"] == sorted(["to_q", "to_k", "to_v", "to_out.0"])
    trained = load_denoiser(lora_ckpt, use_ema=False)
    adapters = adapter_parameters(trained.net)
    assert len(weights) == len(adapters)
    optimised = sum(len(group["params"]) for group in checkpoint["optimizer_states"][0]["param_groups"])
    assert optimised == len(adapters)  # the optimiser holds the adapters alone
    assert len(checkpoint["callbacks"]["ema"]["shadow_params"]) == len(adapters)  # and so does the EMA
    # The whole file (adapters, their Adam moments and EMA, metadata) is smaller than the base UNet's weights alone.
    assert lora_ckpt.stat().st_size < 0.5 * (sd_base / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    # The base is bit-identical to the pipeline's UNet; the adapters moved (B starts at zero).
    base = _base_unet(sd_base).state_dict()
    kept = without_adapters(trained.net, fused=False).state_dict()
    assert kept.keys() == base.keys() and all(torch.equal(kept[k], base[k]) for k in base)
    assert record["base"]["fingerprint"] == base_fingerprint(_base_unet(sd_base))
    b_weights = [v for k, v in weights.items() if ".lora_B." in k]
    assert all(v.abs().max() > 0 for v in b_weights)
    # Negative control: the fused network differs from the base, so the comparison above would see a change.
    fused = without_adapters(trained.net, fused=True).state_dict()
    assert any(not torch.equal(fused[k], base[k]) for k in base)


def test_resume_with_lora_is_bit_identical(sd_base: Path, tmp_path: Path) -> None:
    constant = "model.lr_schedule=constant"  # the cosine schedule depends on max_steps, which the split run changes
    straight = compose_config(
        "train", _lora_overrides(tmp_path, sd_base, "run_name=straight", "trainer.max_steps=4", constant)
    )
    train_run(straight)
    first = compose_config(
        "train", _lora_overrides(tmp_path, sd_base, "run_name=split", "trainer.max_steps=2", constant)
    )
    train_run(first)
    halfway = load_checkpoint_file(Path(first.run_dir) / "checkpoints" / "last.ckpt")
    resumed = compose_config(
        "train", _lora_overrides(tmp_path, sd_base, "run_name=split", "trainer.max_steps=4", "resume=true", constant)
    )
    train_run(resumed)
    a = load_checkpoint_file(Path(straight.run_dir) / "checkpoints" / "last.ckpt")
    b = load_checkpoint_file(Path(resumed.run_dir) / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 4
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    shadow_a, shadow_b = a["callbacks"]["ema"]["shadow_params"], b["callbacks"]["ema"]["shadow_params"]
    assert all(torch.equal(x, y) for x, y in zip(shadow_a, shadow_b))
    # Negative control: the 2-step checkpoint differs, so equality above is not vacuous.
    assert halfway["global_step"] == 2
    assert any(not torch.equal(a["state_dict"][k], halfway["state_dict"][k]) for k in a["state_dict"])


def _diffusers_images(pipeline: StableDiffusionPipeline, prompts: list[str], seeds: list[int]) -> np.ndarray:
    return pipeline_images(
        pipeline,
        prompts,
        seeds=seeds,
        rounded=False,
        num_inference_steps=4,
        guidance_scale=4.0,
        negative_prompt=[""] * len(prompts),
    )


def _our_images(source: Path, prompts: list[str], seeds: list[int]) -> np.ndarray:
    denoiser = load_denoiser(source)
    sampler = instantiate(compose_config("sample", ["ckpt=x", "sampler=ddim"]).sampler)
    scheduler = for_latents(denoiser.objective.scheduler(sampler))
    images = generate(
        denoiser.net, scheduler, 4, seeds, denoiser.conditioning, {"text": prompts}, 4.0, "", vae=denoiser.vae
    )
    return images.permute(0, 2, 3, 1).numpy()


def test_exports_load_in_plain_diffusers_as_lora_file_and_fused(sd_base: Path, lora_ckpt: Path, tmp_path: Path) -> None:
    prompts, seeds = ["a red circle", "a blue square"], [3, 4]
    ours = _our_images(lora_ckpt, prompts, seeds)
    base_images = _diffusers_images(StableDiffusionPipeline.from_pretrained(sd_base), prompts, seeds)
    assert np.abs(ours - base_images).max() > 1e-3  # the adapters change the images (negative control)

    folder = sample_run(compose_config("sample", [f"ckpt={lora_ckpt}", f"export={tmp_path / 'lora'}"]))
    assert json.loads((folder / "lightdiff.json").read_text())["lora"] == "file"
    with safe_open(str(folder / LORA_WEIGHTS_FILE), framework="pt") as handle:
        assert all(key.startswith("unet.") and ".lora_" in key for key in handle.keys())
    exported_unet = UNet2DConditionModel.from_pretrained(folder / "unet").state_dict()
    base_unet = _base_unet(sd_base).state_dict()
    assert all(torch.equal(exported_unet[k], base_unet[k]) for k in base_unet)  # the base, as it was
    pipeline = StableDiffusionPipeline.from_pretrained(folder)
    pipeline.load_lora_weights(folder)
    assert_reproduced(ours, _diffusers_images(pipeline, prompts, seeds), 1e-4)
    assert np.abs(_our_images(folder, prompts, seeds) - ours).max() < 1e-5  # lightdiff reads its export back

    fused = sample_run(
        compose_config("sample", [f"ckpt={lora_ckpt}", f"export={tmp_path / 'fused'}", "export_fused=true"])
    )
    assert not (fused / LORA_WEIGHTS_FILE).exists()
    plain = StableDiffusionPipeline.from_pretrained(fused)
    assert np.abs(_diffusers_images(plain, prompts, seeds) - ours).max() < 1e-4


def test_sample_applies_a_lora_file_to_a_base_at_a_scale(sd_base: Path, lora_ckpt: Path, tmp_path: Path) -> None:
    export = sample_run(compose_config("sample", [f"ckpt={lora_ckpt}", f"export={tmp_path / 'lora'}"]))

    def images(out: str, *extra: str) -> np.ndarray:
        folder = sample_run(
            compose_config(
                "sample",
                [f"ckpt={sd_base}", f"out={tmp_path / out}", "num_images=2", "steps=3", "prompt=a red circle", *extra],
            )
        )
        return np.stack([np.asarray(Image.open(folder / f"{i:06d}.png")) for i in range(2)]).astype(int)

    base = images("base")
    full = images("full", f"lora={export / LORA_WEIGHTS_FILE}")
    zero = images("zero", f"lora={export}", "lora_scale=0")
    half = images("half", f"lora={export}", "lora_scale=0.5")
    assert np.array_equal(zero, base)  # scale 0 is the base
    assert np.abs(full - base).max() > 0 and np.abs(half - base).max() > 0 and np.abs(half - full).max() > 0
    from_ckpt = sample_run(
        compose_config(
            "sample",
            [f"ckpt={lora_ckpt}", f"out={tmp_path / 'ckpt'}", "num_images=2", "steps=3", "prompt=a red circle"],
        )
    )
    ckpt_images = np.stack([np.asarray(Image.open(from_ckpt / f"{i:06d}.png")) for i in range(2)]).astype(int)
    assert np.abs(ckpt_images - full).max() <= 1  # the checkpoint and its exported file agree (PNG rounding)
    record = json.loads((tmp_path / "half" / "metadata.jsonl").read_text().splitlines()[0])
    assert record["lora_scale"] == 0.5 and record["lora"] == str(export)


def _tiny_transformers() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {
        "dit": DiTTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=3,
            num_layers=1,
            sample_size=8,
            patch_size=2,
            num_embeds_ada_norm=4,
            norm_num_groups=4,
        ),
        "pixart": PixArtTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=4,
            num_layers=1,
            sample_size=8,
            patch_size=2,
            cross_attention_dim=16,
            caption_channels=16,
        ),
        # two blocks: the last one of an MMDiT has no text-stream output (context_pre_only)
        "sd3": SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=16,
            caption_projection_dim=16,
            pooled_projection_dim=16,
            out_channels=4,
        ),
    }


def _randomise_adapters(net: torch.nn.Module) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in adapter_parameters(net):
            parameter.normal_(std=0.1)


@pytest.mark.parametrize("name", ["dit", "pixart", "sd3"])
def test_transformer_presets_round_trip_through_diffusers_format(name: str, tmp_path: Path) -> None:
    net = _tiny_transformers()[name]
    config = lora_config(net, LoraSettings(rank=2))
    assert {"to_q", "to_k", "to_v", "to_out.0", "ff.net.2"} <= set(config.target_modules)  # attention + feed-forward
    if name == "sd3":
        assert {"add_q_proj", "to_add_out", "ff_context.net.2"} <= set(config.target_modules)  # MMDiT's text stream
    fresh = type(net).from_config(net.config)
    fresh.load_state_dict(net.state_dict())
    add_adapters(net, config)
    _randomise_adapters(net)
    file = write_lora_file(net, tmp_path)
    load_lora_file(fresh, file)
    ours = {k: v for k, v in net.state_dict().items()}
    theirs = fresh.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    if name == "sd3":  # plain diffusers reads the file into a fresh transformer the same way
        plain = SD3Transformer2DModel.from_config(net.config)
        plain.load_state_dict(without_adapters(net, fused=False).state_dict())
        plain.load_lora_adapter(str(file), prefix="transformer")
        inputs = dict(
            hidden_states=torch.randn(1, 4, 8, 8),
            encoder_hidden_states=torch.randn(1, 3, 16),
            pooled_projections=torch.randn(1, 16),
            timestep=torch.tensor([10]),
        )
        with torch.no_grad():
            assert torch.allclose(plain(**inputs).sample, net(**inputs).sample, atol=1e-5)
            with adapters_disabled(net):
                assert not torch.allclose(plain(**inputs).sample, net(**inputs).sample, atol=1e-4)


def test_pixel_unet_lora_with_convolutions(pixel_ckpt: Path, tmp_path: Path) -> None:
    no_attention = UNet2DModel(
        sample_size=8,
        block_out_channels=[8, 16],
        down_block_types=["DownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "UpBlock2D"],
        norm_num_groups=4,
        add_attention=False,
    )
    with pytest.raises(ConfigError, match="convolutions=true"):  # the preset adapts attention, which it lacks
        lora_config(no_attention, LoraSettings(rank=2))
    base = sample_run(compose_config("sample", [f"ckpt={pixel_ckpt}", f"export={tmp_path / 'ddpm'}"]))
    cfg = compose_config(
        "train",
        [
            f"output_root={tmp_path}",
            *TINY,
            f"model.pretrained={base}",
            "model.load_pretrained_unet=true",
            "model.lora.rank=2",
            "model.lora.convolutions=true",
            "run_name=pixel_lora",
        ],
    )
    module = train_run(cfg).lightning_module
    assert module.vae is None and has_adapters(module.net)
    names = [n for n, p in module.net.named_parameters() if p.requires_grad]
    assert names and all(".lora_" in n for n in names)
    assert any("resnets.0.conv1" in n for n in names) and any("mid_block.attentions.0.to_q" in n for n in names)
    trained = load_denoiser(Path(cfg.run_dir) / "checkpoints" / "last.ckpt")
    assert has_adapters(trained.net) and trained.vae is None


def test_turbo_lora_student_is_the_teacher_with_adapters_off(text_ckpt: Path, tmp_path: Path) -> None:
    cfg = compose_config(
        "train",
        [
            f"output_root={tmp_path}",
            *TINY,
            "model=turbo",
            f"model.teacher={text_ckpt}",
            "model.lora.rank=4",
            "model.lr=0.05",
            "model.teacher_steps=2",
            "run_name=turbo_lora",
        ],
    )
    module = train_run(cfg).lightning_module
    assert module.net is module.teacher.net  # one copy of the network
    teacher = load_denoiser(text_ckpt).net
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 500])
    states = torch.randn(2, 8, 16)
    with torch.no_grad():
        reference = teacher(x, t, states).sample
        with adapters_disabled(module.net):
            assert torch.equal(module.net(x, t, states).sample, reference)  # adapters off = the teacher, exactly
        assert not torch.allclose(module.net(x, t, states).sample, reference, atol=1e-4)  # on = the student
    checkpoint = load_checkpoint_file(Path(cfg.run_dir) / "checkpoints" / "last.ckpt")
    net_keys = [k for k in checkpoint["state_dict"] if k.startswith("net.")]
    assert net_keys and all(".lora_" in k for k in net_keys)
    assert not any(k.startswith("teacher.") for k in checkpoint["state_dict"])
    student = load_denoiser(Path(cfg.run_dir) / "checkpoints" / "last.ckpt", use_ema=False)
    with torch.no_grad():
        assert torch.allclose(student.net(x, t, states).sample, module.net(x, t, states).sample, atol=1e-6)
    assert student.scheduler_overrides == checkpoint["lightdiff"]["scheduler_overrides"]


# ----- bad input: named, and nothing written ---------------------------------------------------------------------


def test_bad_lora_settings_are_named(sd_base: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model.lora.rank"):
        check_config(compose_config("train", _lora_overrides(tmp_path, sd_base, "model.lora.rank=0")))
    cfg = compose_config(
        "train", _lora_overrides(tmp_path, sd_base, "run_name=bad", "model.lora.target_modules=[to_qq]")
    )
    with pytest.raises(ConfigError, match=r"target_modules: \['to_qq'\] match no module"):
        train_run(cfg)
    no_base = compose_config(
        "train", _lora_overrides(tmp_path, sd_base, "run_name=bad", "model.load_pretrained_unet=false")
    )
    with pytest.raises(ConfigError, match="load_pretrained_unet=true"):
        train_run(no_base)
    assert not (tmp_path / "bad").exists()


def test_a_low_precision_base_is_refused_where_it_cannot_apply(
    sd_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """model.base_quantization / model.base_storage store a frozen base under LoRA: refused, naming the key and the
    remedy, for a base that trains, for both at once, and without torchao, before a run folder is written."""
    whole = ["model.lora.rank=null", "model.base_quantization=int8", "run_name=bad"]
    with pytest.raises(ConfigError, match=r"model.base_quantization=int8 stores a frozen base .* set model.lora.rank"):
        train_run(compose_config("train", _lora_overrides(tmp_path, sd_base, *whole)))
    both = ["model.base_quantization=int8", "model.base_storage=fp8", "run_name=bad"]
    with pytest.raises(ConfigError, match="model.base_quantization=int8 and model.base_storage=fp8: one or the other"):
        train_run(compose_config("train", _lora_overrides(tmp_path, sd_base, *both)))
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # as if torchao were not installed
    missing = ["model.base_quantization=fp8", "run_name=bad"]
    with pytest.raises(
        ConfigError, match=r"model.base_quantization=fp8 needs torchao: pip install 'lightdiff\[quant\]'"
    ):
        train_run(compose_config("train", _lora_overrides(tmp_path, sd_base, *missing)))
    assert not (tmp_path / "bad").exists()
    # the lighter option needs no torchao: it stores the base in fp8 between its layers' calls
    monkeypatch.setitem(sys.modules, "torchao", None)
    from lightdiff.nets.low_precision import check_base_precision

    check_base_precision("none", "fp8", base_trains=False)


def test_an_fp8_stored_unet_base_trains_its_adapters_through_its_convolutions() -> None:
    """model.base_storage=fp8 on a UNet whose ResNet convolutions follow the adapted attention (every SD / SDXL UNet):
    the linear layers are stored in fp8, the convolutions are not, and the adapters get gradients through the whole
    network. The control: diffusers' layerwise casting with its own defaults (convolutions cast too) cannot backward
    through a convolution (it reads the fp8 weight put back after the layer ran)."""
    from lightdiff.nets.lora import LoraSettings, adapt
    from lightdiff.nets.low_precision import store_frozen_base

    from .conftest import tiny_cond_unet

    def adapted() -> UNet2DConditionModel:
        torch.manual_seed(0)
        unet = tiny_cond_unet()
        adapt(unet, LoraSettings(rank=2), base_source="random weights")
        return unet

    def loss(unet: UNet2DConditionModel) -> torch.Tensor:
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        states = torch.randn(1, 3, 16, generator=torch.Generator().manual_seed(2))
        return unet(x, torch.tensor([500]), states).sample.pow(2).mean()

    unet = adapted()
    store_frozen_base(unet, "none", "fp8")
    linear = [m.weight.dtype for n, m in unet.named_modules() if n.endswith("to_q.base_layer")]
    convolutions = {m.weight.dtype for m in unet.modules() if isinstance(m, torch.nn.Conv2d)}
    assert linear and set(linear) == {torch.float8_e4m3fn} and convolutions == {torch.float32}
    loss(unet).backward()
    lora_b = [p for n, p in unet.named_parameters() if ".lora_B." in n]  # A's gradient is 0 while B starts at 0
    assert lora_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)
    control = adapted()
    control.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    with pytest.raises(RuntimeError, match="Float8_e4m3fn"):
        loss(control).backward()


def test_checking_a_lora_files_fit_copies_no_weights(sd_base: Path, tmp_path: Path, monkeypatch) -> None:
    """The fit check injects the file's adapters into a copy of the network on the meta device (shapes, no storage:
    a second SDXL UNet would be 10 GB), and still names a file that does not fit. Control: the network it loads into
    keeps its real weights, and the loaded adapters are real tensors."""
    from lightdiff.nets import lora as lora_module

    unet = _base_unet(sd_base)
    add_adapters(unet, lora_config(unet, LoraSettings(rank=4)))
    file = write_lora_file(unet, tmp_path / "adapters")
    checked: list[torch.nn.Module] = []
    inject = lora_module.inject_adapter_in_model
    monkeypatch.setattr(lora_module, "inject_adapter_in_model", lambda *a, **k: checked.append(a[1]) or inject(*a, **k))
    target = _base_unet(sd_base)
    load_lora_file(target, file)
    assert checked and all(p.is_meta for p in checked[0].parameters())
    assert not any(p.is_meta for p in target.parameters())
    wider = UNet2DConditionModel.from_config({**dict(target.config), "cross_attention_dim": 32})
    with pytest.raises(ConfigError, match=r"does not fit UNet2DConditionModel"):
        load_lora_file(wider, file)


def test_lora_file_for_another_base_or_model_is_refused(
    sd_base: Path, lora_ckpt: Path, pixel_ckpt: Path, tmp_path: Path
) -> None:
    # A LoRA file made on a wider UNet (cross-attention 32 wide): the shapes do not fit this base.
    other = UNet2DConditionModel.from_config({**dict(_base_unet(sd_base).config), "cross_attention_dim": 32})
    add_adapters(other, lora_config(other, LoraSettings(rank=4)))
    wrong = write_lora_file(other, tmp_path / "other")
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"does not fit UNet2DConditionModel: .*attn2\.to_k\.lora_A\.weight"):
        sample_run(compose_config("sample", [f"ckpt={sd_base}", f"out={out}", f"lora={wrong}", "num_images=1"]))
    with pytest.raises(ConfigError, match="already has LoRA adapters"):
        sample_run(compose_config("sample", [f"ckpt={lora_ckpt}", f"out={out}", f"lora={wrong}", "num_images=1"]))
    with pytest.raises(ConfigError, match="no LoRA adapters"):
        sample_run(compose_config("sample", [f"ckpt={pixel_ckpt}", f"out={out}", "lora_scale=0.5", "num_images=1"]))
    unet_lora = tmp_path / "unet_lora.safetensors"
    shutil.copy(wrong, unet_lora)
    with pytest.raises(ConfigError, match="another network"):  # a UNet's adapters on a pixel UNet without attention
        sample_run(compose_config("sample", [f"ckpt={pixel_ckpt}", f"out={out}", f"lora={unet_lora}", "num_images=1"]))
    kohya = tmp_path / "kohya.safetensors"  # another tool's key format: named, not half-applied
    save_file({"lora_unet_mid_block_attn1_to_q.lora_down.weight": torch.zeros(4, 32)}, kohya)
    with pytest.raises(ConfigError, match="lora_unet_mid_block_attn1_to_q; lightdiff applies diffusers' format"):
        sample_run(compose_config("sample", [f"ckpt={sd_base}", f"out={out}", f"lora={kohya}", "num_images=1"]))
    with pytest.raises(ConfigError, match="is not a file"):
        sample_run(compose_config("sample", [f"ckpt={sd_base}", f"out={out}", f"lora={tmp_path / 'none.st'}"]))
    assert not out.exists()


def test_text_encoder_adapters_train_and_export(sd_base: Path, tmp_path: Path) -> None:
    cfg = compose_config("train", _lora_overrides(tmp_path, sd_base, "run_name=te", "model.lora.text_encoder=true"))
    module = train_run(cfg).lightning_module
    ckpt = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    weights = load_checkpoint_file(ckpt)["state_dict"]
    encoder_keys = [k for k in weights if k.startswith("conditioning.text_encoder.")]
    assert encoder_keys and all(".lora_" in k for k in weights)  # adapters only, the text encoder's among them
    assert not module.conditioning.cacheable  # its states change as it trains: never cached
    base_encoder = CLIPTextModel.from_pretrained(sd_base / "text_encoder").state_dict()
    kept = without_adapters(module.conditioning.text_encoder, fused=False).state_dict()
    assert all(torch.equal(kept[k], base_encoder[k]) for k in base_encoder)  # the encoder's base never moved
    prompts, seeds = ["a red circle", "a blue square"], [3, 4]
    ours = _our_images(ckpt, prompts, seeds)
    folder = sample_run(compose_config("sample", [f"ckpt={ckpt}", f"export={tmp_path / 'lora'}"]))
    with safe_open(str(folder / LORA_WEIGHTS_FILE), framework="pt") as handle:
        assert any(key.startswith("text_encoder.") for key in handle.keys())
    pipeline = StableDiffusionPipeline.from_pretrained(folder)
    pipeline.load_lora_weights(folder)
    assert np.abs(_diffusers_images(pipeline, prompts, seeds) - ours).max() < 1e-4
    # Negative control: without the text encoder's adapters (the UNet's alone) the images differ.
    unet_only = StableDiffusionPipeline.from_pretrained(folder)
    unet_only.unet.load_lora_adapter(str(folder / LORA_WEIGHTS_FILE), prefix="unet")
    assert np.abs(_diffusers_images(unet_only, prompts, seeds) - ours).max() > 1e-3
    fused = sample_run(compose_config("sample", [f"ckpt={ckpt}", f"export={tmp_path / 'fused'}", "export_fused=true"]))
    plain = StableDiffusionPipeline.from_pretrained(fused)
    assert np.abs(_diffusers_images(plain, prompts, seeds) - ours).max() < 1e-4


def test_adapters_are_refused_on_a_base_whose_weights_changed(sd_base: Path, tmp_path: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(sd_base, base)
    cfg = compose_config("train", _lora_overrides(tmp_path, base, "run_name=moved", "trainer.max_steps=1"))
    train_run(cfg)
    ckpt = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    assert has_adapters(load_denoiser(ckpt).net)  # the base as trained: accepted
    unet = _base_unet(base)
    with torch.no_grad():
        unet.conv_in.bias.add_(1e-3)  # another base: the same architecture, other weights
    unet.save_pretrained(base / "unet")
    with pytest.raises(ValueError, match="no longer holds the weights its adapters were trained on"):
        load_denoiser(ckpt)
    resumed = compose_config(
        "train", _lora_overrides(tmp_path, base, "run_name=moved", "trainer.max_steps=2", "resume=true")
    )
    with pytest.raises(ConfigError, match="other weights"):
        train_run(resumed)
    assert load_checkpoint_file(ckpt)["global_step"] == 1  # the checkpoint is untouched


def test_kohya_export_is_read_by_diffusers_kohya_loader_as_trained(sd_base: Path, tmp_path: Path) -> None:
    """export_format=kohya writes the UNet's and the text encoder's adapters in kohya's layout (lora_unet_* /
    lora_te_*, lora_down / lora_up / alpha), one entry per adapted module; diffusers' reader of kohya files loads it
    into the base pipeline (its conversion refuses any key it cannot place) and draws lightdiff's images."""
    from safetensors.torch import load_file, save_file

    extra = ["run_name=kohya", "model.lora.text_encoder=true", "model.lora.alpha=8"]
    cfg = compose_config("train", _lora_overrides(tmp_path, sd_base, *extra))
    train_run(cfg)
    ckpt = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    out = tmp_path / "kohya" / "lora.safetensors"
    assert sample_run(compose_config("sample", [f"ckpt={ckpt}", f"export={out}", "export_format=kohya"])) == out
    with safe_open(str(out), framework="pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
        alphas = {float(handle.get_tensor(key)) for key in keys if key.endswith(".alpha")}
    assert metadata["ss_network_dim"] == "4" and alphas == {8.0}
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys
    adapted = [key for key in load_checkpoint_file(ckpt)["state_dict"] if ".lora_A." in key]
    assert len([key for key in keys if key.endswith(".lora_down.weight")]) == len(adapted)
    prompts, seeds = ["a red circle", "a blue square"], [3, 4]
    ours = _our_images(ckpt, prompts, seeds)
    pipeline = StableDiffusionPipeline.from_pretrained(sd_base)
    pipeline.load_lora_weights(str(out.parent), weight_name=out.name)
    assert np.abs(_diffusers_images(pipeline, prompts, seeds) - ours).max() < 1e-4
    base = _diffusers_images(StableDiffusionPipeline.from_pretrained(sd_base), prompts, seeds)
    assert np.abs(base - ours).max() > 1e-3  # negative control: the file is what moves the base's images
    unet_only = {key: value for key, value in load_file(out).items() if key.startswith("lora_unet_")}
    save_file(unet_only, str(tmp_path / "unet_only.safetensors"))
    partial = StableDiffusionPipeline.from_pretrained(sd_base)
    partial.load_lora_weights(str(tmp_path), weight_name="unet_only.safetensors")
    assert np.abs(_diffusers_images(partial, prompts, seeds) - ours).max() > 1e-3  # the lora_te_ part is read too
    again = ["export_format=kohya", f"ckpt={ckpt}", f"export={out}"]
    with pytest.raises(ConfigError, match="exists; choose a new file or pass overwrite=true"):
        sample_run(compose_config("sample", again))
    with pytest.raises(ConfigError, match="drop export_fused / lora_scale"):
        sample_run(compose_config("sample", [*again, "overwrite=true", "lora_scale=0.5"]))
    with pytest.raises(ConfigError, match="no LoRA adapters to write"):
        sample_run(compose_config("sample", [f"ckpt={sd_base}", f"export={tmp_path / 'x.safetensors'}", again[0]]))


def test_the_demo_page_draws_a_lora_file_on_its_base(sd_base: Path, lora_ckpt: Path, tmp_path: Path) -> None:
    """`sample.py ckpt=BASE lora=FILE lora_scale=S demo=true`: the page applies the file at the scale, and the command
    it shows (which carries both) writes the same pixels."""
    pytest.importorskip("gradio", reason="the demo is an optional extra: pip install 'lightdiff[demo]'")
    import shlex

    from PIL import Image

    from lightdiff.demo import DemoModel, Settings

    folder = sample_run(compose_config("sample", [f"ckpt={lora_ckpt}", f"export={tmp_path / 'lora'}"]))
    lora = folder / LORA_WEIGHTS_FILE
    model = DemoModel(compose_config("sample", [f"ckpt={sd_base}", f"lora={lora}", "lora_scale=0.5", "steps=2"]))
    model.load()
    assert model.error is None
    drawn = model.draw(Settings(prompt="a red circle", steps=2, seed=5))
    command = drawn.records[0]["command"]
    assert f"lora={lora}" in command and "lora_scale=0.5" in command and drawn.records[0]["lora_scale"] == 0.5
    out = tmp_path / "again"
    sample_run(compose_config("sample", [*shlex.split(command)[2:], f"out={out}"]))
    assert np.array_equal(np.asarray(Image.open(drawn.files[0])), np.asarray(Image.open(out / "000000.png")))
    plain = DemoModel(compose_config("sample", [f"ckpt={sd_base}", "steps=2"]))
    plain.load()
    base = plain.draw(Settings(prompt="a red circle", steps=2, seed=5))
    assert not np.array_equal(np.asarray(Image.open(base.files[0])), np.asarray(Image.open(drawn.files[0])))
