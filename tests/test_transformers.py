"""Transformer backbones (issue 8): presets, adaLN-Zero gates, both MMDiT streams learning, the SD3 text layout,
PixArt's text path learning, 2-step runs of each new config, export round trips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from hydra.utils import instantiate
from PIL import Image
from transformers import CLIPTextModelWithProjection

from lightdiff.config import ConfigError
from lightdiff.diffusion import interpolate, velocity_target
from lightdiff.nets.denoiser import network_output
from lightdiff.nets.families import Condition, family_of
from lightdiff.nets.families.pixart import NO_SIZE_CONDITIONING
from lightdiff.nets.families.sd import CLIPText
from lightdiff.nets.families.sd3 import SD3CLIPText
from lightdiff.nets.text import build_caption_tokenizer, text_encoder_from_scratch
from lightdiff.sample import run as sample_run
from lightdiff.sampling import for_latents, generate, generators_for
from lightdiff.train import run as train_run
from lightdiff.trained import load_denoiser

from .conftest import TINY, compose_config

# A smaller MMDiT and text encoder than the presets, so a run takes seconds.
SMALL_MMDIT = [
    "model.text_hidden_size=16",
    "model.text_layers=2",
    "model.text_heads=2",
    "net.num_layers=2",
    "net.attention_head_dim=8",
    "net.caption_projection_dim=32",
    "net.joint_attention_dim=32",
    "net.pooled_projection_dim=32",
]
# A smaller PixArt and text encoder than the presets.
SMALL_PIXART = [
    "model.text_hidden_size=16",
    "model.text_layers=2",
    "model.text_heads=2",
    "net.num_layers=2",
    "net.attention_head_dim=8",
    "net.caption_channels=16",
    "net.cross_attention_dim=32",
]


def _parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _net(*overrides: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return instantiate(compose_config("train", list(overrides)).net)


@pytest.mark.parametrize(
    ("overrides", "net_class", "unet_overrides"),
    [
        (["net=dit"], DiTTransformer2DModel, ["net=unet_tiny", "net.num_class_embeds=24"]),
        (["model=latent", "net=mmdit_tiny"], SD3Transformer2DModel, ["model=latent"]),
        (["model=latent", "net=dit"], PixArtTransformer2DModel, ["model=latent"]),  # net=dit picks PixArt for text
    ],
)
def test_presets_build_diffusers_transformers_the_size_of_the_unets(
    overrides: list[str], net_class: type, unet_overrides: list[str]
) -> None:
    net, unet = _net(*overrides), _net(*unet_overrides)
    assert type(net) is net_class
    assert 0.85 < _parameters(net) / _parameters(unet) < 1.15  # a fair comparison: about the same size


def _blocks_return_their_inputs(net: torch.nn.Module, inputs: dict) -> list[bool]:
    """For each block: whether its output streams equal its input streams (the last MMDiT block drops the text)."""
    same: list[bool] = []

    def check(block: torch.nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        if isinstance(net, SD3Transformer2DModel):
            text_out, image_out = output
            same.append(torch.equal(image_out, kwargs["hidden_states"]))
            if text_out is not None:
                same.append(torch.equal(text_out, kwargs["encoder_hidden_states"]))
        else:
            same.append(torch.equal(output, args[0] if args else kwargs["hidden_states"]))

    handles = [block.register_forward_hook(check, with_kwargs=True) for block in net.transformer_blocks]
    with torch.no_grad():
        network_output(net, inputs["x_t"], inputs["timesteps"], inputs["condition"])
    for handle in handles:
        handle.remove()
    return same


def _mmdit_inputs(net: SD3Transformer2DModel) -> dict:
    generator = torch.Generator().manual_seed(1)
    text = Condition(
        {
            "encoder_hidden_states": torch.randn(2, 5, net.config.joint_attention_dim, generator=generator),
            "pooled_projections": torch.randn(2, net.config.pooled_projection_dim, generator=generator),
        }
    )
    return {
        "x_t": torch.randn(2, 4, 8, 8, generator=generator),
        "timesteps": torch.tensor([100.0, 900.0]),
        "condition": text,
    }


def _pixart_inputs(net: PixArtTransformer2DModel) -> dict:
    generator = torch.Generator().manual_seed(2)
    return {
        "x_t": torch.randn(2, 4, 8, 8, generator=generator),
        "timesteps": torch.tensor([100.0, 900.0]),
        "condition": Condition(
            {
                "encoder_hidden_states": torch.randn(2, 5, net.config.caption_channels, generator=generator),
                "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
            }
        ),
    }


def test_gates_start_at_zero_so_each_block_returns_its_input_streams() -> None:
    mmdit = _net("model=latent", "net=mmdit_tiny")
    dit = _net("net=dit")
    pixart = _net("model=latent", "net=dit")
    dit_inputs = {
        "x_t": torch.randn(2, 3, 16, 16),
        "timesteps": torch.tensor([3, 700]),
        "condition": Condition({"class_labels": torch.tensor([0, 5])}),
    }
    # diffusers leaves the modulation at nn.Linear's random init: the blocks are not the identity...
    assert not all(_blocks_return_their_inputs(mmdit, _mmdit_inputs(mmdit)))
    assert not all(_blocks_return_their_inputs(dit, dit_inputs))
    assert not any(_blocks_return_their_inputs(pixart, _pixart_inputs(pixart)))  # and PixArt's cross-attention
    # ...until lightdiff zeroes it (DiT's adaLN-Zero): every block's output equals its input, in both streams;
    # PixArt's adaLN-single tables and shared timestep projection, and its ungated cross-attention's output, too.
    zeroed = ((mmdit, _mmdit_inputs), (dit, lambda _: dit_inputs), (pixart, _pixart_inputs))
    for net, inputs in zeroed:
        same = _blocks_return_their_inputs(family_of(net).initialise(net), inputs(net))
        assert same and all(same)
    assert len(_blocks_return_their_inputs(pixart, _pixart_inputs(pixart))) == pixart.config.num_layers
    assert not pixart.adaln_single.linear.weight.any() and not pixart.adaln_single.linear.bias.any()
    assert all(not b.scale_shift_table.any() and not b.attn2.to_out[0].weight.any() for b in pixart.transformer_blocks)
    assert pixart.scale_shift_table.any()  # the final layer's shift and scale keep diffusers' init, as a DiT's do
    assert len(_blocks_return_their_inputs(mmdit, _mmdit_inputs(mmdit))) == 2 * mmdit.config.num_layers - 1
    gates = [m.linear for m in mmdit.modules() if type(m).__name__ == "AdaLayerNormZero"]
    assert len(gates) == 2 * mmdit.config.num_layers - 1  # image and text stream of each block, no text in the last
    assert all(not g.weight.any() and not g.bias.any() for g in gates)


def test_both_streams_receive_gradients_once_the_gates_open() -> None:
    net = _net("model=latent", "net=mmdit_tiny")
    family_of(net).initialise(net)
    inputs = _mmdit_inputs(net)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    block = net.transformer_blocks[0]
    image_stream = [block.attn.to_q.weight, block.ff.net[2].weight]
    text_stream = [block.attn.add_q_proj.weight, block.ff_context.net[2].weight, net.context_embedder.weight]
    pooled = [net.time_text_embed.text_embedder.linear_1.weight]
    image_gates = [b.norm1.linear.weight for b in net.transformer_blocks]
    text_gates = [block.norm1_context.linear.weight]
    x0 = torch.randn_like(inputs["x_t"])
    for step in range(3):
        noise, t = torch.randn_like(x0), torch.tensor([0.3, 0.8])
        prediction = network_output(net, interpolate(x0, noise, t), t * 1000, inputs["condition"])
        optimizer.zero_grad()
        ((prediction - velocity_target(x0, noise)) ** 2).mean().backward()
        if step == 0:  # closed gates: the image gates and the output layers (with the pooled text, which steers
            # the final modulation) learn first; the blocks' weights wait, and so do the text gates: a block's text
            # output only feeds later, still closed, blocks
            assert all(g.grad.abs().sum() > 0 for g in image_gates)
            assert all(not p.grad.any() for p in image_stream + text_stream + text_gates)
        optimizer.step()
    for parameter in image_stream + text_stream + pooled + text_gates:
        assert parameter.grad.abs().sum() > 0


def test_pixart_text_path_and_blocks_receive_gradients_once_the_gates_open() -> None:
    captions = ["a red circle", "a blue square"]
    tokenizer = build_caption_tokenizer(captions * 3, vocab_size=300, model_max_length=8)
    torch.manual_seed(0)
    encoder = text_encoder_from_scratch(tokenizer, 16, 2, 2, 32)
    net = _net("model=latent", "net=dit", *SMALL_PIXART)
    family_of(net).initialise(net)
    optimizer = torch.optim.AdamW([*net.parameters(), *encoder.parameters()], lr=1e-3)
    block = net.transformer_blocks[0]
    cross_output = [b.attn2.to_out[0].weight for b in net.transformer_blocks]
    gates = [b.scale_shift_table for b in net.transformer_blocks] + [net.adaln_single.linear.weight]
    text_path = [block.attn2.to_k.weight, net.caption_projection.linear_1.weight, *encoder.parameters()]
    blocks = [block.attn1.to_q.weight, block.ff.net[2].weight]
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    for step in range(3):
        noise, t = torch.randn_like(x0), torch.tensor([0.3, 0.8])
        text = CLIPText(tokenizer, encoder, True, NO_SIZE_CONDITIONING)({"text": captions})
        prediction = network_output(net, interpolate(x0, noise, t), t * 1000, text)
        optimizer.zero_grad()
        ((prediction - velocity_target(x0, noise)) ** 2).mean().backward()
        if step == 0:  # closed: the gates and the cross-attention's zero output projection learn first; nothing
            # passes back through that projection yet, so the text encoder waits a step, and so do the gated layers
            assert all(p.grad.abs().sum() > 0 for p in gates + cross_output)
            assert all(p.grad is None or not p.grad.any() for p in text_path + blocks)
        optimizer.step()
    for parameter in text_path + blocks + gates + cross_output:
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0


def test_sd3_text_states_are_what_stable_diffusion_3_pipeline_makes() -> None:
    captions = ["a red circle", "a blue square"]
    tokenizer = build_caption_tokenizer(captions * 3, vocab_size=300, model_max_length=8)
    torch.manual_seed(0)
    encoder = text_encoder_from_scratch(tokenizer, 16, 2, 2, 32, CLIPTextModelWithProjection).eval()
    net = _net("model=latent", "net=mmdit_tiny", *SMALL_MMDIT)
    vae = AutoencoderKL(block_out_channels=[8, 16], norm_num_groups=4, latent_channels=4, shift_factor=0.0)
    vae.config.down_block_types, vae.config.up_block_types = ["DownEncoderBlock2D"] * 2, ["UpDecoderBlock2D"] * 2
    pipeline = StableDiffusion3Pipeline(
        transformer=net,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=encoder,
        tokenizer=tokenizer,
        text_encoder_2=encoder,
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    with torch.no_grad():
        states, _, pooled, _ = pipeline.encode_prompt(
            captions, None, None, do_classifier_free_guidance=False, max_sequence_length=0
        )
        ours = SD3CLIPText(tokenizer, encoder, False, net.config.joint_attention_dim)({"text": captions}).kwargs
    assert torch.equal(ours["encoder_hidden_states"], states) and torch.equal(ours["pooled_projections"], pooled)
    assert states.shape == (2, 8, 32) and pooled.shape == (2, 32)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["model=latent", "net=dit_tiny"],
            "net.in_channels=3 / net.out_channels=3 do not match the VAE's latent_channels=4",
        ),
        (
            ["model=latent", "net=dit", "net.caption_channels=32", "model.text_hidden_size=64"],
            "net.caption_channels=32 differs .* hidden_size=64",
        ),
        (["model=latent", "net=dit", "net.cross_attention_dim=64"], "net.cross_attention_dim=64 must be the width"),
        (["net=mmdit_tiny"], "net.in_channels=4 / net.out_channels=4 do not match RGB=3"),
        (
            ["model=latent", "net=mmdit_tiny", "net.pooled_projection_dim=64", "model.text_hidden_size=64"],
            "net.pooled_projection_dim=64 differs from the text encoder's 2 x projection_dim=128",
        ),
        (["model=latent", "net=mmdit_tiny", "model.text_hidden_size=96", "net.pooled_projection_dim=192"], "below 2 x"),
        (["net=dit", "net.num_embeds_ada_norm=3"], "net.num_embeds_ada_norm=3 is below the data set's 24 classes"),
    ],
)
def test_mismatched_transformer_configs_are_named(overrides: list[str], message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        train_run(compose_config("train", [f"output_root={tmp_path}", *TINY, *overrides]))
    assert list(tmp_path.iterdir()) == []


RUNS = {
    "dit": ["net=dit"],
    "dit_flow": ["net=dit", "objective=flow_matching"],
    "mmdit": ["model=latent", "net=mmdit_tiny", *SMALL_MMDIT],
    "mmdit_flow": ["model=latent", "net=mmdit_tiny", "objective=flow_matching", *SMALL_MMDIT],
    "pixart": ["model=latent", "net=dit", *SMALL_PIXART],
    "pixart_flow": ["model=latent", "net=dit", "objective=flow_matching", *SMALL_PIXART],
}
TEXT_RUNS = ("mmdit", "pixart")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 2-step run of each new config, trained once for the module."""
    root = tmp_path_factory.mktemp("runs")
    paths = {}
    for name, overrides in RUNS.items():
        cfg = compose_config("train", [f"output_root={root}", *TINY, f"run_name={name}", *overrides])
        trainer = train_run(cfg)
        assert trainer.global_step == 2
        paths[name] = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    return paths


def _sampler(name: str) -> list[str]:
    return ["sampler=flow_euler"] if name.endswith("flow") else []


@pytest.mark.parametrize("name", list(RUNS))
def test_two_step_run_samples_the_same_from_checkpoint_and_export(name: str, runs: dict, tmp_path: Path) -> None:
    ckpt = runs[name]
    text = ["prompt=a red circle"] if name.startswith(TEXT_RUNS) else []
    options = ["num_images=2", "steps=3", *_sampler(name), *text]
    folder = sample_run(compose_config("sample", [f"ckpt={ckpt}", f"export={tmp_path / 'export'}", *_sampler(name)]))
    if name.startswith("mmdit"):
        assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
    elif name.startswith("pixart"):  # the documented equivalent: PixArtAlphaPipeline expects a T5 text encoder
        parts = {"transformer", "scheduler", "vae", "text_encoder", "tokenizer", "lightdiff.json"}
        assert {p.name for p in folder.iterdir()} == parts
        config = json.loads((folder / "transformer" / "config.json").read_text())
        assert config["_class_name"] == "PixArtTransformer2DModel"
    else:  # the documented equivalent of a pixel DiT: no diffusers pipeline runs one without a VAE
        assert {p.name for p in folder.iterdir()} == {"transformer", "scheduler", "lightdiff.json"}
    pixels = []
    for source, out in ((ckpt, "a"), (folder, "b")):
        written = sample_run(compose_config("sample", [f"ckpt={source}", f"out={tmp_path / out}", *options]))
        pixels.append(np.stack([np.asarray(Image.open(p)) for p in sorted(written.glob("0*.png"))]))
    assert np.array_equal(pixels[0], pixels[1]) and pixels[0].shape == (2, 16, 16, 3)


def test_mmdit_flow_export_runs_in_plain_stable_diffusion_3_pipeline(runs: dict) -> None:
    denoiser = load_denoiser(runs["mmdit_flow"])
    folder = Path(runs["mmdit_flow"]).parents[2] / "sd3"
    sample_run(compose_config("sample", [f"ckpt={runs['mmdit_flow']}", f"export={folder}", "sampler=flow_euler"]))
    pipeline = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    prompts, seeds = ["a red circle", "a blue square"], [3, 4]
    theirs = pipeline(
        prompts,
        num_inference_steps=4,
        guidance_scale=4.0,
        negative_prompt=["", ""],
        generator=generators_for(seeds),
        output_type="np",
        max_sequence_length=0,  # lightdiff appends no (zero) T5 tokens
    ).images
    scheduler = for_latents(denoiser.objective.scheduler(FlowMatchEulerDiscreteScheduler))
    inputs = {"text": prompts}
    ours = generate(denoiser.net, scheduler, 4, seeds, denoiser.conditioning, inputs, 4.0, "", vae=denoiser.vae)
    assert np.abs(ours.permute(0, 2, 3, 1).numpy() - theirs).max() < 1e-4
