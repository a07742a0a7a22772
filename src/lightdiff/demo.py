"""A live demo page for a trained model: `python sample.py ckpt=PATH demo=true` (Gradio, bound to 127.0.0.1:7860).

The page draws through sample.py's own `Drawing`, so an image on it is pixel for pixel the image `sample.py` writes for
the same settings; beside each batch is the one `sample.py` command that writes it again, and the images download as
PNG files carrying their metadata.jsonl record. The model loads in the background at start while the page shows its
status (or the error, if it fails to load). One model serves one drawing at a time: Gradio's queue takes the
requests of every open page in turn. A few-step student regenerates as its prompt is typed (`demo.live`); with its
teacher (recorded in the checkpoint, or `demo.teacher`), a side-by-side mode draws the teacher at `demo.teacher_steps`
for the same seed.

Gradio is an optional extra (`pip install "lightdiff[demo]"`), imported only here.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import math
import re
import shlex
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from PIL import Image, PngImagePlugin

from lightdiff.config import ConfigError, build
from lightdiff.drawing import Drawing, apply_speed, device_named, load_for_sampling
from lightdiff.files import owned_prefix, remove_stale_folders
from lightdiff.nets.families.base import ReadsLabels
from lightdiff.sampling import seed_problem, to_uint8
from lightdiff.speed import SamplingSpeed
from lightdiff.trained import TrainedDenoiser, load_trained

log = logging.getLogger(__name__)

MAX_STEPS = 1000  # a DDPM schedule's length: more steps than timesteps are not steps
GUIDANCE_RANGE = (0.0, 30.0)  # 1 turns guidance off; past 30 images saturate whatever the model
MAX_BATCH = 8
KEPT_BATCHES = 64  # the newest batches' files kept in the page's temporary folder
# Samplers the page offers besides the checkpoint's own ("auto"): conf/sampler/NAME.yaml, where the repository is.
SAMPLER_NAMES = ("ddim", "dpm", "euler", "ddpm", "flow_euler")
SAMPLER_FOLDER = Path(__file__).resolve().parents[2] / "conf" / "sampler"
PNG_METADATA_KEY = "lightdiff"  # the PNG text chunk holding an image's metadata.jsonl record and its command
PLAIN_VALUE = re.compile(r"[A-Za-z_/.][\w./:+-]*")  # a string Hydra reads back as itself unquoted


def gradio() -> Any:
    """The gradio module, or a ConfigError saying how to install it."""
    try:
        import gradio as gr
    except ImportError as error:
        raise ConfigError(
            f"demo=true needs Gradio, an optional extra: pip install 'lightdiff[demo]' ({error})"
        ) from error
    return gr


@dataclass
class Settings:
    """What the page asks for: one batch of `batch_size` images from seeds seed .. seed + batch_size - 1."""

    prompt: str | None = None  # text models only
    negative_prompt: str = ""
    label: int | None = None
    steps: int = 50
    guidance_scale: float = 4.0
    seed: int = 0
    sampler: str = "auto"
    batch_size: int = 1

    def sample_values(self) -> dict[str, object]:
        """These settings as sample.py's keys: what the drawing is made with and the shown command carries."""
        return {
            "seed": self.seed,
            "num_images": self.batch_size,
            "batch_size": self.batch_size,
            "steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "label": self.label,
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
        }


def settings_problem(settings: Settings) -> str | None:
    """Why the page refuses `settings` (a message naming the value), or None."""
    if not isinstance(settings.steps, int) or isinstance(settings.steps, bool) or not 1 <= settings.steps <= MAX_STEPS:
        return f"steps={settings.steps!r} must be a whole number from 1 to {MAX_STEPS}"
    low, high = GUIDANCE_RANGE
    scale = settings.guidance_scale
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        return f"guidance={scale!r} must be a number between {low:g} and {high:g} (1 turns guidance off)"
    if not low <= scale <= high:
        return f"guidance={settings.guidance_scale} must be between {low:g} and {high:g} (1 turns guidance off)"
    if not isinstance(settings.batch_size, int) or not 1 <= settings.batch_size <= MAX_BATCH:
        return f"batch size={settings.batch_size!r} must be from 1 to {MAX_BATCH}"
    if problem := seed_problem(settings.seed, settings.batch_size):
        return problem
    if settings.sampler != "auto" and settings.sampler not in SAMPLER_NAMES:
        return f"sampler={settings.sampler!r} is not one of auto, {', '.join(SAMPLER_NAMES)}"
    return None


def whole_number(value: Any) -> Any:
    """A page or HTTP API value as an int where it is one (7, 7.0, "7"); anything else as it came, for
    `settings_problem` to name (a float like 2.0**70 is not trusted to be the integer that was typed)."""
    if isinstance(value, int):  # bool included: refused by name later
        return value
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return value
    return value


def as_number(value: Any) -> Any:
    """A page or HTTP API value as a float where it is a number ("4.5" too); anything else as it came."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def request_config(cfg: DictConfig, settings: Settings) -> DictConfig:
    """sample.py's config for `settings`: the page's values over the command line's."""
    request = OmegaConf.to_container(cfg, resolve=True)
    request.update(settings.sample_values(), prompts_file=None)
    if settings.sampler != "auto":
        path = SAMPLER_FOLDER / f"{settings.sampler}.yaml"
        if not path.is_file():
            raise ConfigError(f"sampler={settings.sampler!r}: {path} is not there (a repository checkout has it)")
        request["sampler"] = OmegaConf.to_container(OmegaConf.load(path))
    return OmegaConf.create(request)


def sample_command(
    cfg: DictConfig, settings: Settings, takes_text: bool, takes_label: bool, guided: bool, teacher: str | None = None
) -> str:
    """The `python sample.py` command that writes the page's batch again (image k is its file 00000k.png); with
    `teacher`, the teacher's batch (the teacher as it is: without the student's LoRA or speed path)."""
    values: dict[str, object] = {"ckpt": teacher or cfg.ckpt}
    own = ("height", "width", "device") if teacher else ("lora", "lora_scale", "height", "width", "device")
    for key in own:
        if cfg.get(key) not in (None, 1.0, "auto"):
            values[key] = cfg[key]
    if not cfg.use_ema:
        values["use_ema"] = False
    # the keys this model reads (a prompt given to a class model is an error in sample.py, guidance is unused)
    shown = ["seed", "num_images", "batch_size", "steps"] + ["guidance_scale"] * guided
    shown += ["label"] * (takes_label and settings.label is not None) + ["prompt", "negative_prompt"] * takes_text
    values.update({key: value for key, value in settings.sample_values().items() if key in shown})
    values["sampler"] = settings.sampler
    defaults = {item.name: item.default for item in dataclasses.fields(SamplingSpeed)}
    for key, value in OmegaConf.to_container(cfg.speed).items():  # the speed path's settings, where not the default
        if key in defaults and value != defaults[key] and teacher is None:
            values[f"speed.{key}"] = value

    def hydra_value(value: object) -> str:
        # a string Hydra would not read back as itself (spaces, '=', commas, quotes, '' or 'true') is quoted for
        # Hydra, and then the whole key=value for the shell
        if isinstance(value, str) and (not PLAIN_VALUE.fullmatch(value) or value.lower() in ("true", "false", "null")):
            # Hydra's quoted strings: a backslash is literal unless a run of them precedes a quote (or the closing
            # quote), where the run is halved; so such runs are doubled and each quote escaped
            escaped = re.sub(r'(\\*)"', lambda run: run.group(1) * 2 + '\\"', value)
            return '"' + re.sub(r"(\\+)$", lambda run: run.group(1) * 2, escaped) + '"'
        if isinstance(value, bool):
            return str(value).lower()
        return str(value)

    return "python sample.py " + " ".join(shlex.quote(f"{key}={hydra_value(value)}") for key, value in values.items())


@dataclass
class Drawn:
    """One batch drawn for the page: PNG files (with their records), their time, and the command."""

    files: list[Path]
    captions: list[str]
    seconds_per_image: float
    records: list[dict[str, object]] = field(default_factory=list)


DEMO_FOLDER_PREFIX = "lightdiff-demo-"  # then the demo's pid: a killed demo's folder is recognised and removed


class DemoModel:
    """The model behind the page (and a student's teacher), loaded in the background; `draw` serves one request at a
    time (the lock: Gradio's queue already does, the lock keeps it so for any caller)."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.ready = threading.Event()
        self.error: str | None = None
        self.denoiser: TrainedDenoiser | None = None
        self.teacher: TrainedDenoiser | None = None
        self.teacher_source: str | None = None
        self.device = device_named(cfg.device)
        self.load_seconds = 0.0
        self.speed = SamplingSpeed()  # the plain path until `load` builds cfg.speed
        self.lock = threading.Lock()
        # The page's batches, in the system's temporary folder: removed when the demo exits (`close`), and the
        # folders of demos that were killed are removed here.
        remove_stale_folders(Path(tempfile.gettempdir()), DEMO_FOLDER_PREFIX)
        self.out = Path(tempfile.mkdtemp(prefix=owned_prefix(DEMO_FOLDER_PREFIX)))
        atexit.register(self.close)

    def close(self) -> None:
        """Remove the page's temporary folder."""
        shutil.rmtree(self.out, ignore_errors=True)

    def load(self) -> None:
        started = time.perf_counter()
        try:
            denoiser = load_for_sampling(self.cfg)
            if not isinstance(denoiser, TrainedDenoiser):
                raise ConfigError(f"ckpt={self.cfg.ckpt!r} is an autoencoder: it draws nothing")
            self.denoiser = denoiser
            self.speed = build(self.cfg.speed)
            if not self.speed.is_plain:  # switched on once, checked against the plain path on the page's defaults
                apply_speed(self.speed, Drawing(self._check_config(), denoiser, self.device, 1), 1)
            self.teacher_source = self.cfg.demo.teacher or denoiser.teacher
            if self.teacher_source:
                teacher = load_trained(self.teacher_source, use_ema=self.cfg.use_ema)
                if not isinstance(teacher, TrainedDenoiser):
                    raise ConfigError(f"demo.teacher={self.teacher_source!r} is an autoencoder, not a teacher")
                self.teacher = teacher
        except Exception as error:  # noqa: BLE001 - whatever failed is shown on the page, not a dead app
            log.exception("the demo's model failed to load")
            self.error = f"{type(error).__name__}: {error}"
        finally:
            self.load_seconds = time.perf_counter() - started
            self.ready.set()

    def _check_config(self) -> DictConfig:
        assert self.denoiser is not None
        settings = self.default_settings()
        if self.takes_text and not settings.prompt:
            settings.prompt = "a picture"
        return request_config(self.cfg, settings)

    @property
    def takes_text(self) -> bool:
        return self.denoiser is not None and "text" in self.denoiser.conditioning.reads

    @property
    def guided(self) -> bool:
        """Whether sample.py applies classifier-free guidance to this model (text and image-to-video models)."""
        reads = self.denoiser.conditioning.reads if self.denoiser is not None else ()
        return "text" in reads or "image" in reads

    @property
    def class_choices(self) -> list[tuple[str, int]]:
        """(name, label) of each class of a class-conditional model; empty for others."""
        if self.denoiser is None or "label" not in self.denoiser.conditioning.reads:
            return []
        names = self.denoiser.class_names
        conditioning = self.denoiser.conditioning
        count = (conditioning.num_classes if isinstance(conditioning, ReadsLabels) else 0) or len(names or [])
        return [(names[k] if names else f"class {k}", k) for k in range(count)]

    @property
    def live_default(self) -> bool:
        """Regenerate as the prompt is typed: `demo.live`, or (null) for a few-step student."""
        if self.cfg.demo.live is not None:
            return bool(self.cfg.demo.live)
        return self.denoiser is not None and (self.denoiser.student_steps or 99) <= 4

    def default_settings(self) -> Settings:
        assert self.denoiser is not None
        steps = self.denoiser.student_steps or self.cfg.steps
        prompt = (str(self.cfg.prompt) if self.cfg.prompt is not None else "") if self.takes_text else None
        label = self.class_choices[0][1] if self.class_choices else None
        return Settings(
            prompt=prompt,
            negative_prompt=str(self.cfg.negative_prompt),
            label=int(self.cfg.label) if self.cfg.label is not None and label is not None else label,
            steps=int(steps),
            guidance_scale=float(self.cfg.guidance_scale),
            seed=int(self.cfg.seed),
        )

    def status(self) -> str:
        if not self.ready.is_set():
            return f"Loading {self.cfg.ckpt} ..."
        if self.error is not None:
            return f"**Could not load {self.cfg.ckpt}**: {self.error}"
        assert self.denoiser is not None
        parameters = sum(p.numel() for p in self.denoiser.net.parameters()) / 1e6
        kind = "text" if self.takes_text else "class" if self.class_choices else "unconditional"
        text = (
            f"Loaded {self.denoiser.source}: {type(self.denoiser.net).__name__} ({parameters:.1f} M parameters), "
            f"{kind} model, on {self.device} in {self.load_seconds:.1f} s"
        )
        if self.teacher is not None:
            text += f"; teacher {self.teacher_source} for the side-by-side mode"
        return text

    def draw(self, settings: Settings, teacher: bool = False) -> Drawn:
        """A batch for `settings` (the teacher at demo.teacher_steps and its own sampler with `teacher`)."""
        denoiser = self.teacher if teacher else self.denoiser
        if denoiser is None:
            raise ConfigError(self.error or "the model is still loading")
        if teacher:
            settings = Settings(**{**settings.__dict__, "steps": int(self.cfg.demo.teacher_steps), "sampler": "auto"})
        cfg = request_config(self.cfg, settings)
        if teacher:  # the student's LoRA is not the teacher's
            cfg = OmegaConf.merge(cfg, {"lora": None, "lora_scale": 1.0})
        with self.lock:
            drawing = Drawing(cfg, denoiser, self.device, settings.batch_size)
            if not self.speed.is_plain and not teacher:  # the student's switches, recorded as sample.py records them
                drawing.sampler_settings["speed"] = dataclasses.asdict(self.speed)
            started = time.perf_counter()
            pixels = to_uint8(drawing.draw(0, settings.batch_size))
            seconds = (time.perf_counter() - started) / settings.batch_size
        folder = Path(tempfile.mkdtemp(dir=self.out))
        # Gradio serves copies from its own cache, so only the newest batches are kept here (a live page draws one a
        # keystroke)
        for old in sorted(self.out.iterdir(), key=lambda path: path.stat().st_mtime)[:-KEPT_BATCHES]:
            shutil.rmtree(old, ignore_errors=True)
        takes_text, takes_label = drawing.prompts is not None, drawing.labels is not None
        guided = takes_text or drawing.first_frame is not None
        teacher_source = self.teacher_source if teacher else None
        command = sample_command(self.cfg, settings, takes_text, takes_label, guided, teacher_source)
        drawn = Drawn([], [], seconds)
        for index, image in enumerate(pixels):
            file_name = f"{index:06d}.png"
            record = {**drawing.record(index, file_name), "command": command}
            info = PngImagePlugin.PngInfo()
            info.add_text(PNG_METADATA_KEY, json.dumps(record))
            Image.fromarray(image).save(folder / file_name, pnginfo=info)
            drawn.files.append(folder / file_name)
            drawn.captions.append(f"seed {settings.seed + index} · {seconds:.2f} s per image")
            drawn.records.append(record)
        with (folder / "metadata.jsonl").open("w") as metadata:
            metadata.writelines(json.dumps(record) + "\n" for record in drawn.records)
        return drawn


def _lenient(field: Any) -> Any:
    """`field` (a gr.Number, gr.Slider) whose preprocess hands a value that is not a number to the handler as it came,
    where `settings_problem` refuses it by name: the component's own conversion fails with an error Gradio does not
    show, so an HTTP client posting steps="abc" got {"error": null}. The page's widgets never send such values. (On the
    instance: a subclass of a Gradio component makes Gradio write a .pyi stub beside this module.)"""
    convert = field.preprocess

    def preprocess(payload: Any) -> Any:
        if payload is None or (isinstance(payload, (int, float)) and not isinstance(payload, bool)):
            return convert(payload)
        return payload

    field.preprocess = preprocess
    return field


def build_app(cfg: DictConfig, model: DemoModel | None = None) -> Any:
    """The page (a gr.Blocks) for `cfg`'s checkpoint; the model loads in a background thread started here."""
    gr = gradio()
    model = model or DemoModel(cfg)
    threading.Thread(target=model.load, name="demo-model-load", daemon=True).start()
    sampler_choices = ["auto", *[name for name in SAMPLER_NAMES if (SAMPLER_FOLDER / f"{name}.yaml").is_file()]]

    with gr.Blocks(title="lightdiff demo") as app:
        gr.Markdown(f"## lightdiff · `{cfg.ckpt}`")
        status = gr.Markdown(model.status(), elem_id="status")
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="Prompt", lines=2, visible=False, elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", visible=False, elem_id="negative")
                label = gr.Dropdown(label="Class", choices=[], visible=False, elem_id="label")
                with gr.Row():
                    steps = _lenient(gr.Number(label="Steps", value=cfg.steps, precision=0, elem_id="steps"))
                    guidance = _lenient(gr.Number(label="Guidance", value=cfg.guidance_scale, elem_id="guidance"))
                    seed = _lenient(gr.Number(label="Seed", value=cfg.seed, precision=0, elem_id="seed"))
                with gr.Row():
                    sampler = gr.Dropdown(label="Sampler", choices=sampler_choices, value="auto", elem_id="sampler")
                    batch = _lenient(gr.Slider(1, MAX_BATCH, value=1, step=1, label="Batch size", elem_id="batch"))
                with gr.Row():
                    live = gr.Checkbox(label="Live: regenerate as the prompt is typed", value=False, elem_id="live")
                    compare = gr.Checkbox(label="Side by side with the teacher", visible=False, elem_id="compare")
                run = gr.Button("Generate", variant="primary", interactive=False, elem_id="generate")
            with gr.Column(scale=3):
                gallery = gr.Gallery(label="Images", columns=4, elem_id="gallery")
                info = gr.Markdown(elem_id="info")
                teacher_gallery = gr.Gallery(label="Teacher", columns=4, visible=False, elem_id="teacher-gallery")
                teacher_info = gr.Markdown(visible=False, elem_id="teacher-info")
                command = gr.Textbox(label="Draw them again with", interactive=False, elem_id="command")
                files = gr.File(label="Download (PNG with its settings, metadata.jsonl)", file_count="multiple")

        def loaded() -> tuple:
            model.ready.wait()
            if model.error is not None or model.denoiser is None:
                return (model.status(), *[gr.update()] * 8)
            defaults = model.default_settings()
            choices = model.class_choices
            return (
                model.status(),
                gr.update(visible=model.takes_text, value=defaults.prompt),
                gr.update(visible=model.takes_text, value=defaults.negative_prompt),
                gr.update(visible=bool(choices), choices=choices, value=defaults.label),
                gr.update(value=defaults.steps),
                gr.update(visible=model.guided),  # guidance only where sample.py applies it
                gr.update(visible=model.teacher is not None),
                gr.update(visible=model.takes_text, value=model.live_default),
                gr.update(interactive=True),
            )

        app.load(
            loaded,
            outputs=[status, prompt, negative, label, steps, guidance, compare, live, run],
            concurrency_limit=None,  # waiting for the model must not hold a drawing slot
        )

        def generate(*values: Any) -> tuple:
            text, negative_text, class_label, step_count, scale, seed_value, sampler_name, size, side_by_side = values
            if not model.ready.is_set() or model.denoiser is None:
                raise gr.Error(model.error or "the model is still loading")
            # The HTTP API passes whatever a client sends: every value is parsed here and refused by name, never
            # left to raise inside the drawing (an unnamed error reaches the client as {"error": null}).
            label_value = whole_number(class_label) if class_label is not None and model.class_choices else None
            if label_value is not None and not isinstance(label_value, int):
                raise gr.Error(f"label={class_label!r} must be a class number")
            settings = Settings(
                prompt=(str(text) if text is not None else "") if model.takes_text else None,
                negative_prompt=str(negative_text or ""),
                label=label_value,
                steps=whole_number(step_count),
                guidance_scale=as_number(scale) if scale is not None else math.nan,
                seed=whole_number(seed_value),
                sampler=str(sampler_name or "auto"),
                batch_size=whole_number(size),
            )
            problem = settings_problem(settings)
            if problem is not None:
                raise gr.Error(problem)
            if settings.prompt is not None and not settings.prompt.strip():
                raise gr.Error("type a prompt")
            try:
                drawn = model.draw(settings)
                teacher_drawn = model.draw(settings, teacher=True) if side_by_side and model.teacher else None
            except ConfigError as error:
                raise gr.Error(str(error)) from error
            student_note = f"{settings.steps} steps: {drawn.seconds_per_image:.2f} s per image"
            teacher_updates = (gr.update(visible=False), gr.update(visible=False))
            if teacher_drawn is not None:
                teacher_updates = (
                    gr.update(visible=True, value=list(zip(map(str, teacher_drawn.files), teacher_drawn.captions))),
                    gr.update(
                        visible=True,
                        value=f"teacher, {cfg.demo.teacher_steps} steps: {teacher_drawn.seconds_per_image:.2f} s "
                        f"per image ({teacher_drawn.seconds_per_image / drawn.seconds_per_image:.1f}x the student's)",
                    ),
                )
            return (
                list(zip(map(str, drawn.files), drawn.captions)),
                student_note,
                *teacher_updates,
                str(drawn.records[0]["command"]),
                [str(path) for path in drawn.files] + [str(drawn.files[0].parent / "metadata.jsonl")],
            )

        inputs = [prompt, negative, label, steps, guidance, seed, sampler, batch, compare]
        outputs = [gallery, info, teacher_gallery, teacher_info, command, files]
        # one drawing at a time for every open page (concurrency_id: the button and live typing share the slot)
        run.click(generate, inputs, outputs, concurrency_limit=1, concurrency_id="model")

        def generate_live(*values: Any) -> tuple:
            if not values[-1]:  # live off: leave the page as it is
                return tuple(gr.skip() for _ in outputs)
            return generate(*values[:-1])

        # typing: only the newest prompt is drawn once the running drawing ends (no pile-up of keystrokes)
        prompt.input(
            generate_live,
            [*inputs, live],
            outputs,
            trigger_mode="always_last",
            concurrency_limit=1,
            concurrency_id="model",
            show_progress="hidden",
        )
    return app


def serve(cfg: DictConfig) -> None:
    """Start the page and block until it is stopped (Ctrl-C)."""
    app = build_app(cfg)
    app.queue(default_concurrency_limit=1)
    log.info("demo of %s on http://%s:%d", cfg.ckpt, cfg.demo.host, cfg.demo.port)
    app.launch(server_name=cfg.demo.host, server_port=int(cfg.demo.port), share=bool(cfg.demo.share))
