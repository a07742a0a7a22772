"""Paths that only a CUDA GPU runs (skipped without one; `python -m pytest -q -m gpu` on a GPU machine, or
experiments/gpu_checks/run.sh, which also runs the GPU benchmarks). What CPU CI cannot show: FSDP trains, clips
and logs its gradient norm, writes whole-tensor checkpoints and resumes; the CUDA defaults of the speed path are on
in a real run; compiled bf16 and torchao-quantised sampling pass sample.py's own numerical check."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from lightdiff.sample import run as sample_run
from lightdiff.train import run
from lightdiff.trained import load_checkpoint_file

from .conftest import REPO, TINY, compose_config

pytestmark = pytest.mark.gpu


def _train_py(output_root: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "train.py", f"output_root={output_root}", *TINY, *overrides]
    env = {**os.environ, "WANDB_MODE": "offline"}
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)


def _logged(run_dir: Path, key: str) -> dict[int, float]:
    """`key` by step over every session of the run (a resumed session writes its own csv version)."""
    values = {}
    for metrics in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        with metrics.open() as handle:
            values.update({int(row["step"]): float(row[key]) for row in csv.DictReader(handle) if row.get(key)})
    return values


def test_fsdp_trains_clips_and_resumes_on_one_gpu(tmp_path: Path) -> None:
    fsdp = ["trainer=fsdp", "trainer.devices=1", "callbacks.ema=null", "run_name=fsdp", "model.max_grad_norm=0.5"]
    first = _train_py(tmp_path, *fsdp, "trainer.max_steps=4", "callbacks.checkpoint.every_n_train_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    second = _train_py(tmp_path, *fsdp, "trainer.max_steps=8", "callbacks.checkpoint.every_n_train_steps=2")
    assert second.returncode == 0, second.stderr[-3000:]
    run_dir = tmp_path / "fsdp"
    assert "resuming fsdp from" in (run_dir / "train.log").read_text()

    # The gradient norm is measured by the root FSDP module (reduced over ranks) for every step of both sessions,
    # and it is a real norm: finite, positive, above the clip threshold on a fresh net (so the clip had work).
    norms = _logged(run_dir, "train/grad_norm")
    assert sorted(norms) == list(range(8)) or sorted(norms) == list(range(1, 9)), sorted(norms)
    assert all(math.isfinite(v) and v > 0 for v in norms.values())
    assert max(norms.values()) > 0.5

    # Whole fp32 tensors under the plain network's names: sample.py and export read the checkpoint unchanged.
    checkpoint = load_checkpoint_file(run_dir / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 8
    net_state = {k.removeprefix("net."): v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
    plain = instantiate(compose_config("train", [f"output_root={tmp_path}", *TINY]).net)
    plain.load_state_dict(net_state)  # strict: the same names and whole shapes
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in net_state.values())


def test_cuda_run_turns_on_channels_last_fused_adamw_and_cudnn_benchmark(tiny_train_config) -> None:
    cfg = tiny_train_config("trainer=gpu")
    assert (cfg.model.channels_last, cfg.optimizer.fused, cfg.data.pin_memory) == (True, True, True)
    trainer = run(cfg)
    assert torch.backends.cudnn.benchmark is True  # trainer.benchmark: cuDNN picks its fastest convolutions
    net = trainer.lightning_module.net
    assert trainer.optimizers[0].defaults["fused"] is True
    assert net.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert net.conv_in.weight.device.type == "cuda"


def test_compiled_bfloat16_sampling_passes_its_check_on_cuda(tmp_path: Path) -> None:
    cfg = compose_config("train", [f"output_root={tmp_path}", *TINY, "trainer=gpu", "trainer.max_steps=3"])
    run(cfg)
    ckpt = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    fast = ["speed.dtype=bfloat16", "speed.channels_last=true", "speed.compile=true"]
    folder = sample_run(
        compose_config("sample", [f"ckpt={ckpt}", f"out={tmp_path / 'fast'}", "num_images=4", "steps=4", *fast])
    )
    assert len(list(folder.glob("0*.png"))) == 4
    record = json.loads((folder / "metadata.jsonl").read_text().splitlines()[0])
    assert record["speed"]["dtype"] == "bfloat16" and record["speed"]["compile"] is True


@pytest.mark.parametrize("quantize", ["int8_dynamic", "fp8"])
def test_torchao_quantised_text_model_sampling_passes_its_check_on_cuda(quantize: str, tmp_path: Path) -> None:
    pytest.importorskip("torchao", reason="torchao is optional (lightdiff[quant])")
    if quantize == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability >= 8.9 (H100, L40S, RTX 4090)")
    overrides = [f"output_root={tmp_path}", *TINY, "model=latent", "trainer=gpu", "trainer.max_steps=3"]
    cfg = compose_config("train", overrides)
    run(cfg)
    ckpt = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    fast = ["speed.dtype=bfloat16", f"speed.quantize={quantize}", "prompt=a red circle"]
    folder = sample_run(
        compose_config("sample", [f"ckpt={ckpt}", f"out={tmp_path / 'q'}", "num_images=4", "steps=4", *fast])
    )
    assert len(list(folder.glob("0*.png"))) == 4  # sample.py's check against fp32 eager passed (5e-2)
    record = json.loads((folder / "metadata.jsonl").read_text().splitlines()[0])
    assert record["speed"]["quantize"] == quantize


def test_offloaded_ema_keeps_the_same_average_bit_for_bit(tiny_train_config) -> None:
    """callbacks.ema.offload keeps the average in CPU memory between updates, the weights on the GPU: the average is
    the one kept on the GPU, bit for bit (on a CPU both sides share a device, so only here can this fail)."""
    runs = {name: tiny_train_config(f"run_name={name}", "trainer=gpu", "trainer.max_steps=3") for name in ("on", "off")}
    run(runs["on"])
    with_offload = runs["off"]
    with_offload.callbacks.ema.offload = True
    run(with_offload)
    averages = [
        load_checkpoint_file(Path(runs[name].run_dir) / "checkpoints" / "last.ckpt")["callbacks"]["ema"][
            "shadow_params"
        ]
        for name in ("on", "off")
    ]
    assert len(averages[0]) > 0 and all(torch.equal(a, b) for a, b in zip(*averages))
