"""The demo page (`python sample.py ckpt=PATH demo=true`, lightdiff/demo.py): its images are sample.py's, pixel for
pixel, for the command it shows; bad settings and a checkpoint that fails to load are reported on the page; one
drawing at a time; and, marked slow, the whole page driven in a real (system) Chromium."""

from __future__ import annotations

import json
import shlex
import shutil
import socket
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lightdiff.config import ConfigError
from lightdiff.demo import PNG_METADATA_KEY, DemoModel, Settings, build_app, settings_problem
from lightdiff.sample import run as sample_run

from .conftest import compose_config

pytest.importorskip("gradio", reason="the demo is an optional extra: pip install 'lightdiff[demo]'")


def _demo_config(ckpt: Path, *overrides: str):
    return compose_config("sample", [f"ckpt={ckpt}", "demo.enabled=true", "steps=3", *overrides])


def _loaded(ckpt: Path, *overrides: str) -> DemoModel:
    model = DemoModel(_demo_config(ckpt, *overrides))
    model.load()
    return model


def _sample_py(command: str, out: Path) -> list[np.ndarray]:
    """Run the page's `python sample.py ...` command (in-process, as Hydra parses it) into `out`; its images."""
    words = shlex.split(command)
    assert words[:2] == ["python", "sample.py"]
    sample_run(compose_config("sample", [*words[2:], f"out={out}"]))
    return [np.asarray(Image.open(path)) for path in sorted(out.glob("0*.png"))]


def test_the_pages_images_are_what_its_sample_py_command_writes(text_ckpt: Path, tmp_path: Path) -> None:
    model = _loaded(text_ckpt)
    assert model.error is None and model.takes_text
    tricky = 'blue, "dark" = 1 \\ true'  # commas, quotes, '=', a backslash: the command must carry it exactly
    settings = Settings(prompt="a red circle", negative_prompt=tricky, steps=3, guidance_scale=3.0, seed=7)
    settings.batch_size = 2
    drawn = model.draw(settings)
    record = json.loads(Image.open(drawn.files[1]).text[PNG_METADATA_KEY])  # each PNG carries its record
    assert record["seed"] == 8 and record["text"] == "a red circle" and record["steps"] == 3
    assert record["negative_prompt"] == tricky and record["guidance_scale"] == 3.0
    written = _sample_py(record["command"], tmp_path / "again")
    shown = [np.asarray(Image.open(path)) for path in drawn.files]
    assert len(written) == 2 and all(np.array_equal(a, b) for a, b in zip(shown, written, strict=True))
    records = [json.loads(line) for line in (drawn.files[0].parent / "metadata.jsonl").read_text().splitlines()]
    again = [json.loads(line) for line in (tmp_path / "again" / "metadata.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "command"} for r in records] == again  # sample.py's fields
    # negative control: another seed draws other pixels (equality above is not a constant image)
    other = model.draw(Settings(prompt="a red circle", negative_prompt=tricky, steps=3, guidance_scale=3.0, seed=9))
    assert not np.array_equal(np.asarray(Image.open(other.files[0])), shown[0])


def test_an_exported_pipeline_on_the_speed_path_is_drawn_as_sample_py_draws_it(text_ckpt: Path, tmp_path: Path) -> None:
    """Whatever sample.py takes: an exported pipeline folder; the speed path's switches apply once at load, with their
    numerical check, and the command carries them."""
    folder = sample_run(compose_config("sample", [f"ckpt={text_ckpt}", f"export={tmp_path / 'pipeline'}"]))
    model = _loaded(folder, "speed.fuse_qkv=true")
    assert model.error is None and model.takes_text
    drawn = model.draw(Settings(prompt="a green triangle", steps=2, seed=3))
    command = drawn.records[0]["command"]
    assert "speed.fuse_qkv=true" in command and f"ckpt={folder}" in command
    assert drawn.records[0]["speed"]["fuse_qkv"] is True  # metadata.jsonl's record of the switches, as sample.py's
    written = _sample_py(command, tmp_path / "again")
    assert np.array_equal(np.asarray(Image.open(drawn.files[0])), written[0])


def test_class_and_unconditional_models_take_their_own_inputs(class_ckpt: Path, pixel_ckpt: Path) -> None:
    classes = _loaded(class_ckpt)
    assert classes.class_choices and not classes.takes_text
    drawn = classes.draw(Settings(label=2, steps=2))
    assert json.loads(Image.open(drawn.files[0]).text[PNG_METADATA_KEY])["label"] == 2
    assert "label=2" in drawn.records[0]["command"] and "prompt" not in drawn.records[0]["command"]
    assert "guidance_scale" not in drawn.records[0]["command"] and not classes.guided  # sample.py guides no class model
    plain = _loaded(pixel_ckpt)
    assert not plain.class_choices and not plain.takes_text
    assert "label" not in plain.draw(Settings(steps=2)).records[0]


def test_a_turbo_student_is_live_and_drawn_beside_its_teacher(class_ckpt: Path, tmp_path: Path) -> None:
    """A few-step student's page regenerates as the prompt is typed, and draws its recorded teacher at
    demo.teacher_steps for the same seed: the teacher's image is what sample.py writes from the teacher."""
    from lightdiff.train import run as train_run

    from .conftest import TINY

    cfg = compose_config(
        "train",
        [f"output_root={tmp_path}", *TINY, "model=turbo", f"model.teacher={class_ckpt}", "model.teacher_steps=2"]
        + ["run_name=student", "trainer.max_steps=2"],
    )
    train_run(cfg)
    model = _loaded(Path(cfg.run_dir) / "checkpoints" / "last.ckpt", "demo.teacher_steps=3")
    assert model.error is None and model.teacher is not None and model.teacher_source == str(class_ckpt)
    assert model.live_default and model.default_settings().steps == model.denoiser.student_steps <= 4
    settings = model.default_settings()
    student, teacher = model.draw(settings), model.draw(settings, teacher=True)
    assert teacher.records[0]["steps"] == 3 and teacher.records[0]["seed"] == student.records[0]["seed"]
    assert f"ckpt={class_ckpt}" in teacher.records[0]["command"]
    written = _sample_py(teacher.records[0]["command"], tmp_path / "teacher")
    assert np.array_equal(np.asarray(Image.open(teacher.files[0])), written[0])
    assert not np.array_equal(np.asarray(Image.open(student.files[0])), written[0])


def test_typing_regenerates_only_the_newest_prompt_in_the_models_one_slot(text_ckpt: Path) -> None:
    """Live typing is wired as Gradio's `always_last` trigger (keystrokes do not pile up) and shares the button's
    concurrency slot of one, so typing and clicking never draw at once."""
    app = build_app(_demo_config(text_ckpt))
    events = {tuple(event for _, event in function.targets): function for function in app.fns.values()}
    typed, clicked = events[("input",)], events[("click",)]
    assert typed.trigger_mode == "always_last" and clicked.trigger_mode == "once"
    assert typed.concurrency_id == clicked.concurrency_id and typed.concurrency_limit == clicked.concurrency_limit == 1


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (Settings(steps=0), "steps=0 must be"),
        (Settings(steps=1001), "steps=1001 must be"),
        (Settings(guidance_scale=31.0), "guidance=31.0 must be"),
        (Settings(guidance_scale=float("nan")), "guidance=nan must be"),
        (Settings(seed=-1), "seed=-1 must be"),
        (Settings(batch_size=9), "batch size=9 must be"),
        (Settings(sampler="magic"), "sampler='magic' is not one of"),
    ],
)
def test_out_of_range_settings_are_refused_with_the_value(settings: Settings, message: str) -> None:
    assert message in (settings_problem(settings) or "")


def test_good_settings_pass() -> None:
    assert settings_problem(Settings(steps=1, guidance_scale=0.0)) is None
    assert settings_problem(Settings(steps=1000, guidance_scale=30.0, batch_size=8, sampler="dpm")) is None


def test_a_checkpoint_that_fails_to_load_is_reported_not_raised(tmp_path: Path) -> None:
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"not a checkpoint")
    model = _loaded(broken)
    assert model.denoiser is None and "not a checkpoint" in model.status()
    assert model.status().startswith(f"**Could not load {broken}**")


def test_without_gradio_demo_true_says_what_to_install(text_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'lightdiff\[demo\]'"):
        sample_run(_demo_config(text_ckpt))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def served(text_ckpt: Path):
    """The page of the text model on a free loopback port: (its URL, its DemoModel)."""
    cfg = _demo_config(text_ckpt, "prompt='a red circle'")
    model = DemoModel(cfg)
    app = build_app(cfg, model)
    app.queue(default_concurrency_limit=1)
    port = _free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/", model
    finally:
        app.close()


def test_a_page_whose_checkpoint_fails_to_load_shows_the_error(tmp_path: Path) -> None:
    """The page still comes up, its status naming the file and the error, and Generate refuses with that error."""
    from gradio_client import Client

    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"not a checkpoint")
    cfg = _demo_config(broken)
    app = build_app(cfg)
    app.queue(default_concurrency_limit=1)
    port = _free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        status = client.predict(fn_index=0)[0]  # what the page's load event shows
        assert status.startswith(f"**Could not load {broken}**") and "not a checkpoint" in status
        with pytest.raises(Exception, match="not a checkpoint"):
            client.predict("a red circle", "", None, 3, 4.0, 0, "auto", 1, False, fn_index=1)
    finally:
        app.close()


def test_two_visitors_are_served_in_turn(served, monkeypatch: pytest.MonkeyPatch) -> None:
    from gradio_client import Client

    url, model = served
    assert model.ready.wait(120) and model.error is None
    spans: list[tuple[float, float]] = []
    draw = model.draw

    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return draw(*args, **kwargs)
        finally:
            spans.append((started, time.perf_counter()))

    monkeypatch.setattr(model, "draw", timed)
    results: list[object] = []

    def visit(seed: int) -> None:
        client = Client(url, verbose=False)
        results.append(client.predict("a red circle", "", None, 3, 4.0, seed, "auto", 1, False, fn_index=1))

    visitors = [threading.Thread(target=visit, args=(seed,)) for seed in (1, 2)]
    for visitor in visitors:
        visitor.start()
    for visitor in visitors:
        visitor.join(120)
    assert len(results) == 2 and len(spans) == 2
    (first_start, first_end), (second_start, second_end) = sorted(spans)
    assert second_start >= first_end  # in turn, never at once on one model


def _chromium() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip("needs the system's chromium and chromedriver (apt-get install chromium chromium-driver)")
    return browser, driver


@pytest.mark.slow  # a real browser
def test_the_page_in_a_real_browser_draws_sample_pys_pixels(served, tmp_path: Path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    url, model = served
    browser, driver_path = _chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1100"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)  # the system's driver, no download
    wait = WebDriverWait(driver, 120)
    try:
        driver.get(url)
        wait.until(expected_conditions.text_to_be_present_in_element((By.ID, "status"), "Loaded"))
        prompt = wait.until(expected_conditions.visibility_of_element_located((By.CSS_SELECTOR, "#prompt textarea")))
        prompt.clear()
        prompt.send_keys("a blue square")
        steps = driver.find_element(By.CSS_SELECTOR, "#steps input")
        steps.clear()
        steps.send_keys("3")
        driver.find_element(By.ID, "generate").click()
        image = wait.until(expected_conditions.visibility_of_element_located((By.CSS_SELECTOR, "#gallery img")))
        wait.until(lambda _: driver.find_element(By.CSS_SELECTOR, "#command textarea").get_attribute("value"))
        command = driver.find_element(By.CSS_SELECTOR, "#command textarea").get_attribute("value")
        assert "a blue square" in command and "steps=3" in command
        with urllib.request.urlopen(image.get_attribute("src")) as response:
            shown = np.asarray(Image.open(response).convert("RGB"))
        written = _sample_py(command, tmp_path / "again")
        assert np.array_equal(shown, written[0])
        driver.save_screenshot(str(tmp_path / "page.png"))

        steps.clear()
        steps.send_keys("0")
        driver.find_element(By.ID, "generate").click()
        wait.until(expected_conditions.text_to_be_present_in_element((By.TAG_NAME, "body"), "steps=0 must be"))
    finally:
        driver.quit()


TRICKY = ['blue, "dark" = 1 \\ true', 'a\\"b', "end\\", '\\\\"', "", "true", "12", "it's", "${x}"]


@pytest.mark.parametrize("text", TRICKY)
def test_the_command_carries_any_prompt_exactly(text: str) -> None:
    """Hydra reads each value of the shown command back as it was (quotes, backslashes, '=', commas, words it would
    parse as other types, interpolations)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from lightdiff.demo import sample_command

    ckpt = "/runs/a b/last.ckpt"
    cfg = OmegaConf.create({"ckpt": ckpt, "use_ema": True, "speed": {}, "lora": None, "device": "auto"})
    command = sample_command(cfg, Settings(prompt=text, negative_prompt=text), True, False, True)
    parser = OverridesParser.create()
    overrides = [parser.parse_override(word) for word in shlex.split(command)[2:]]
    parsed = {override.key_or_group: override.value() for override in overrides}
    assert parsed["prompt"] == parsed["negative_prompt"] == text and parsed["ckpt"] == ckpt


def test_the_http_api_names_every_bad_value(served) -> None:
    """Any client can post anything: a value the page's widgets would never send is refused by name, not with a raw
    exception (which reaches the client as {"error": null})."""
    from gradio_client import Client

    url, model = served
    assert model.ready.wait(120) and model.error is None
    client = Client(url, verbose=False)
    for steps, seed, named in (
        ("abc", 0, "steps='abc' must be"),
        (3, 2**70, "seed=1180591620717411303424"),
        (3, "x", "seed='x'"),
    ):
        with pytest.raises(Exception, match=named):
            client.predict("a red circle", "", None, steps, 4.0, seed, "auto", 1, False, fn_index=1)
    assert client.predict("a red circle", "", None, "3", 4.0, "5", "auto", 1, False, fn_index=1)  # numbers as text


def test_the_demos_temporary_folder_goes_with_it(text_ckpt: Path, tmp_path: Path, monkeypatch) -> None:
    import subprocess
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = tmp_path / f"lightdiff-demo-{dead.pid}-abc"  # a killed demo's
    left.mkdir()
    model = DemoModel(_demo_config(text_ckpt))
    assert model.out.is_dir() and model.out.parent == tmp_path and not left.exists()
    model.close()  # registered with atexit: what happens when the demo exits
    assert not model.out.exists()
