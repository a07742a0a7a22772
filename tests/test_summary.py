"""The start-up summary of a model's networks (lightdiff/nets/summary.py): class, parameter count and memory in its
dtype of each, in train.log and the logger's config of a run, and in sample.py's log."""

from __future__ import annotations

import logging
from pathlib import Path

import yaml
from torch import nn

from lightdiff.drawing import load_for_sampling
from lightdiff.nets.families.sd import CLIPText
from lightdiff.nets.summary import components, summary_table
from lightdiff.nets.text import build_caption_tokenizer, text_encoder_from_scratch
from lightdiff.trained import load_trained

from .conftest import compose_config, tiny_cond_unet, tiny_vae


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_each_network_once_with_its_class_size_and_memory_in_its_dtype() -> None:
    tokenizer = build_caption_tokenizer(["a red circle", "a blue square"], model_max_length=8)
    encoder = text_encoder_from_scratch(tokenizer, 16, 1, 2)
    unet, vae = tiny_cond_unet(16), tiny_vae().half().requires_grad_(False)
    model = nn.ModuleDict(
        {
            "net": unet,
            "vae": vae,
            "conditioning": CLIPText(tokenizer, encoder, trainable=False),
            "teacher": nn.ModuleDict({"net": unet}),  # shared with `net`: counted once
            "head": nn.Linear(4, 3),  # no diffusers / transformers model: "other"
        }
    )
    rows = {row.name: row for row in components(model)}
    assert list(rows) == ["net", "vae", "conditioning.text_encoder", "other"]
    assert rows["net"].cls == "UNet2DConditionModel" and rows["net"].parameters == _count(unet)
    assert rows["net"].trainable == _count(unet) and rows["vae"].trainable == 0
    assert rows["conditioning.text_encoder"].cls == "CLIPTextModel" and rows["conditioning.text_encoder"].trainable == 0
    assert rows["vae"].dtype == "float16"
    vae_bytes = sum(t.numel() * t.element_size() for t in [*vae.parameters(), *vae.buffers()])
    assert rows["vae"].bytes == vae_bytes == 2 * _count(vae) + sum(b.numel() * b.element_size() for b in vae.buffers())
    assert rows["other"].parameters == 4 * 3 + 3
    table = summary_table(list(rows.values()))
    total = _count(unet) + _count(vae) + _count(encoder) + 15
    assert table.splitlines()[-1].split()[:2] == ["total", f"{total:,}"]


def test_a_run_logs_its_networks_to_train_log_and_the_logger_config(pixel_ckpt: Path) -> None:
    run_dir = pixel_ckpt.parents[1]
    net = load_trained(pixel_ckpt).net
    log_text = (run_dir / "train.log").read_text()
    assert "the model's networks:" in log_text
    row = next(line for line in log_text.splitlines() if line.startswith("net ") and "UNet2DModel" in line)
    assert f"{_count(net):,}" in row
    hparams = yaml.safe_load(next(run_dir.glob("csv/version_*/hparams.yaml")).read_text())
    assert {"name": "net", "cls": "UNet2DModel", "parameters": _count(net)}.items() <= hparams["components"][0].items()


def test_sample_py_logs_the_networks_it_loads(text_ckpt: Path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="lightdiff"):
        load_for_sampling(compose_config("sample", [f"ckpt={text_ckpt}"]))
    assert "CLIPTextModel" in caplog.text and "AutoencoderKL" in caplog.text and "UNet2DConditionModel" in caplog.text
