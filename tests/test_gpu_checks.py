"""experiments/gpu_checks/run.sh is the command a session with a lent GPU runs once, with no time to debug it: its
CPU smoke mode (every stage at toy sizes) must keep working as the benchmarks and tests it calls change."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO


@pytest.mark.slow  # about a minute: two benchmarks, a 3-step training run, the GPU tests collected
def test_gpu_checks_smoke_run_passes_every_stage(tmp_path: Path) -> None:
    env = {**os.environ, "SMOKE": "1", "OUT": str(tmp_path), "PYTHON": sys.executable, "LIGHTDIFF_COMMIT": "test"}
    result = subprocess.run(
        ["bash", "experiments/gpu_checks/run.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = (tmp_path / "summary.md").read_text()
    stages = dict(re.findall(r"^## (\w+): exit (\d+)", summary, flags=re.MULTILINE))
    expected = ("tests", "train", "teacher", "sample", "mfu", "sdxl_memory", "lora_memory")
    assert stages == {name: "0" for name in expected}, summary
    assert "| lightdiff (bare) |" in summary and "| lightdiff eager |" in summary  # both benchmark tables
    assert "17.26 TFLOP" in summary  # the SD2-size UNet's FLOPs per step at batch 32
    assert "| ema_offloaded |" in summary  # the SDXL memory table, every option's row
    assert "| fp8 storage | no CUDA" in summary  # the LoRA table's low-precision rows ran (nf4 and int8 before it)
    assert "commit test" in (tmp_path / "train.log").read_text()
    # the tests stage's selection (collected, not run, on a CPU) still names the GPU tests it runs on the device
    collected = (tmp_path / "tests.log").read_text()
    assert "test_gpu.py::" in collected and "test_gpu_run_uses_bf16_autocast_with_fp32_weights" in collected
