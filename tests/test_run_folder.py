"""Results are never lost (issue 42): one owner per run folder, an append-only config history, a preempted run that
leaves at once, labels without names, a pipeline's own VAE, non-finite and newer-format checkpoints refused, one
last.ckpt, bounded LoRA ranks and seeds, stale temporaries cleaned. Each test fails on the code before the issue; the
ones that guard a property carry a negative control."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from lightdiff.callbacks.preemption import PREEMPTED_EXIT_STATUS, Preempted, Preemption
from lightdiff.callbacks.samples import SampleGrid
from lightdiff.config import ConfigError
from lightdiff.data.shard_stream import shard_urls
from lightdiff.files import folder_written_atomically
from lightdiff.run_folder import LOCK_NAME, RunFolderLock, config_history, record_config
from lightdiff.sample import run as sample_run
from lightdiff.sampling import MAX_SEED, preview_inputs, seed_problem
from lightdiff.train import run as train_run
from lightdiff.trained import load_checkpoint_file, load_trained

from .conftest import KILLABLE, REPO, TINY, compose_config
from .test_bad_input import snapshot
from .test_shards import SHARD_RUN, _folder


def _labelled_folder(root: Path, count: int = 8, classes: int = 3) -> Path:
    """Images whose metadata.jsonl gives integer labels and nothing else: no class names, no captions."""
    root.mkdir(parents=True)
    with (root / "metadata.jsonl").open("w") as metadata:
        for i in range(count):
            Image.new("RGB", (16, 16), (30 * i, 90, 200 - 20 * i)).save(root / f"{i:03d}.png")
            metadata.write(json.dumps({"file_name": f"{i:03d}.png", "label": i % classes}) + "\n")
    return root


def _folder_run(tmp_path: Path, root: Path, *overrides: str):
    tiny = [o for o in TINY if not o.startswith("data.size")]  # shapes only
    data = ["data=image_folder", f"data.root={root}", "data.num_workers=0", "data.resolution=16"]
    return compose_config(
        "train", [f"output_root={tmp_path}", *tiny, *data, f"data.scan_cache_dir={tmp_path / 'scans'}", *overrides]
    )


# ----- 0. labels without names ----------------------------------------------------------------------------------


def test_previews_draw_classes_by_index_where_the_data_has_no_names() -> None:
    class Labels:
        reads = frozenset({"label"})

    inputs, labels = preview_inputs([0, 1, 2, 3, 4], Labels(), None, [], None, num_classes=3)
    assert labels.tolist() == [0, 1, 2, 0, 1] and inputs["label"].tolist() == [0, 1, 2, 0, 1]
    # a text model on a labelled folder keeps its captions as prompts (the labels only judge)
    inputs, _ = preview_inputs([0, 1], Labels(), None, ["a cat", "a dog"], None, num_classes=3)
    assert inputs["text"] == ["a cat", "a dog"]
    # negative control: without the data's class count there are no labels to give (the old behaviour)
    assert preview_inputs([0, 1], Labels(), None, [], None)[1] is None


def test_previews_of_data_with_some_classes_ask_for_those_only() -> None:
    """A model trained without triangles (data.exclude) is previewed on the 16 classes it saw, one trained on "a red
    triangle" alone (data.classes) on that class: not on the 24 of the full set (the old behaviour, the control)."""
    from lightdiff.data.shapes import NUM_CLASSES, ShapesDataset, label_to_caption

    class Text:
        reads = frozenset({"text"})

    names = [label_to_caption(label) for label in range(NUM_CLASSES)]
    no_triangle = ShapesDataset(size=8, resolution=16, exclude=[n for n in names if n.endswith("triangle")])
    inputs, labels = preview_inputs(range(32), Text(), names, no_triangle.captions(), None, 24, no_triangle.kept_labels)
    assert set(inputs["text"]) == set(no_triangle.captions()) and len(set(inputs["text"])) == 16
    assert [names[label] for label in labels] == inputs["text"]  # the judge holds each image to its prompt
    one = ShapesDataset(size=8, resolution=16, classes=["a red triangle"])
    assert set(preview_inputs(range(5), Text(), names, one.captions(), None, 24, one.kept_labels)[0]["text"]) == {
        "a red triangle"
    }
    everything, _ = preview_inputs(range(32), Text(), names, no_triangle.captions(), None, 24)
    assert any(text.endswith("triangle") for text in everything["text"])  # control: without kept_labels


def test_class_conditional_run_on_integer_labels_previews_samples_and_draws(tmp_path: Path) -> None:
    root = _labelled_folder(tmp_path / "images")
    cfg = _folder_run(tmp_path, root, "run_name=labels", "net.num_class_embeds=10", "callbacks.samples.every_n_steps=1")
    train_run(cfg)  # stopped at its first preview before: "this model is class-conditional: give labels to sample"
    run_dir = Path(cfg.run_dir)
    assert {p.name for p in (run_dir / "samples").glob("*.png")} >= {"samples_step0000001.png", "final_step0000002.png"}
    out = sample_run(
        compose_config(
            "sample", [f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}", f"out={tmp_path / 'out'}", "num_images=4"]
        )
    )
    records = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["label"] for r in records] == [0, 1, 2, 3]  # by index, over the net's 10 classes
    assert all("text" not in r for r in records)  # no names to show


# ----- 0. model.pretrained brings its own parts -----------------------------------------------------------------


def _pretrained_run(tmp_path: Path, pipeline_dir: Path, name: str, *overrides: str):
    return compose_config(
        "train",
        [
            f"output_root={tmp_path}",
            *TINY,
            "model=latent",
            f"model.pretrained={pipeline_dir}",
            "model.load_pretrained_unet=true",
            f"run_name={name}",
            *overrides,
        ],
    )


def test_a_pretrained_unet_trains_on_its_pipelines_vae(pipeline_dir: Path, tmp_path: Path) -> None:
    from diffusers import AutoencoderKL

    cfg = _pretrained_run(tmp_path, pipeline_dir, "own")
    module = train_run(cfg).lightning_module
    pipeline_vae = AutoencoderKL.from_pretrained(pipeline_dir / "vae")
    assert all(torch.equal(value, module.vae.state_dict()[key]) for key, value in pipeline_vae.state_dict().items())
    table = (Path(cfg.run_dir) / "train.log").read_text()
    vae_row = next(line for line in table.splitlines() if line.startswith("vae "))
    assert vae_row.endswith(f"model.pretrained={pipeline_dir}")  # where the part came from
    net_row = next(line for line in table.splitlines() if line.startswith("net "))
    assert net_row.endswith(f"model.pretrained={pipeline_dir}")


def test_another_vae_under_a_pretrained_unet_is_refused_unless_asked_for(pipeline_dir: Path, tmp_path: Path) -> None:
    from diffusers import AutoencoderKL

    shapes_vae = str(REPO / "src" / "lightdiff" / "assets" / "vae_shapes16")
    cfg = _pretrained_run(tmp_path, pipeline_dir, "other", f"model.vae={shapes_vae}")
    with pytest.raises(ConfigError, match=r"model\.vae=.*vae_shapes16.*model\.allow_other_vae=true"):
        train_run(cfg)
    assert not Path(cfg.run_dir).exists()
    allowed = _pretrained_run(tmp_path, pipeline_dir, "other", f"model.vae={shapes_vae}", "model.allow_other_vae=true")
    module = train_run(allowed).lightning_module
    table = (Path(allowed.run_dir) / "train.log").read_text()
    assert next(line for line in table.splitlines() if line.startswith("vae ")).endswith(f"model.vae={shapes_vae}")
    expected = AutoencoderKL.from_pretrained(shapes_vae).state_dict()
    assert all(torch.equal(value, module.vae.state_dict()[key]) for key, value in expected.items())


# ----- 1. one owner per run folder ------------------------------------------------------------------------------


def _live_process() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def _write_lock(run_dir: Path, pid: int, host: str | None = None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    owner = {"host": host or socket.gethostname(), "pid": pid, "process_start": None, "started": time.time()}
    (run_dir / LOCK_NAME).write_text(json.dumps(owner) + "\n")


def test_a_second_run_on_a_locked_folder_is_refused_naming_the_owner(tiny_train_config, tmp_path: Path) -> None:
    train_run(tiny_train_config("run_name=busy"))
    run_dir = tmp_path / "busy"
    owner = _live_process()
    try:
        _write_lock(run_dir, owner.pid)
        before = snapshot(run_dir)
        with pytest.raises(ConfigError, match=rf"in use by another run \(pid {owner.pid} on {socket.gethostname()}"):
            train_run(tiny_train_config("run_name=busy", "trainer.max_steps=4", "model.lr=3e-4"))
        assert snapshot(run_dir) == before  # not a byte written: no config, no log line, no checkpoint
        # a lock held on another host is never judged stale from here
        _write_lock(run_dir, 1, host="another-node")
        with pytest.raises(ConfigError, match="pid 1 on another-node"):
            train_run(tiny_train_config("run_name=busy", "trainer.max_steps=4"))
    finally:
        owner.kill()
        owner.wait()


def test_a_stale_lock_is_taken_over_with_a_warning_and_released_at_the_end(tiny_train_config, tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lock(tmp_path / "stale", dead.pid)
    train_run(tiny_train_config("run_name=stale"))
    log_text = (tmp_path / "stale" / "train.log").read_text()
    assert f"taking over {tmp_path / 'stale' / LOCK_NAME}: its run (pid {dead.pid}" in log_text
    assert not (tmp_path / "stale" / LOCK_NAME).exists()  # released
    # a reused pid (alive, but started after the lock was written) is not the owner either
    lock = RunFolderLock(tmp_path / "reused")
    owner = dict(lock.owner, process_start="1")  # our pid, another start time
    assert lock._stale(owner) and not lock._stale(lock.owner)


def test_the_lock_is_released_when_a_run_fails(tiny_train_config, tmp_path: Path, monkeypatch) -> None:
    import pytorch_lightning as pl

    def fail(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(pl.Trainer, "fit", fail)
    with pytest.raises(RuntimeError, match="boom"):
        train_run(tiny_train_config("run_name=failing"))
    assert (tmp_path / "failing" / "config.yaml").exists() and not (tmp_path / "failing" / LOCK_NAME).exists()


@pytest.mark.slow  # a child process
def test_two_runs_started_at_once_in_one_folder_one_is_refused(tiny_train_config, tmp_path: Path) -> None:
    child = _child_run(tmp_path, "twice", "trainer.max_steps=40")
    try:
        _wait_for((tmp_path / "twice" / "checkpoints" / "step0000001.ckpt").exists, child, seconds=120)
        config = (tmp_path / "twice" / "config.yaml").read_text()
        with pytest.raises(ConfigError, match=rf"in use by another run \(pid {child.pid} "):
            train_run(tiny_train_config("run_name=twice", "trainer.max_steps=3", "model.lr=1e-2"))
        assert (tmp_path / "twice" / "config.yaml").read_text() == config
    finally:
        child.kill()
        child.wait()


# ----- 2. config history: append-only and atomic ----------------------------------------------------------------


def test_every_config_a_run_started_with_is_kept(tiny_train_config, tmp_path: Path) -> None:
    run_dir = tmp_path / "history"
    first = tiny_train_config("run_name=history")
    train_run(first)
    original = (run_dir / "config.yaml").read_text()
    train_run(tiny_train_config("run_name=history", "trainer.max_steps=3"))  # resumed with a change
    train_run(tiny_train_config("run_name=history", "trainer.max_steps=3"))  # again, unchanged: no new entry
    history = config_history(run_dir)
    assert [p.name for p in history] == ["000.yaml", "001.yaml"]
    assert history[0].read_text() == original and "max_steps: 3" in history[1].read_text()
    assert (run_dir / "config.yaml").read_text() == history[1].read_text()
    assert not (run_dir / "config.previous.yaml").exists()


@pytest.mark.parametrize(
    ("override", "named"),
    [("data.num_workers=-1", r"data\.num_workers=-1"), ("seed=-3", "seed=-3"), ("callbacks.samples.seed=-1", "seed")],
)
def test_refused_resumes_never_touch_the_runs_configs(override: str, named: str, tiny_train_config, tmp_path) -> None:
    train_run(tiny_train_config("run_name=kept"))
    before = snapshot(tmp_path / "kept")
    for _ in range(2):  # twice: the second refusal once emptied config.previous.yaml
        with pytest.raises(ConfigError, match=named):
            train_run(tiny_train_config("run_name=kept", "trainer.max_steps=3", override))
    assert snapshot(tmp_path / "kept") == before


def test_a_full_disk_while_writing_the_config_loses_nothing(tiny_train_config, tmp_path: Path, monkeypatch) -> None:
    import lightdiff.run_folder as run_folder

    train_run(tiny_train_config("run_name=full"))
    before = snapshot(tmp_path / "full")

    def no_space(descriptor: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run_folder.os, "fsync", no_space)
    for _ in range(2):
        with pytest.raises(OSError, match="No space left"):
            train_run(tiny_train_config("run_name=full", "trainer.max_steps=3"))
    monkeypatch.undo()
    after = snapshot(tmp_path / "full")
    kept = {name: digest for name, digest in after.items() if name != "train.log"}  # the log says what happened
    assert kept == {name: digest for name, digest in before.items() if name != "train.log"}
    assert not list((tmp_path / "full").rglob("*.tmp"))  # no partial file left behind


def test_a_legacy_folders_configs_become_the_start_of_its_history(tmp_path: Path) -> None:
    (tmp_path / "config.previous.yaml").write_text("seed: 0\n")
    (tmp_path / "config.yaml").write_text("seed: 1\n")
    record_config(tmp_path, "seed: 2\n")
    assert [p.read_text() for p in config_history(tmp_path)] == ["seed: 0\n", "seed: 1\n", "seed: 2\n"]
    assert (tmp_path / "config.yaml").read_text() == "seed: 2\n"


# ----- 3. a preempted run leaves at once ------------------------------------------------------------------------


class _SignalAt(pl.Callback):
    """Sends this process `signum` at the end of batch `step` (before the Preemption callback's turn)."""

    def __init__(self, step: int, signum: signal.Signals = signal.SIGTERM) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            signal.raise_signal(self.signum)


def test_a_preempted_run_saves_and_skips_the_end_of_run_round(tiny_train_config, tmp_path: Path, monkeypatch) -> None:
    import lightdiff.train as train

    ends: list[str] = []
    monkeypatch.setattr(SampleGrid, "on_train_end", lambda self, trainer, module: ends.append("final round"))
    original = train.build

    def build_trainer(node, **kwargs):
        if "callbacks" in kwargs:  # the trainer: the signal lands before Preemption's batch-end turn
            kwargs["callbacks"].insert(1, _SignalAt(2))
        return original(node, **kwargs)

    monkeypatch.setattr(train, "build", build_trainer)
    cfg = tiny_train_config("run_name=preempted", "trainer.max_steps=6", "callbacks.samples.every_n_steps=1")
    with pytest.raises(Preempted, match="preempted at step 2"):
        train_run(cfg)
    run_dir = Path(cfg.run_dir)
    assert ends == []  # no final grids, samples or metrics
    assert load_checkpoint_file(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 2
    assert not (run_dir / "final_metrics.json").exists()
    assert "preempted at step 2 (SIGTERM)" in (run_dir / "train.log").read_text()
    assert not (run_dir / "samples" / "samples_step0000002.png").exists()  # the grid waited behind the save
    assert not (run_dir / LOCK_NAME).exists()
    # negative control: the same run unpreempted runs its end-of-run round
    monkeypatch.setattr(train, "build", original)
    train_run(tiny_train_config("run_name=preempted", "trainer.max_steps=6", "callbacks.samples.every_n_steps=1"))
    assert ends == ["final round"]
    # the handlers are Lightning's / the default again after both runs
    assert not isinstance(getattr(signal.getsignal(signal.SIGTERM), "__self__", None), Preemption)


def _child_run(tmp_path: Path, name: str, *overrides: str) -> subprocess.Popen:
    """A tiny run in a child process that checkpoints at every step (the tests wait for those files)."""
    every_step = "callbacks.checkpoint.every_n_train_steps=1"
    arguments = [f"output_root={tmp_path}", f"run_name={name}", *TINY, every_step, *overrides]
    code = KILLABLE.format(repo=str(REPO), overrides=arguments)
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "WANDB_MODE": "offline"})


def _wait_for(condition, child: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert child.poll() is None, f"the child run exited with {child.returncode} too early"
        assert time.monotonic() < deadline, "the child run did not get there in time"
        time.sleep(0.05)


# A final round that takes minutes on a CPU: 4096 images x 200 steps.
LONG_FINAL_ROUND = ["callbacks.samples.final_num_images=4096", "callbacks.samples.steps=200"]


@pytest.mark.slow  # child processes
@pytest.mark.parametrize("when", ["training", "final round"])
def test_sigterm_exits_within_seconds_of_the_save(when: str, tmp_path: Path) -> None:
    steps = 30 if when == "training" else 3
    child = _child_run(tmp_path, "cut", f"trainer.max_steps={steps}", *LONG_FINAL_ROUND)
    last = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    try:
        if when == "training":
            _wait_for((tmp_path / "cut" / "checkpoints" / "step0000002.ckpt").exists, child)
        else:  # training is over once last.ckpt holds the last step; the final round is running
            _wait_for(lambda: last.exists() and load_checkpoint_file(last)["global_step"] == steps, child)
            time.sleep(1.0)
        os.kill(child.pid, signal.SIGTERM)
        signalled = time.monotonic()
        child.wait(timeout=60)
        seconds = time.monotonic() - signalled
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == PREEMPTED_EXIT_STATUS
    assert seconds < 15, f"the run took {seconds:.1f} s to leave after SIGTERM"
    step = load_checkpoint_file(last)["global_step"]
    assert (step < steps) if when == "training" else (step == steps)
    log_text = (tmp_path / "cut" / "train.log").read_text()
    assert f"preempted at step {step} (SIGTERM)" in log_text
    assert not (tmp_path / "cut" / "final_metrics.json").exists()


# ----- 4. non-finite weights and 5. checkpoint formats ----------------------------------------------------------


def _poisoned(checkpoint: Path, folder: Path, where: str) -> Path:
    """A copy of `checkpoint` with one NaN in the raw weights or in the EMA weights."""
    data = load_checkpoint_file(checkpoint)
    if where == "raw":
        data["state_dict"]["net.conv_in.weight"][0, 0, 0, 0] = float("nan")
    else:
        data["callbacks"]["ema"]["shadow_params"][0][0, 0, 0, 0] = float("nan")
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(data, folder / "poisoned.ckpt")
    return folder / "poisoned.ckpt"


@pytest.mark.parametrize(("where", "use_ema"), [("ema", True), ("raw", False)])
def test_sample_and_export_refuse_the_weights_they_would_use_if_not_finite(
    where: str, use_ema: bool, pixel_ckpt: Path, tmp_path: Path
) -> None:
    bad = _poisoned(pixel_ckpt, tmp_path / "ckpt", where)
    which = "EMA weights" if use_ema else "weights"
    for extra in ([f"out={tmp_path / 'out'}"], [f"export={tmp_path / 'export'}"]):
        cfg = compose_config("sample", [f"ckpt={bad}", "num_images=2", "steps=2", f"use_ema={use_ema}", *extra])
        with pytest.raises(ValueError, match=rf"net\.conv_in\.weight \({which}\) holds NaN"):
            sample_run(cfg)
    assert not (tmp_path / "out").exists() and not (tmp_path / "export").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial folder either
    # negative control: the NaN the other side holds is not used, so it does not stop the drawing
    sample_run(
        compose_config(
            "sample", [f"ckpt={bad}", "num_images=2", "steps=2", f"use_ema={not use_ema}", f"out={tmp_path / 'ok'}"]
        )
    )
    assert len(list((tmp_path / "ok").glob("0*.png"))) == 2


def test_a_non_finite_checkpoint_as_ckpt_path_is_refused(pixel_ckpt: Path, tiny_train_config, tmp_path: Path) -> None:
    bad = _poisoned(pixel_ckpt, tmp_path / "ckpt", "raw")
    cfg = tiny_train_config("run_name=from_nan", f"ckpt_path={bad}", "trainer.max_steps=5")
    with pytest.raises(ConfigError, match=r"\['net\.conv_in\.weight'\] holds NaN"):
        train_run(cfg)
    assert not Path(cfg.run_dir).exists()


@pytest.mark.parametrize(
    ("version", "message"),
    [
        (99, r"newer lightdiff \(checkpoint format 99; this version reads formats 1 to 2\)"),
        ("x", "is not a checkpoint format"),
    ],
)
def test_a_checkpoint_format_this_code_cannot_read_is_refused(
    version, message: str, pixel_ckpt: Path, tiny_train_config, tmp_path: Path
) -> None:
    data = load_checkpoint_file(pixel_ckpt)
    data["lightdiff"]["format"] = version
    torch.save(data, tmp_path / "future.ckpt")
    with pytest.raises(ValueError, match=message):
        load_trained(tmp_path / "future.ckpt")
    cfg = tiny_train_config("run_name=future", f"ckpt_path={tmp_path / 'future.ckpt'}", "trainer.max_steps=5")
    with pytest.raises(ConfigError, match=message):
        train_run(cfg)
    assert not Path(cfg.run_dir).exists()
    data["lightdiff"]["format"] = 1  # negative control: an older format is read (format 1 is migrated)
    torch.save(data, tmp_path / "older.ckpt")
    assert load_trained(tmp_path / "older.ckpt").net is not None


def test_one_last_ckpt_per_run_however_often_it_is_launched(tiny_train_config, tmp_path: Path) -> None:
    # the first launch ends before any periodic checkpoint: only the final one, written outside ModelCheckpoint
    train_run(tiny_train_config("run_name=once", "callbacks.checkpoint.every_n_train_steps=500"))
    for steps in (3, 4):
        every_step = "callbacks.checkpoint.every_n_train_steps=1"
        train_run(tiny_train_config("run_name=once", f"trainer.max_steps={steps}", every_step))
    names = sorted(p.name for p in (tmp_path / "once" / "checkpoints").glob("*.ckpt"))
    assert names == ["last.ckpt", "step0000004.ckpt"]
    assert load_checkpoint_file(tmp_path / "once" / "checkpoints" / "last.ckpt")["global_step"] == 4


# ----- 5. LoRA rank, seeds, stale temporaries, shards and frames -----------------------------------------------


def test_a_lora_rank_above_a_layers_side_is_refused_naming_it(pipeline_dir: Path, tmp_path: Path) -> None:
    cfg = compose_config(
        "train",
        [
            f"output_root={tmp_path}",
            *TINY,
            "model=latent",
            f"model.pretrained={pipeline_dir}",
            "model.load_pretrained_unet=true",
            "model.lora.rank=1000",
        ],
    )
    with pytest.raises(
        ConfigError,
        match=r"model\.lora\.rank=1000 is above the smaller side of the adapted layer .*"
        r"at most \d+ here",
    ):
        train_run(cfg)
    assert not Path(cfg.run_dir).exists()


def test_seeds_are_bounded_everywhere(pixel_ckpt: Path, tiny_train_config, tmp_path: Path) -> None:
    assert seed_problem(MAX_SEED, 1) is None and seed_problem(0, 1) is None
    assert "past" in seed_problem(MAX_SEED, 2) and "from 0 to" in seed_problem(-1, 1)
    for seed, message in ((-1, "seed=-1 must be a whole number from 0"), (2**70, "seed=1180591620717411303424")):
        cfg = compose_config("sample", [f"ckpt={pixel_ckpt}", f"out={tmp_path / 'out'}", f"seed={seed}"])
        with pytest.raises(ConfigError, match=message):
            sample_run(cfg)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="seed=4294967296 must be a whole number from 0 to 4294967295"):
        train_run(tiny_train_config("run_name=big_seed", f"seed={2**32}"))
    assert not (tmp_path / "big_seed").exists()


def test_stale_partial_folders_of_killed_processes_are_cleaned(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = _live_process()
    try:
        target = tmp_path / "out"
        stale = tmp_path / f".out.partial-{dead.pid}-abc"
        busy = tmp_path / f".out.partial-{live.pid}-abc"  # another sample.py writing now: not ours to remove
        interrupted = tmp_path / f".out.old-{dead.pid}-abc"
        for folder in (stale, busy, interrupted / "out"):
            folder.mkdir(parents=True)
        (interrupted / "out" / "000000.png").write_bytes(b"the previous output")
        with folder_written_atomically(target) as staging:
            # the previous contents, left in .old by a kill between the two renames, were put back first
            assert (target / "000000.png").read_bytes() == b"the previous output"
            (staging / "new.txt").write_text("new")
        assert not stale.exists() and not interrupted.exists() and busy.exists()
        assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    finally:
        live.kill()
        live.wait()


def test_a_brace_error_in_data_urls_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"data\.urls='train-\{000\.\.003\.tar' is not a shard pattern"):
        shard_urls("train-{000..003.tar")


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Eight shards of four captioned images (test_shards' data): (their source folder, data.urls)."""
    from lightdiff.data.shard import main as write_shards

    root = tmp_path_factory.mktemp("shards")
    write_shards([str(_folder(root / "images")), str(root / "shards"), "--max-count", "4"])
    return root / "images", f"{root}/shards/train-{{000000..000007}}.tar"


def test_a_truncated_first_shard_is_skipped_with_skip_bad(shards: tuple[Path, str], tmp_path: Path) -> None:
    from lightdiff.data import ShardsDataModule

    urls = shard_urls(shards[1])
    for url in urls:
        shutil.copy(url, tmp_path)
    first = tmp_path / Path(urls[0]).name
    first.write_bytes(first.read_bytes()[:3000])  # cut inside a member: what a failed copy leaves
    pattern = str(tmp_path / "train-{000000..000007}.tar")
    once = {"resolution": 8, "batch_size": 2, "num_workers": 0, "shard_retries": 0}  # no retry: the cut stays cut
    module = ShardsDataModule(urls=pattern, reference_size=8, **once)
    assert len(module.source_dataset) == 8 and module.source_dataset.first_readable.endswith("train-000001.tar")
    with pytest.raises(OSError, match="cannot read shard .*train-000000.tar"):  # negative control: skip_bad=false
        ShardsDataModule(urls=pattern, skip_bad=False, **once)


def test_a_frames_folder_of_mixed_sizes_is_refused_or_skipped(tmp_path: Path) -> None:
    from lightdiff.data.video_folder import VideoFolderDataset

    for clip, sizes in (("even", [(16, 16)] * 4), ("mixed", [(16, 16), (16, 16), (24, 16), (16, 16)])):
        (tmp_path / "clips" / clip).mkdir(parents=True)
        for index, size in enumerate(sizes):
            Image.new("RGB", size, (40 * index, 0, 0)).save(tmp_path / "clips" / clip / f"{index:03d}.png")
    with pytest.raises(ValueError, match=r"mixed: its frames are not all one size \(16x16, 24x16\)"):
        VideoFolderDataset(str(tmp_path / "clips"), resolution=16, num_frames=4)
    dataset = VideoFolderDataset(str(tmp_path / "clips"), resolution=16, num_frames=4, skip_bad=True)
    assert [p.name for p in dataset.paths] == ["even"] and len(dataset.skipped) == 1


def test_fallback_messages_reach_train_log(tiny_train_config, tmp_path: Path) -> None:
    cfg = tiny_train_config("run_name=fallback", "callbacks.checkpoint.every_n_train_steps=1")
    train_run(cfg)
    last = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # damaged: the resume falls back to the step checkpoint
    train_run(tiny_train_config("run_name=fallback", "trainer.max_steps=3"))
    assert f"skipping checkpoint {last}" in (Path(cfg.run_dir) / "train.log").read_text()


def test_sample_py_judges_a_shards_run_without_data(shards: tuple[Path, str], tmp_path: Path) -> None:
    """metrics=fid on a shards run's checkpoint reads the run's data from its config.yaml (was refused as "names no
    lightdiff data module")."""
    from lightdiff.sample import reference_data

    cfg = compose_config(
        "train",
        [f"output_root={tmp_path}", "run_name=s", f'data.urls="{shards[1]}"', "trainer.max_steps=1", *SHARD_RUN],
    )
    train_run(cfg)
    sample_cfg = compose_config("sample", [f"ckpt={Path(cfg.run_dir) / 'checkpoints' / 'last.ckpt'}"])
    assert type(reference_data(sample_cfg)).__name__ == "ShardsDataModule"


def test_an_empty_lock_is_another_run_writing_until_it_is_old(tmp_path: Path) -> None:
    """A run between its O_EXCL and the write of its owner leaves an empty lock for a moment: not stale yet."""
    lock = RunFolderLock(tmp_path)
    (tmp_path / LOCK_NAME).write_text("")
    assert lock.refusal() is not None  # fresh: another run may be writing it
    old = time.time() - 60
    os.utime(tmp_path / LOCK_NAME, (old, old))
    assert lock.refusal() is None  # a minute old: a process killed mid-write left it
    lock.acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()
