"""The web demo behind ``clip-surgery demo``: a Gradio page over the library's own calls.

Every number and picture comes from ``model.explain``, ``Explanation.maps_at``, ``viz.overlay``
and ``points_from_map``, written with the command line's own naming and report
(``outputs``), so the page, its ``/explain`` API endpoint and ``clip-surgery explain`` agree.
Imported only by that command (and ``app.py``): it needs the ``[demo]`` extra.
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import json
import os
import shutil
import signal
import tempfile
import threading
import time
import typing
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from . import catalog, methods
from .errors import ClipSurgeryError, ImageError, OptionError, TextError
from .images import open_image
from .model import Explanation, SurgeryModel
from .outputs import REPORT, image_folders, image_record, report, text_files, write_json
from .points import points_from_map
from .tasks.sam import TextMask, mask_overlay
from .viz import overlay, save_grid_pages, save_png

DEMO_MAX_PIXELS = 25_000_000
"""Largest image the demo accepts unless ``--max-pixels`` says otherwise."""

DEMO_MAX_INPUT_SIDE = 1024
"""Largest model input side a request may ask for (the CLI's limit is 2048)."""

MODES = ("class set", "free-form")
OPTION_SEPARATOR = "__"  # API keyword of a method option: <method>__<option>
CSS = "#scores td:first-child { white-space: nowrap; }"
KEEP_REQUESTS = 16  # finished request folders kept for Gradio to copy from (at least)

SCORE_MEANING = """\
**What the numbers mean**

| field | meaning |
| --- | --- |
| cosine | cosine of the method's image embedding with the text. For `raw`, `clip_surgery`, \
`gradcam` and `chefer` that embedding is CLIP's own; for `maskclip`, `sclip`, `clearclip` and \
`naclip` it is the CLS token after the modified last block; for `gem`, the CLS token of its own \
path |
| probability | softmax over the given texts of `logit_scale x cosine` (CLIP's zero-shot \
probability when the embedding is CLIP's own); it compares the texts with each other, so one \
text always gets 1.0 |
| maps | per text, min-max over the patches: where the text is, relative to the rest of the \
image, not how likely it is |
"""

_MODEL_LOCK = threading.Lock()  # one forward at a time; the model is shared by all requests
_PLOT_LOCK = threading.Lock()  # matplotlib's pyplot is not thread-safe (the grid figures)


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server."""

    max_texts: int = 16
    max_pixels: int = DEMO_MAX_PIXELS
    max_upload_bytes: int = 10 * 1024 * 1024
    max_side: int | None = 2048  # images are reduced to this while decoding (None: full size)
    concurrency: int = 1
    queue_size: int = 32

    def check(self) -> Limits:
        """Self, or OptionError naming the first limit that is not positive."""
        for name in ("max_texts", "max_pixels", "max_upload_bytes", "concurrency", "queue_size"):
            if getattr(self, name) <= 0:
                raise OptionError(f"--{name.replace('_', '-')} must be positive")
        return self


@dataclass
class Answer:
    """What one request shows: captioned overlays, scores, point prompts, files, report."""

    overlays: list[tuple[str, str]] = field(default_factory=list)
    points: list[tuple[str, str]] = field(default_factory=list)
    scores: str = ""
    files: list[str] = field(default_factory=list)
    report: str = ""
    columns: int = 1  # gallery columns: the methods side by side (one method: the texts)


# ------------------------------------------------------------------ input checks


def parse_texts(text: str | None, max_texts: int) -> list[str]:
    """Texts separated by commas or new lines, stripped; TextError when none or too many."""
    items = [part.strip() for line in (text or "").splitlines() for part in line.split(",")]
    texts = [item for item in items if item]
    if not texts:
        raise TextError("no text given: type one or more texts, separated by commas or lines")
    if len(texts) > max_texts:
        raise TextError(f"{len(texts)} texts given; this demo takes at most {max_texts}")
    return texts


def read_upload(path: str | None, limits: Limits) -> tuple[Image.Image, str]:
    """The uploaded image, read as the command line reads it, and its file name."""
    if not path:
        raise ImageError("no image: upload one or pick an example")
    name = Path(path).name
    width, height = _image_size(Path(path), name)
    if width * height > limits.max_pixels:
        raise ImageError(
            f"{name} is {width} x {height} = {width * height:,} pixels; this demo accepts "
            f"images of at most {limits.max_pixels:,} pixels"
        )
    try:
        return open_image(path, limits.max_side), name
    except ClipSurgeryError as error:
        raise type(error)(str(error).replace(str(path), name)) from None


def _image_size(path: Path, name: str) -> tuple[int, int]:
    """Width and height from the file's header (nothing decoded); ImageError if not an image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return image.size
    except Image.DecompressionBombError:
        raise ImageError(f"{name} has too many pixels for this demo") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        raise ImageError(
            f"{name} is not an image this demo can read (PNG, JPEG, WebP, GIF, BMP, TIFF)"
        ) from None


def check_size(size: float | None) -> int | None:
    """The model input side a request asks for: None (the model's own) or 1..1024 pixels."""
    if size is None or size == 0:
        return None
    if size != int(size) or not 0 < size <= DEMO_MAX_INPUT_SIDE:
        raise OptionError(f"input size must be 0 (the model's own) or 1 to {DEMO_MAX_INPUT_SIDE}")
    return int(size)


def check_methods(chosen: Sequence[str] | None, available: Sequence[str]) -> list[str]:
    """The chosen methods in listing order; OptionError for none or one this model lacks."""
    chosen = list(chosen or [])
    if not chosen:
        raise OptionError("no method chosen: pick at least one")
    unknown = [name for name in chosen if name not in available]
    if unknown:
        raise OptionError(
            f"method {unknown[0]!r} is not available for this model; "
            f"available: {', '.join(available)}"
        )
    return [name for name in available if name in chosen]


def check_mode(mode: str | None) -> bool:
    """True for free-form queries, False for a class set; OptionError otherwise."""
    if mode not in MODES:
        raise OptionError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    return mode == "free-form"


# ------------------------------------------------------------------ method options


@dataclass(frozen=True)
class OptionField:
    """One method option as the page shows it: its key, default and kind (or choices)."""

    method: str
    key: str
    default: Any
    kind: str  # "bool", "int", "float", "choice", or "text" (an optional number: empty is None)
    choices: tuple[str, ...] = ()

    @property
    def keyword(self) -> str:
        """Its keyword in the ``/explain`` API: ``<method>__<key>``."""
        return f"{self.method}{OPTION_SEPARATOR}{self.key}"


@cache
def listing() -> dict[str, dict]:
    """The shipped catalog's methods by name (summary, families, options and defaults)."""
    return {item["name"]: item for item in catalog.read()["methods"]}


@cache
def option_fields(method: str) -> tuple[OptionField, ...]:
    """A method's options but depth (one control for all): the catalog's defaults, the
    registry's types."""
    hints = typing.get_type_hints(methods.get(method).Options)
    return tuple(
        _field(method, key, default, hints[key])
        for key, default in listing()[method]["options"].items()
        if key != "depth"
    )


def _field(method: str, key: str, default: Any, hint: Any) -> OptionField:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return OptionField(method, key, default, "choice", tuple(str(a) for a in args))
    if args:  # Optional[X]: a text box, empty for None
        return OptionField(method, key, "" if default is None else str(default), "text")
    return OptionField(method, key, default, hint.__name__)


def method_options(method: str, depth: float | None, values: dict[str, Any]) -> dict[str, Any]:
    """A method's options from the page (``<method>__<key>`` values; None or empty: its
    default) and the shared depth, checked by the method itself (OptionError)."""
    keys = list(listing()[method]["options"])
    options = {}
    for keyword, value in values.items():
        owner, _, key = keyword.partition(OPTION_SEPARATOR)
        if owner != method or value is None or value == "":
            continue
        if key not in keys:
            raise OptionError(f"unknown option {key!r} for {method!r}; known: {', '.join(keys)}")
        options[key] = value
    if depth is not None and "depth" in keys:
        options["depth"] = depth
    methods.get(method).options(**options)
    return options


def check_option_keywords(values: dict[str, Any]) -> None:
    """OptionError for an option keyword that names no method's option."""
    known = {f.keyword for name in listing() for f in option_fields(name)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise OptionError(f"unknown option {unknown[0]!r}; options are <method>__<option>")


# ------------------------------------------------------------------ one request


class DemoSession:
    """The server's state: one model, the limits, and a folder of recent request outputs."""

    def __init__(self, model: SurgeryModel, limits: Limits, root: Path):
        self.model, self.limits, self.root = model, limits.check(), Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._counter = 0
        self._lock = threading.Lock()

    @property
    def methods(self) -> list[str]:
        """The methods that run on this model's family, in listing order."""
        family = self.model.family
        return [name for name, item in listing().items() if family in item["families"]]

    def explain(
        self,
        image: str | None,
        texts: str | None,
        chosen: Sequence[str] | None,
        mode: str | None,
        depth: float | None,
        size: float | None,
        options: dict[str, Any],
    ) -> Answer:
        """Run a request from the page: every check first, then each method; ClipSurgeryError
        (one line) for bad input."""
        words = parse_texts(texts, self.limits.max_texts)
        chosen = check_methods(chosen, self.methods)
        check_option_keywords(options)
        parsed = {name: method_options(name, depth, options) for name in chosen}
        single, side = check_mode(mode), check_size(size)
        picture, name = read_upload(image, self.limits)
        with _MODEL_LOCK:
            self.model.encode_text(words)  # text length errors before any output
        folder = self._new_folder()
        answer = Answer(columns=len(chosen) if len(chosen) > 1 else min(len(words), 4))
        runs = [self._run(picture, name, words, m, parsed[m], single, side, folder) for m in chosen]
        _fill(answer, runs, words, chosen)
        answer.files = _downloads(folder, chosen, Path(name).stem)
        return answer

    def _run(
        self, image, name: str, texts: list[str], method: str, options, single, size, folder
    ) -> dict:
        """One method: its overlays, grid, point prompts and explain.json under folder/method."""
        started = time.perf_counter()
        with _MODEL_LOCK:
            result = self.model.explain(
                image, texts, method=method, size=size, single=single, **options
            )
        out = folder / "maps" / method
        record = _write_image(image, name, texts, result, out)
        points = _write_points(image, texts, result, out / image_folders([name])[0] / "points")
        settings = {"size": size or self.model.native_size, "single": single}
        settings.update(dataclasses.asdict(result.options))
        mode = "free-form" if result.free_form else "class-set"
        seconds = round(time.perf_counter() - started, 3)
        summary = report(self.model, method, mode, settings, [record], seconds)
        write_json(out / REPORT, summary)
        return {"method": method, "root": out, "report": summary, "points": points}

    def _new_folder(self) -> Path:
        """A fresh folder for one request; the oldest beyond the kept number are removed."""
        with self._lock:
            self._counter += 1
            folder = self.root / f"request-{self._counter:06d}"
            folder.mkdir()
            keep = max(KEEP_REQUESTS, 4 * self.limits.concurrency)
            finished = sorted(self.root.glob("request-*"))[:-keep]
        for old in finished:
            shutil.rmtree(old, ignore_errors=True)
        return folder


def _write_image(image: Image.Image, name: str, texts: list[str], result: Explanation, out: Path):
    """The command line's files for one image: an overlay per text and the grid pages; its
    report entry with paths relative to the method's folder (as ``--out <method>``)."""
    folder_name, hw = image_folders([name])[0], (image.height, image.width)
    folder = out / folder_name
    overlays = [
        save_png(overlay(image, result.maps_at(hw, 0, [k])[0]), folder / file)
        for k, file in enumerate(text_files(texts))
    ]
    probs = result.probs[0]
    with _PLOT_LOCK:
        grids = save_grid_pages(image, result, 0, texts, probs.tolist(), folder)
    relative = [Path(p).relative_to(out.parent) for p in overlays]
    pages = [Path(p).relative_to(out.parent) for p in grids]
    return image_record(name, Path(out.name) / folder_name, texts, result.cosine[0], probs,
                        relative, pages)  # fmt: skip


def _write_points(image: Image.Image, texts: list[str], result: Explanation, folder: Path):
    """SAM point prompts (``points_from_map`` of each text's patch map) drawn on the image."""
    hw, paths = (image.height, image.width), []
    empty = np.zeros(hw, bool)
    for k, file in enumerate(text_files(texts)):
        grid_map = result.similarity[0, :, k].reshape(result.grid)
        points, labels = points_from_map(grid_map, hw)
        prompts = TextMask(texts[k], empty, 0.0, points, labels, None, [])
        paths.append((str(save_png(mask_overlay(image, prompts), folder / file)), points, labels))
    return paths


def _fill(answer: Answer, runs: list[dict], texts: list[str], chosen: list[str]) -> None:
    """Galleries ordered text by text with the methods side by side; scores; the report."""
    for k, text in enumerate(texts):
        for run in runs:
            item = run["report"]["images"][0]["texts"][k]
            caption = f"{text} · {run['method']}: p {item['probability']:.3f}, "
            caption += f"cos {item['cosine']:.3f}"
            answer.overlays.append((str(run["root"].parent / item["overlay"]), caption))
            path, points, labels = run["points"][k]
            positive = int(labels.sum())
            note = f"{text} · {run['method']}: {positive} + / {len(labels) - positive} - points"
            answer.points.append((path, note))
    answer.scores = _score_table(runs, texts)
    reports = {run["method"]: run["report"] for run in runs}
    answer.report = json.dumps(reports[chosen[0]] if len(chosen) == 1 else reports, indent=2)


def _score_table(runs: list[dict], texts: list[str]) -> str:
    """A Markdown table of every (text, method) score, then what the numbers mean."""
    header = "| text | " + " | ".join(f"{r['method']} cosine | probability" for r in runs)
    lines = [header + " |", "| --- |" + " --- | --- |" * len(runs)]
    for k, text in enumerate(texts):
        cells = []
        for run in runs:
            item = run["report"]["images"][0]["texts"][k]
            cells.append(f"{item['cosine']:.4f} | {item['probability']:.4f}")
        lines.append(f"| {_cell(text)} | " + " | ".join(cells) + " |")
    mode = runs[0]["report"]["mode"]
    return f"Mode: **{mode}**\n\n" + "\n".join(lines) + "\n\n" + SCORE_MEANING


def _cell(text: str) -> str:
    """A text made safe for a Markdown table cell (no HTML, no column breaks)."""
    return html.escape(text).replace("|", "\\|")


def _downloads(folder: Path, chosen: list[str], stem: str) -> list[str]:
    """A zip of every file (the command line's layout per method) and each explain.json."""
    archive = shutil.make_archive(str(folder / f"clip-surgery-{stem}"), "zip", folder / "maps")
    files = [archive]
    for method in chosen:
        report_path = folder / "maps" / method / REPORT
        if len(chosen) > 1:
            named = folder / f"explain-{method}.json"
            shutil.copyfile(report_path, named)
            report_path = named
        files.append(str(report_path))
    return files


# ------------------------------------------------------------------ the page


def _gradio():
    """gradio, with its telemetry and version check off (no outbound calls)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    import gradio

    return gradio


def build_app(session: DemoSession, examples: Path | None = None):
    """The Gradio page (``gr.Blocks``) over ``session``; its endpoint is ``/explain``."""
    gr = _gradio()

    with gr.Blocks(title="clip-surgery", analytics_enabled=False, delete_cache=(300, 900)) as app:
        gr.Markdown(_header(session))
        with gr.Row():
            with gr.Column(scale=1):
                inputs = _input_components(session)
                option_inputs = _option_components(session.methods)
                run = gr.Button("Explain", variant="primary", elem_id="run")
            with gr.Column(scale=2):
                outputs = _output_components()
        if examples is not None and _example_rows(examples):
            gr.Examples(
                _example_rows(examples), inputs=inputs[:2], cache_examples=False, elem_id="examples"
            )
        run.click(
            _handler(session),
            inputs=inputs,
            inputs_kwargs=option_inputs,
            outputs=outputs,
            api_name="explain",
            concurrency_limit=session.limits.concurrency,
        )
    return app


def _header(session: DemoSession) -> str:
    model, limits = session.model, session.limits
    size = model.native_size
    return (
        "# clip-surgery: where does CLIP see each text?\n"
        f"Model **{model.name}** ({model.family}, native input {size} px). Upload an image, type "
        "texts separated by commas or new lines, pick one or more methods and press Explain. "
        f"Limits: {limits.max_texts} texts, {limits.max_upload_bytes // (1024 * 1024)} MB "
        f"uploads, {limits.max_pixels:,} pixels."
    )


def _input_components(session: DemoSession) -> list:
    gr = _gradio()

    return [
        gr.File(label="Image", type="filepath", elem_id="image"),
        gr.Textbox(
            label="Texts (comma or newline separated)",
            lines=3,
            placeholder="cat, sofa, wall",
            elem_id="texts",
        ),
        gr.CheckboxGroup(
            session.methods, value=["clip_surgery"], label="Methods", elem_id="methods"
        ),
        gr.Radio(list(MODES), value=MODES[0], label="Texts are", elem_id="mode"),
        gr.Number(
            _default_depth(session.model),
            precision=0,
            label="depth (clip_surgery, gem)",
            elem_id="depth",
        ),
        gr.Number(0, precision=0, label="input side (0: the model's own)", elem_id="size"),
    ]


def _option_components(available: Sequence[str]) -> dict[str, Any]:
    """One control per method option, keyed by its API keyword."""
    gr = _gradio()

    controls = {}
    with gr.Accordion("Method options", open=False):
        for method in available:
            fields = option_fields(method)
            if not fields:
                continue
            gr.Markdown(f"**{method}**")
            with gr.Row():
                for item in fields:
                    controls[item.keyword] = _control(item)
    return controls


def _control(item: OptionField):
    gr = _gradio()

    label, elem_id = item.key, item.keyword
    if item.kind == "bool":
        return gr.Checkbox(value=item.default, label=label, elem_id=elem_id)
    if item.kind == "choice":
        return gr.Dropdown(list(item.choices), value=item.default, label=label, elem_id=elem_id)
    if item.kind == "text":
        return gr.Textbox(item.default, label=f"{label} (empty: none)", elem_id=elem_id)
    precision = 0 if item.kind == "int" else None
    return gr.Number(item.default, precision=precision, label=label, elem_id=elem_id)


def _default_depth(model: SurgeryModel) -> int:
    """CLIP Surgery's default depth on ``model`` (6, or every block of a shallower ViT; a
    ResNet's depth only switches its head's attention on: 6)."""
    from .methods.common import PARALLEL_DEPTH

    method = methods.get("clip_surgery")
    depth = method.resolved(method.options(), model.backbone.vision).depth
    return PARALLEL_DEPTH if depth is None else depth


def _output_components() -> list:
    gr = _gradio()

    return [
        gr.Gallery(label="Maps (text · method: probability, cosine)", elem_id="overlays",
                   columns=1, object_fit="contain", format="png", height="auto"),
        gr.Markdown(label="Scores", elem_id="scores"),
        gr.Gallery(label="SAM point prompts (green +, red -)", elem_id="points", columns=1,
                   object_fit="contain", format="png", height="auto"),
        gr.File(label="Downloads: maps (PNG) and explain.json", file_count="multiple",
                elem_id="downloads"),
        gr.Code(language="json", label="explain.json", elem_id="report", max_lines=24),
    ]  # fmt: skip


def _handler(session: DemoSession):
    """The event function: bad input becomes a one-line error in the page (gr.Error)."""
    gr = _gradio()

    def explain(
        image: str | None,
        texts: str | None,
        methods: list[str] | None,
        mode: str | None,
        depth: float | None,
        size: float | None,
        **options: Any,
    ):
        try:
            answer = session.explain(image, texts, methods, mode, depth, size, options)
        except ClipSurgeryError as error:
            raise gr.Error(html.escape(str(error), quote=False), print_exception=False) from None
        overlays = gr.Gallery(answer.overlays, columns=answer.columns)
        points = gr.Gallery(answer.points, columns=answer.columns)
        return overlays, answer.scores, points, answer.files, answer.report

    return explain


def _example_rows(folder: Path) -> list[list[str]]:
    """The shipped example images with texts that suit them."""
    rows = [[str(p), "circle, square, triangle, cross, ring"] for p in
            sorted((folder / "scenes").glob("*.png"))[:2]]  # fmt: skip
    for name, texts in (("cat.jpg", "cat, sofa, wall"), ("astronaut.jpg", "person, flag, grass")):
        if (folder / name).is_file():
            rows.append([str(folder / name), texts])
    return rows


def examples_folder() -> Path | None:
    """The repository's examples/ beside the source tree, when there is one."""
    folder = Path(__file__).resolve().parents[2] / "examples"
    return folder if folder.is_dir() else None


# ------------------------------------------------------------------ the server


def limits_from_args(args: argparse.Namespace) -> Limits:
    """The request limits the ``demo`` command's flags set; OptionError for a bad flag."""
    if not 0 < args.port <= 65535:
        raise OptionError(f"--port must be between 1 and 65535, got {args.port}")
    return Limits(
        max_texts=args.max_texts,
        max_pixels=args.max_pixels or DEMO_MAX_PIXELS,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_side=args.max_side or None,
        concurrency=args.concurrency,
        queue_size=args.queue_size,
    ).check()


def launch(app, limits: Limits, host: str, port: int) -> None:
    """Serve ``app`` on host:port until interrupted: a bounded queue, no analytics, no share
    link, no run history."""
    app.queue(default_concurrency_limit=limits.concurrency, max_size=limits.queue_size)
    app.launch(
        server_name=host,
        server_port=port,
        share=False,
        inbrowser=False,
        max_file_size=limits.max_upload_bytes,
        ssr_mode=False,
        mcp_server=False,
        show_error=False,
        run_history=False,  # its page can send runs to a Hugging Face bucket: off
        footer_links=["api"],
        css=CSS,
        quiet=False,
    )


def serve(args: argparse.Namespace, model: SurgeryModel) -> int:
    """Run the demo server until interrupted."""
    limits = limits_from_args(args)
    _stop_on_sigterm()
    with tempfile.TemporaryDirectory(prefix="clip-surgery-demo-") as root:
        session = DemoSession(model, limits, Path(root))
        app = build_app(session, examples_folder())
        launch(app, limits, args.host, args.port)
    return 0


def _stop_on_sigterm() -> None:
    """SIGTERM stops the server as Ctrl-C does, so its temporary folder is removed."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
