"""Hostile input is refused with an error that names it: crafted pickles, `_target_`s read back from files, remote
code, image paths that leave the data root, decompression bombs, and checkpoints of another model config.

Each payload here would leave a marker file behind if it ran; every test checks that the marker does not exist.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import json
import pickle
import pkgutil
import warnings
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from omegaconf import DictConfig
from PIL import Image

import lightdiff
from lightdiff.checkpointing import AtomicCheckpointIO
from lightdiff.config import ConfigError, build
from lightdiff.data import ShapesDataModule
from lightdiff.data.image_folder import ImageFolderDataset
from lightdiff.methods.teacher import load_teacher
from lightdiff.methods.turbo import FROZEN_PREFIXES
from lightdiff.nets.feature_discriminator import ViTFeatures
from lightdiff.sample import reference_data
from lightdiff.sample import run as sample_run
from lightdiff.train import run as train_run
from lightdiff.trained import load_autoencoder, load_checkpoint_file, load_denoiser, load_trained

from .conftest import TINY, compose_config

SRC = Path(lightdiff.__file__).parent


class _Touch:
    """Unpickling this calls Path.touch(marker): what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


class _Exec:
    """Unpickling this runs arbitrary Python source through builtins.exec."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (builtins.exec, (f"import pathlib; pathlib.Path({str(self.marker)!r}).touch()",))


PAYLOADS = {"touch": _Touch, "exec": _Exec}


def _crafted(folder: Path, payload: str, where: str) -> tuple[Path, Path]:
    """A checkpoint file with a code-running object in its metadata or among its weights, and the payload's marker."""
    marker = folder / f"pwned_{payload}_{where}"
    evil = PAYLOADS[payload](marker)
    content = {"lightdiff": evil} if where == "meta" else {"lightdiff": {}, "state_dict": {"net.conv_in.weight": evil}}
    path = folder / f"crafted_{payload}_{where}.ckpt"
    torch.save(content, path)
    return path, marker


@pytest.fixture(scope="module")
def tiny_ckpt(pixel_ckpt: Path) -> Path:
    """A pixel model (unet_tiny: block_out_channels [32, 64, 64]; conftest's, trained once per session)."""
    return pixel_ckpt


def _png(path: Path, side: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (side, side), (200, 30, 30)).save(path)
    return path


# ----- 1. crafted pickles -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_the_payloads_do_run_code_when_unpickled_unsafely(payload: str, tmp_path: Path) -> None:
    """The premise of the tests below: without weights_only these files do create their marker."""
    path, marker = _crafted(tmp_path, payload, "meta")
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("where", ["meta", "weights"])
@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_crafted_pickle_is_refused_by_every_loader(payload: str, where: str, tmp_path: Path) -> None:
    path, marker = _crafted(tmp_path, payload, where)
    name = path.name
    for load in (load_checkpoint_file, load_trained, load_denoiser, load_autoencoder):
        with pytest.raises(ValueError, match=f"cannot load checkpoint .*{name}"):
            load(path)
    # what Lightning calls on resume (train.py passes this plugin to the Trainer)
    with pytest.raises(pickle.UnpicklingError, match="[Ww]eights.only"):
        AtomicCheckpointIO().load_checkpoint(path)
    with pytest.raises(ConfigError, match=f"model.teacher=.*{name}.*cannot load checkpoint"):
        load_teacher(str(path))
    with pytest.raises(ValueError, match=f"cannot load checkpoint .*{name}"):
        sample_run(compose_config("sample", [f"ckpt={path}", f"out={tmp_path / 'out'}", "num_images=1"]))
    assert not marker.exists()


def test_resume_from_a_crafted_checkpoint_is_refused(tiny_train_config, tmp_path: Path) -> None:
    path, marker = _crafted(tmp_path, "exec", "meta")
    # refused by the Trainer's AtomicCheckpointIO, or by train.py's check of ckpt_path before it (a ConfigError)
    with pytest.raises((ValueError, pickle.UnpicklingError), match="Weights only load failed"):
        train_run(tiny_train_config("run_name=victim", f"ckpt_path={path}"))
    assert not marker.exists()


def test_pickled_weights_in_a_pipeline_folder_are_refused(tmp_path: Path) -> None:
    """A diffusers folder (sample.py ckpt=DIR, model.teacher=DIR) with .bin weights: diffusers loads weights-only."""
    folder = tmp_path / "pipe"
    net = UNet2DModel(
        sample_size=8,
        block_out_channels=(8, 8),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
    )
    net.save_pretrained(folder / "unet", safe_serialization=False)
    DDPMScheduler().save_pretrained(folder / "scheduler")
    marker = tmp_path / "pwned"
    torch.save({"conv_in.weight": _Exec(marker)}, folder / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises((OSError, ValueError), match="diffusion_pytorch_model.bin"):
        load_denoiser(folder)
    with pytest.raises((OSError, ValueError), match="diffusion_pytorch_model.bin"):
        load_teacher(str(folder))
    assert not marker.exists()


# ----- 2. `_target_`s and class names read back from files ------------------------------------------------------------


def _run_with_config(tmp_path: Path, config_yaml: str) -> DictConfig:
    """A sample.py config whose checkpoint sits in a run folder with this config.yaml (the file is never opened)."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"")
    (run_dir / "config.yaml").write_text(config_yaml)
    return compose_config("sample", [f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}"])


# os.makedirs(marker) stands for any call: unlike os.system, Hydra's own target policy (newer releases) lets it run.
@pytest.mark.parametrize(
    ("data", "named"),
    [
        ("  _target_: os.system\n  command: touch {marker}\n", r"data._target_='os.system'"),
        ('  _target_: builtins.eval\n  _args_: [\'open("{marker}", "w")\']\n', r"data._target_='builtins.eval'"),
        ("  _target_: os.makedirs\n  name: {marker}\n", r"data._target_='os.makedirs'"),
        (  # an allowed data module with code one level down: Hydra instantiates that first
            "  _target_: lightdiff.data.ShapesDataModule\n  resolution: 16\n  size:\n"
            "    _target_: os.makedirs\n    name: {marker}\n",
            r"data.size._target_='os.makedirs'",
        ),
        (  # ... or in a list
            "  _target_: lightdiff.data.ShapesDataModule\n  _args_:\n"
            "    - _target_: os.makedirs\n      name: {marker}\n",
            r"data._args_\[0\]._target_='os.makedirs'",
        ),
        (  # a resolver that turns a string into a node with a _target_
            "  _target_: lightdiff.data.ShapesDataModule\n  resolution: 16\n"
            "  size: '${{oc.create:{{_target_: os.makedirs, name: {marker}}}}}'\n",
            r"data.size='\$\{oc.create:",
        ),
    ],
)
def test_run_config_targets_outside_the_allow_list_are_refused(data: str, named: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    cfg = _run_with_config(tmp_path, "data:\n" + data.format(marker=marker))
    with pytest.raises(ConfigError, match=named):
        reference_data(cfg)
    assert not marker.exists()


def test_run_config_with_an_allowed_data_module_is_built(tmp_path: Path) -> None:
    """The allow-list's other side: a real run's data section still gives the reference images."""
    cfg = _run_with_config(
        tmp_path, "data:\n  _target_: lightdiff.data.ShapesDataModule\n  resolution: 16\n  size: 64\n  batch_size: 4\n"
    )
    assert isinstance(reference_data(cfg), ShapesDataModule)


def test_checkpoint_class_names_outside_the_allow_list_are_refused(tiny_ckpt: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    checkpoint = load_checkpoint_file(tiny_ckpt)
    # Hyper-parameters with a _target_ are never instantiated: the network comes from the plain `lightdiff` block.
    checkpoint["hyper_parameters"] = {"net": {"_target_": "os.system", "command": f"touch {marker}"}}
    torch.save(checkpoint, tmp_path / "hparams.ckpt")
    assert list(load_denoiser(tmp_path / "hparams.ckpt").net.config.block_out_channels) == [32, 64, 64]
    for name in ("os.system", "builtins.eval", "diffusers.UNet2DModel"):
        checkpoint["lightdiff"]["net_class"] = name
        torch.save(checkpoint, tmp_path / "forged.ckpt")
        with pytest.raises(ValueError, match=rf"forged.ckpt: lightdiff.net_class='{name}' is not one of"):
            load_denoiser(tmp_path / "forged.ckpt")
    folder = tmp_path / "pipe"
    (folder / "scheduler").mkdir(parents=True)
    (folder / "unet").mkdir()
    (folder / "unet" / "config.json").write_text(json.dumps({"_class_name": "os.system"}))
    with pytest.raises(ValueError, match="unet class 'os.system' is not one of"):
        load_denoiser(folder)
    assert not marker.exists()


# ----- 3. remote code -------------------------------------------------------------------------------------------------

AUTO_CLASSES = ("AutoModel", "AutoConfig", "AutoTokenizer", "AutoProcessor", "AutoImageProcessor", "DiffusionPipeline")


def _calls(tree: ast.AST) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)]


def test_source_never_trusts_remote_code() -> None:
    """No call passes trust_remote_code other than a literal False, and every Auto* loader passes False (left out,
    transformers asks on a terminal; a script answering yes would run a repository's code)."""
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        for call in _calls(ast.parse(path.read_text(), filename=str(path))):
            where = f"{path.relative_to(SRC)}:{call.lineno}"
            keywords = {k.arg: k.value for k in call.keywords}
            value = keywords.get("trust_remote_code")
            if "trust_remote_code" in keywords and not (isinstance(value, ast.Constant) and value.value is False):
                problems.append(f"{where}: trust_remote_code={ast.unparse(value)}")
            if None in keywords:  # **options could smuggle trust_remote_code=True into a loader
                function = ast.unparse(call.func)
                if function.endswith(("from_pretrained", "load_dataset", "snapshot_download")):
                    problems.append(f"{where}: {function}(**...)")
            function = call.func
            if (
                isinstance(function, ast.Attribute)
                and function.attr == "from_pretrained"
                and isinstance(function.value, ast.Name)
                and function.value.id in AUTO_CLASSES
                and not isinstance(value, ast.Constant)
            ):
                problems.append(f"{where}: {function.value.id}.from_pretrained without trust_remote_code=False")
    assert not problems, problems


def test_a_vision_model_folder_with_custom_code_is_refused(tmp_path: Path) -> None:
    """discriminator.backbone.model=DIR whose config.json maps AutoModel to a module of its own: never imported."""
    marker = tmp_path / "pwned"
    folder = tmp_path / "evil_vit"
    folder.mkdir()
    auto_map = {"AutoConfig": "modeling_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps({"model_type": "evil-vit", "auto_map": auto_map}))
    (folder / "modeling_evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    with pytest.raises(ConfigError, match=r"discriminator.backbone.model=.*evil_vit.* custom code"):
        ViTFeatures(str(folder))
    assert not marker.exists()


# ----- 4. image paths that leave the data root ------------------------------------------------------------------------


def test_symlinks_out_of_the_data_root_are_refused(tmp_path: Path) -> None:
    outside = _png(tmp_path / "private" / "secret.png")
    root = tmp_path / "data"
    _png(root / "a.png")
    _png(root / "sub" / "b.png")
    (root / "inner_link.png").symlink_to(root / "sub" / "b.png")  # a link that stays inside is fine
    assert len(ImageFolderDataset(str(root), resolution=8)) == 3

    (root / "sub" / "leak.png").symlink_to(outside)
    with pytest.raises(ValueError, match=r"sub/leak.png is a symlink to .*secret.png, outside data.root=.*data"):
        ImageFolderDataset(str(root), resolution=8)
    (root / "sub" / "leak.png").unlink()

    (root / "more").symlink_to(tmp_path / "private", target_is_directory=True)
    with pytest.raises(ValueError, match=r"data/more is a symlink to .*private, outside data.root=.*data"):
        ImageFolderDataset(str(root), resolution=8)


@pytest.mark.parametrize("file_name", ["../outside.png", "sub/../../outside.png", "{absolute}"])
def test_metadata_naming_a_file_outside_the_data_root_is_refused(file_name: str, tmp_path: Path) -> None:
    outside = _png(tmp_path / "outside.png")
    root = tmp_path / "data"
    _png(root / "a.png")
    file_name = file_name.format(absolute=outside)
    lines = [{"file_name": "a.png", "text": "fine"}, {"file_name": file_name, "text": "leak"}]
    (root / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(ValueError, match=rf"metadata.jsonl:2: file_name='{file_name}' points outside data.root=.*data"):
        ImageFolderDataset(str(root), resolution=8)


# ----- 5. decompression bombs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "side",
    [12, 16],  # 144 pixels: Pillow only warns (above the limit, below twice it); 256: Pillow raises
)
@pytest.mark.parametrize("warnings_are_errors", [False, True])
def test_images_above_pillows_pixel_limit_are_refused(
    side: int, warnings_are_errors: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "data"
    _png(root / "small.png", side=8)  # 64 pixels, under the limit
    _png(root / "bomb.png", side=side)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # instead of writing a gigapixel file
    with warnings.catch_warnings():
        warnings.simplefilter("error" if warnings_are_errors else "ignore", Image.DecompressionBombWarning)
        with pytest.raises(ValueError, match=r"refusing image .*bomb.png: .*MAX_IMAGE_PIXELS"):
            ImageFolderDataset(str(root), resolution=8)  # the start-up scan opens every image
        skipping = ImageFolderDataset(str(root), resolution=8, skip_bad=True)
    assert [p.name for p in skipping.skipped] == ["bomb.png"] and len(skipping) == 1
    assert skipping[0]["pixel_values"].shape == (3, 8, 8)
    _png(root / "small.png", side=side)  # swapped for a bomb after the scan: reading it still refuses it
    with pytest.raises(ValueError, match=r"refusing image .*small.png: .*MAX_IMAGE_PIXELS"):
        skipping[0]


def test_pillows_pixel_limit_stays_in_force() -> None:
    """Nothing in lightdiff (or what it imports) switches the limit off or changes it."""
    for module in pkgutil.walk_packages(lightdiff.__path__, "lightdiff."):
        importlib.import_module(module.name)
    assert Image.MAX_IMAGE_PIXELS == int(1024 * 1024 * 1024 // 4 // 3)  # Pillow's default
    setters = [  # Image.MAX_IMAGE_PIXELS = ..., del ..., setattr(Image, "MAX_IMAGE_PIXELS", ...)
        f"{path.relative_to(SRC)}:{node.lineno}"
        for path in sorted(SRC.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if (isinstance(node, ast.Attribute) and node.attr == "MAX_IMAGE_PIXELS" and not isinstance(node.ctx, ast.Load))
        or (isinstance(node, ast.Constant) and node.value == "MAX_IMAGE_PIXELS")
    ]
    assert not setters, setters


# ----- 6. checkpoints of another model config -------------------------------------------------------------------------


def test_resume_with_another_net_config_names_the_mismatched_keys(tiny_ckpt: Path, tiny_train_config) -> None:
    cfg = tiny_train_config("run_name=resized", f"ckpt_path={tiny_ckpt}", "net.block_out_channels=[16,32,32]")
    with pytest.raises(ValueError, match=r"resuming from .*last.ckpt: the checkpoint does not fit the model") as error:
        train_run(cfg)
    assert "net.conv_in.weight: checkpoint (32, 3, 3, 3) vs model (16, 3, 3, 3)" in str(error.value)
    assert not Path(cfg.run_dir).exists()  # refused before the run folder is made
    other_layers = tiny_train_config("run_name=deeper", f"ckpt_path={tiny_ckpt}", "net.layers_per_block=2")
    with pytest.raises(ValueError, match=r"key\(s\) missing from the checkpoint: net.down_blocks.0.resnets.1"):
        train_run(other_layers)


def test_loading_weights_of_another_config_names_the_mismatched_keys(tiny_ckpt: Path, tmp_path: Path) -> None:
    checkpoint = load_checkpoint_file(tiny_ckpt)

    def load(name: str, change) -> str:
        forged = load_checkpoint_file(tiny_ckpt)
        change(forged)
        torch.save(forged, tmp_path / name)
        with pytest.raises(ValueError, match=rf"{name} \(net.\) does not fit the model") as error:
            load_denoiser(tmp_path / name, use_ema=False)
        return str(error.value)

    message = load("narrow.ckpt", lambda c: c["lightdiff"]["net_config"].update(block_out_channels=[16, 32, 32]))
    assert "conv_in.weight: checkpoint (32, 3, 3, 3) vs model (16, 3, 3, 3)" in message
    message = load("missing.ckpt", lambda c: c["state_dict"].pop("net.conv_out.bias"))
    assert "1 key(s) missing from the checkpoint: conv_out.bias" in message
    message = load("extra.ckpt", lambda c: c["state_dict"].update({"net.extra.weight": torch.zeros(2)}))
    assert "1 unexpected key(s) in the checkpoint: extra.weight" in message

    checkpoint["callbacks"]["ema"]["shadow_params"][0] = torch.zeros(1)  # copy_ would broadcast it silently
    torch.save(checkpoint, tmp_path / "ema.ckpt")
    with pytest.raises(ValueError, match=r"EMA weights of net.conv_in.weight have shape \(1,\), the network's"):
        load_denoiser(tmp_path / "ema.ckpt")


def test_turbo_checks_its_checkpoints_but_not_for_the_teacher_it_leaves_out(tiny_ckpt: Path, tmp_path: Path) -> None:
    cfg = compose_config("train", [f"output_root={tmp_path}", *TINY, "model=turbo", f"model.teacher={tiny_ckpt}"])
    module = build(cfg.model, data=build(cfg.data))
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert not any(key.startswith(FROZEN_PREFIXES) for key in checkpoint["state_dict"])
    module.on_load_checkpoint(checkpoint)  # the teacher is missing on purpose: no error
    checkpoint["state_dict"]["net.conv_in.weight"] = torch.zeros(16, 3, 3, 3)
    with pytest.raises(ValueError, match=r"net.conv_in.weight: checkpoint \(16, 3, 3, 3\) vs model \(32, 3, 3, 3\)"):
        module.on_load_checkpoint(checkpoint)
    del checkpoint["state_dict"]["net.conv_in.weight"]
    with pytest.raises(ValueError, match=r"missing from the checkpoint: net.conv_in.weight"):
        module.on_load_checkpoint(checkpoint)
