"""The speed path: each switch is applied where it is asked for, and changes results only within tolerance."""

from __future__ import annotations

import copy
import json
import logging
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image

from lightdiff.callbacks import StepProgressBar
from lightdiff.config import ConfigError
from lightdiff.drawing import FastPathMismatch
from lightdiff.methods.optimization import clip_and_measure_gradients
from lightdiff.sample import run as sample_run
from lightdiff.speed import (
    SamplingSpeed,
    compile_denoiser,
    is_compiled,
    prepare_for_sampling,
    prepare_for_training,
)
from lightdiff.train import run
from lightdiff.trained import load_checkpoint_file

from .conftest import compose_config


def tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
    )


def tiny_cond_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=16,
        attention_head_dim=4,
    )


def test_compile_is_regional_where_diffusers_defines_repeated_blocks_else_whole() -> None:
    cond = tiny_cond_unet()
    names_before = list(cond.state_dict())
    assert compile_denoiser(cond) == "regional"
    blocks = [m for m in cond.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert blocks and all(getattr(b, "_compiled_call_impl", None) is not None for b in blocks)
    assert getattr(cond, "_compiled_call_impl", None) is None  # the whole UNet is not compiled
    assert list(cond.state_dict()) == names_before  # in place: no `_orig_mod.` prefix in checkpoints
    plain = tiny_unet()
    assert not is_compiled(plain)
    assert compile_denoiser(plain) == "whole"
    assert plain._compiled_call_impl is not None


def test_compile_mode_reaches_torch_compile_for_whole_and_regional(monkeypatch: pytest.MonkeyPatch) -> None:
    modes = []
    monkeypatch.setattr(torch, "compile", lambda fn, **options: modes.append(options.get("mode")) or fn)
    prepare_for_sampling(tiny_unet(), "float32", False, False, None, True, "reduce-overhead")
    assert modes == ["reduce-overhead"]  # UNet2DModel: the whole net, once
    modes.clear()
    cond = tiny_cond_unet()
    compile_denoiser(cond, "max-autotune")
    assert modes == ["max-autotune"] * sum(type(m).__name__ == "BasicTransformerBlock" for m in cond.modules())
    with pytest.raises(ConfigError, match=r"speed\.compile_mode='fast'"):
        SamplingSpeed(compile=True, compile_mode="fast")


def test_attention_runs_through_sdpa_by_default() -> None:
    processors = tiny_cond_unet().attn_processors
    assert processors and all(isinstance(p, AttnProcessor2_0) for p in processors.values())


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    plain, checkpointed = tiny_unet(), tiny_unet()
    prepare_for_training(checkpointed, compile=False, channels_last=False, gradient_checkpointing=True)
    assert checkpointed.is_gradient_checkpointing and not plain.is_gradient_checkpointing
    x, t = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([10, 900])
    for net in (plain, checkpointed):
        net.train()
        net(x, t).sample.square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_gradient_checkpointing_on_a_network_without_it_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"model\.gradient_checkpointing=true.*Conv2d"):
        prepare_for_training(torch.nn.Conv2d(3, 3, 1), compile=False, channels_last=False, gradient_checkpointing=True)


def test_channels_last_changes_layout_not_outputs() -> None:
    plain, nhwc = tiny_unet(), tiny_unet()
    prepare_for_training(nhwc, compile=False, channels_last=True, gradient_checkpointing=False)
    assert nhwc.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not plain.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 500])
    with torch.no_grad():
        torch.testing.assert_close(nhwc(x, t).sample, plain(x, t).sample, rtol=1e-4, atol=1e-5)


def test_one_pass_clipping_matches_torch_and_returns_the_norm_before_clipping() -> None:
    class Holder:  # what the helper reads of a LightningModule: its trainer's strategy
        trainer = type("T", (), {"strategy": object()})()

    ours, reference = tiny_unet(), tiny_unet()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 999])
    for net in (ours, reference):
        (net(x, t).sample * 100).square().mean().backward()
    expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
    norm = clip_and_measure_gradients(Holder(), ours.parameters(), 0.5)
    torch.testing.assert_close(norm, expected)
    assert float(norm) > 0.5  # the gradients were large enough to be clipped
    for a, b in zip(ours.parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad)
    measured_only = clip_and_measure_gradients(Holder(), ours.parameters(), None)  # None: measure, do not clip
    torch.testing.assert_close(measured_only, torch.tensor(0.5), rtol=1e-4, atol=0)


def test_training_switches_reach_the_run(tiny_train_config) -> None:
    cfg = tiny_train_config(
        "model.channels_last=true", "model.gradient_checkpointing=true", "optimizer.fused=true", "callbacks.ema=null"
    )
    trainer = run(cfg)
    net = trainer.lightning_module.net
    assert net.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert net.is_gradient_checkpointing
    assert trainer.optimizers[0].defaults["fused"] is True
    # The checkpoint is an ordinary one: its weights load into a plain network.
    state = load_checkpoint_file(Path(cfg.run_dir) / "checkpoints" / "last.ckpt")["state_dict"]
    plain = copy.deepcopy(net).to(memory_format=torch.contiguous_format)
    plain.load_state_dict({k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")})


def test_switches_default_off_on_a_cpu_machine(tiny_train_config) -> None:
    if torch.cuda.is_available():
        pytest.skip("checks the CPU defaults")
    cfg = tiny_train_config()
    model = cfg.model
    assert (model.compile, model.channels_last, model.gradient_checkpointing, cfg.optimizer.fused) == (
        False,
        False,
        False,
        False,
    )
    # The shapes are drawn in the training process: loader processes would only compete for the cores.
    assert (cfg.data.num_workers, cfg.data.pin_memory) == (0, False)
    assert cfg.trainer.benchmark is False  # cuDNN autotuning is a GPU switch


@pytest.mark.slow
def test_compiled_training_matches_eager_within_tolerance(tiny_train_config) -> None:
    """model.compile=true on the real path (Inductor on CPU, ~2 min of compilation): same losses as eager."""
    losses = {}
    for compile in (False, True):
        cfg = tiny_train_config(f"model.compile={compile}", f"run_name=compile_{compile}", "trainer.max_steps=3")
        trainer = run(cfg)
        assert is_compiled(trainer.lightning_module.net) == compile
        losses[compile] = float(trainer.callback_metrics["train/loss"])
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)


def test_sampling_path_applies_dtype_layout_and_fused_qkv() -> None:
    net = tiny_cond_unet()
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.randn(2, 5, 16)
    with torch.no_grad():
        reference = net(x, t, encoder_hidden_states=text).sample
        prepare_for_sampling(net, "float32", channels_last=True, fuse_qkv=True, quantize=None, compile=False)
        fused = net(x, t, encoder_hidden_states=text).sample
    attention = next(m for m in net.modules() if type(m).__name__ == "Attention")
    assert attention.fused_projections and hasattr(attention, "to_qkv")
    assert net.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-5)
    prepare_for_sampling(net, "bfloat16", channels_last=False, fuse_qkv=False, quantize=None, compile=False)
    assert net.dtype == torch.bfloat16


def test_a_seed_is_the_same_trajectory_at_any_network_dtype() -> None:
    """The noise is drawn and the scheduler steps in float32 whatever the net's dtype: bf16 changes only what the
    network computes (torch's bf16 randn can draw other numbers than its fp32 one for the same generator)."""
    from diffusers import DDPMScheduler

    from lightdiff.sampling import denoise, generators_for

    def run(dtype: torch.dtype) -> tuple[list[torch.Tensor], torch.Tensor]:
        inputs = []

        def model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            inputs.append(x_t)
            return torch.zeros_like(x_t)  # the same prediction at any dtype: only the loop's own arithmetic differs

        scheduler = DDPMScheduler(num_train_timesteps=1000)  # DDPM: fresh noise at every step, from the generators
        out = denoise(model, scheduler, 5, (2, 3, 8, 8), generators_for([0, 1]), torch.device("cpu"), dtype)
        return inputs, out

    (plain_inputs, plain), (fast_inputs, fast) = run(torch.float32), run(torch.bfloat16)
    assert fast.dtype == torch.float32 and torch.equal(plain, fast)
    assert all(f.dtype == torch.bfloat16 for f in fast_inputs)
    assert all(torch.equal(p.bfloat16(), f) for p, f in zip(plain_inputs, fast_inputs))


def test_sampling_path_refuses_what_the_network_cannot_do() -> None:
    with pytest.raises(ConfigError, match=r"speed\.fuse_qkv=true.*Conv2d"):
        prepare_for_sampling(torch.nn.Conv2d(3, 3, 1), "float32", False, True, None, False)
    with pytest.raises(ConfigError, match=r"speed\.dtype='float64'"):
        prepare_for_sampling(tiny_unet(), "float64", False, False, None, False)


# ----- sample.py's speed path ------------------------------------------------------------------------------------


def _sample(ckpt: Path, out: Path, *overrides: str) -> Path:
    return sample_run(compose_config("sample", [f"ckpt={ckpt}", f"out={out}", "num_images=4", "steps=4", *overrides]))


def _pixels(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("0*.png"))]).astype(np.float64)


def test_bfloat16_sampling_passes_its_check_and_stays_close(class_ckpt: Path, tmp_path: Path, caplog) -> None:
    plain = _pixels(_sample(class_ckpt, tmp_path / "plain"))
    with caplog.at_level(logging.INFO, logger="lightdiff"):
        fast_folder = _sample(class_ckpt, tmp_path / "bf16", "speed.dtype=bfloat16", "speed.channels_last=true")
    fast = _pixels(fast_folder)
    assert "speed path checked on 4 images" in caplog.text
    difference = np.abs(plain - fast).mean(axis=(1, 2, 3)) / 255
    assert difference.max() <= 3e-2  # the bf16 tolerance the check enforced
    assert not np.array_equal(plain, fast)  # bf16 really ran: rounding moves some pixels
    record = json.loads((fast_folder / "metadata.jsonl").read_text().splitlines()[0])
    assert record["speed"]["dtype"] == "bfloat16" and "speed" not in json.loads(
        (tmp_path / "plain" / "metadata.jsonl").read_text().splitlines()[0]
    )


def test_a_fast_path_past_its_tolerance_stops_before_writing(class_ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(FastPathMismatch, match=r"speed\.tolerance=0\.0"):
        _sample(class_ckpt, tmp_path / "strict", "speed.dtype=bfloat16", "speed.tolerance=0.0")
    assert not (tmp_path / "strict").exists()


def test_sampling_switch_errors_name_the_key(class_ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"speed\.fuse_qkv=true.*UNet2DModel"):
        _sample(class_ckpt, tmp_path / "fuse", "speed.fuse_qkv=true")
    with pytest.raises(ConfigError, match=r"speed\.dtype='half'"):
        _sample(class_ckpt, tmp_path / "half", "speed.dtype=half")


def test_sampling_progress_and_speed_summary(class_ckpt: Path, tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="lightdiff"):
        _sample(class_ckpt, tmp_path / "s", "batch_size=3")
    summary = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("sampled 4 images in"))
    assert "images/s" in summary and "per batch of 3" in summary


# ----- progress and speed summary during training ----------------------------------------------------------------


def test_progress_bar_counts_the_runs_steps_and_shows_images_per_sec(tiny_train_config) -> None:
    first = run(tiny_train_config("trainer.max_steps=2"))
    resumed = run(tiny_train_config("trainer.max_steps=5", "trainer.log_every_n_steps=1"))  # the same run, resumed
    for trainer, steps in ((first, 2), (resumed, 5)):
        bar = trainer.progress_bar_callback
        assert isinstance(bar, StepProgressBar)
        task = bar.progress.tasks[bar.train_progress_bar_id]
        assert (task.completed, task.total) == (steps, steps)  # steps of the whole run, not batches of this session
    assert "train/images_per_sec" in resumed.progress_bar_metrics
    log_text = (Path(tiny_train_config().run_dir) / "train.log").read_text()
    assert "this session trained 3 steps on 12 images" in log_text  # the resumed session: steps 3..5, batch 4
    assert "images/s" in log_text and "s/step" in log_text


def test_progress_lines_in_the_log_where_no_terminal_shows_the_bar(tiny_train_config, monkeypatch) -> None:
    every = "callbacks.images_per_sec.progress_every_n_steps=2"
    cfg = tiny_train_config("trainer.max_steps=5", every)
    run(cfg)  # pytest captures stdout: not a terminal
    lines = [line for line in (Path(cfg.run_dir) / "train.log").read_text().splitlines() if "ETA" in line]
    assert [line.split(" - ")[-1].split(":")[0] for line in lines] == ["step 2/5 (40.0%)", "step 4/5 (80.0%)"]
    assert all(re.search(r"loss [0-9.e-]+, \d+ images/s, elapsed \d+m\d\ds, ETA \d+m\d\ds$", line) for line in lines)

    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)  # a terminal: the bar shows it, no lines
    cfg = tiny_train_config("trainer.max_steps=4", every, "run_name=tty")
    run(cfg)
    assert "ETA" not in (Path(cfg.run_dir) / "train.log").read_text()
    with pytest.raises(ConfigError, match=r"progress_every_n_steps=-1"):
        run(tiny_train_config("callbacks.images_per_sec.progress_every_n_steps=-1", "run_name=bad"))


def test_progress_bar_off_through_the_trainer_key(tiny_train_config) -> None:
    trainer = run(tiny_train_config("trainer.enable_progress_bar=false"))
    assert trainer.progress_bar_callback is None


def test_fp8_quantisation_needs_an_fp8_gpu() -> None:
    pytest.importorskip("torchao", reason="torchao is optional (lightdiff[quant])")
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9):
        pytest.skip("checks the refusal on a machine without fp8 tensor cores")
    with pytest.raises(ConfigError, match=r"speed\.quantize=fp8 needs a CUDA GPU"):
        prepare_for_sampling(tiny_cond_unet(), "float32", False, False, "fp8", False)


def test_int8_weight_quantisation_stays_close() -> None:
    pytest.importorskip("torchao", reason="torchao is optional (lightdiff[quant])")
    net = tiny_cond_unet()
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.randn(2, 5, 16)
    with torch.no_grad():
        reference = net(x, t, encoder_hidden_states=text).sample
        prepare_for_sampling(net, "float32", False, False, "int8_weight_only", False)
        quantized = net(x, t, encoder_hidden_states=text).sample
    linear = next(m for m in net.modules() if isinstance(m, torch.nn.Linear) and m.weight.shape[0] >= 16)
    assert type(linear.weight).__module__.startswith("torchao")  # the weight is now torchao's int8 tensor
    relative = (quantized - reference).abs().mean() / reference.abs().mean()
    assert 0 < float(relative) < 5e-2  # int8 moved the outputs, a little


def test_quantisation_without_torchao_says_how_to_get_it() -> None:
    try:
        import torchao  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"speed\.quantize=int8_dynamic: needs torchao"):
            prepare_for_sampling(tiny_cond_unet(), "float32", False, False, "int8_dynamic", False)
    else:
        pytest.skip("torchao is installed")
