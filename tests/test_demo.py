"""The web demo (``clip-surgery demo``): a real server on 127.0.0.1 driven by headless Chromium,
by ``gradio_client`` and by a bounded load loop; its pictures equal the API's, pixel for pixel.

One server (tiny-synth) serves the whole module and is stopped at the end; it runs under an
audit hook that reports any connection or name lookup beyond the loopback address. In CI
(``CI=true``) a missing browser or demo package fails the tests instead of skipping them.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clip_surgery
from clip_surgery.errors import ImageError, OptionError, TextError
from clip_surgery.images import open_image
from clip_surgery.viz import overlay

ROOT = Path(__file__).resolve().parents[1]
SCENES = ROOT / "examples" / "scenes"
SCREENSHOT = ROOT / "docs" / "demo.png"  # the README's; rewritten with CLIP_SURGERY_SCREENSHOT=1
SCREENSHOT_AREA = {"x": 0, "y": 0, "width": 1280, "height": 1180}
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _bench():
    """benchmarks/bench_demo.py: the server and load helpers the benchmark uses too."""
    spec = importlib.util.spec_from_file_location("bench_demo", ROOT / "benchmarks/bench_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _bench()


def _require(ok: bool, reason: str) -> None:
    """Skip with ``reason`` when not ``ok``; in CI, fail instead."""
    if not ok:
        if IN_CI:
            pytest.fail(f"{reason} (CI runs every demo test: bash scripts/setup.sh installs it)")
        pytest.skip(reason)


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path
    temp: Path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``clip-surgery demo`` on a free port: 2 requests at a time, 1 MB uploads, 4 MP images."""
    _require(_installed("gradio") and _installed("gradio_client"), "gradio is not installed")
    folder = tmp_path_factory.mktemp("demo")
    temp = folder / "tmp"
    temp.mkdir()
    env = dict(os.environ, TMPDIR=str(temp), GRADIO_TEMP_DIR=str(temp / "gradio"))
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())  # the same floats as this process
    port, log = bench.free_port(), folder / "server.log"
    flags = ["--concurrency", "2", "--queue-size", "40", "--max-upload-mb", "1"]
    flags += ["--max-pixels", "4000000", "--max-texts", "8"]
    process = bench.start_server(port, *flags, log=log, env=env)
    try:
        bench.wait_ready(f"http://127.0.0.1:{port}/", process, log)
        yield Server(f"http://127.0.0.1:{port}/", process, log, temp)
    finally:
        bench.stop_server(process)
    outbound = [line for line in log.read_text().splitlines() if line.startswith("OUTBOUND")]
    assert outbound == [], outbound


@pytest.fixture(scope="module")
def tiny():
    return clip_surgery.load("tiny-synth")


def api_overlays(model, path: Path, texts: list[str], method: str = "clip_surgery", **kwargs):
    """What the library gives for the same inputs: overlays of the maps at the image size."""
    image = open_image(path, 2048)
    result = model.explain(image, texts, method=method, **kwargs)
    hw = (image.height, image.width)
    return [np.asarray(overlay(image, result.maps_at(hw, 0, [k])[0])) for k in range(len(texts))]


def _decoded(data: bytes) -> np.ndarray:
    picture = Image.open(io.BytesIO(data))
    assert picture.format == "PNG"  # served as written: lossless, not re-encoded
    return np.asarray(picture.convert("RGB"))


# ------------------------------------------------------------------ the browser


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's Chromium (scripts/setup.sh installs it); skip or, in CI, fail without it
    (before the server starts)."""
    _require(_installed("playwright"), "playwright is not installed (pip install -e '.[dev]')")
    found = next(
        (shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None
    )
    _require(found is not None, "no chromium on PATH (as root: apt-get install -y chromium)")
    return found


def _srcs(page) -> list[str]:
    """The overlay URLs shown now (read in one step: the gallery may be re-rendering)."""
    return page.locator("#overlays img").evaluate_all("images => images.map(i => i.src)")


def _wait_overlays(page, count: int, old: set[str], timeout: float = 60.0) -> list[str]:
    """The overlay URLs once ``count`` new ones are shown and decoded by the browser."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        srcs = _srcs(page)
        if len(srcs) == count and not set(srcs) & old:
            loaded = page.locator("#overlays img").evaluate_all(
                "images => images.every(i => i.complete && i.naturalWidth > 0)"
            )
            if loaded:
                return srcs
        page.wait_for_timeout(200)
    raise AssertionError(f"{count} new overlays not shown in {timeout:.0f} s: {_srcs(page)}")


def _check_page(page, srcs: list[str], expected: list[np.ndarray], model, path, texts) -> None:
    """Served overlays equal the API's; the scores and point prompts are shown."""
    for src, want in zip(srcs, expected, strict=True):
        response = page.request.get(src)
        assert response.ok, src
        np.testing.assert_array_equal(_decoded(response.body()), want)
    image = open_image(path, 2048)
    cosine = model.explain(image, texts).cosine[0]
    scores = page.locator("#scores").inner_text()
    for text, value in zip(texts, cosine.tolist(), strict=True):
        assert text in scores and f"{round(value, 6):.4f}" in scores
    assert page.locator("#points img").count() == len(texts)
    downloads = page.locator("#downloads").inner_text()
    assert "explain.json" in downloads and ".zip" in downloads


def test_browser_shows_the_api_overlays_and_errors(chromium, server, tiny, tmp_path):
    from playwright.sync_api import sync_playwright

    requests: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium, headless=True, args=["--no-sandbox"]
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.on("request", lambda request: requests.append(request.url))
            page.goto(server.url)
            _run_example(page, tiny, tmp_path)
            _run_bad_then_good(page, tiny, tmp_path)
        finally:
            browser.close()
    foreign = [u for u in requests if not u.startswith((server.url, "data:", "blob:"))]
    assert foreign == [], foreign  # the page loads nothing from anywhere else


def _run_example(page, model, tmp_path) -> None:
    """Pick the first scene example (image and texts), run, compare; save the screenshot."""
    texts = ["circle", "square", "triangle", "cross", "ring"]
    page.locator("#examples").get_by_text("test_00003.png").click()
    page.wait_for_function("() => document.querySelector('#texts textarea').value.includes('ring')")
    page.locator("#image").get_by_text("test_00003").wait_for()
    page.locator("#run").click()
    srcs = _wait_overlays(page, len(texts), set())
    expected = api_overlays(model, SCENES / "test_00003.png", texts)
    _check_page(page, srcs, expected, model, SCENES / "test_00003.png", texts)
    page.evaluate("window.scrollTo(0, 0)")
    shot = SCREENSHOT if os.environ.get("CLIP_SURGERY_SCREENSHOT") else tmp_path / "demo.png"
    page.screenshot(path=str(shot), full_page=True, clip=SCREENSHOT_AREA)
    assert Image.open(shot).size[0] > 0


def _run_bad_then_good(page, model, tmp_path) -> None:
    """A non-image shows the error in the page; the next valid request still works."""
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image\n")
    old = set(_srcs(page))
    page.locator("#image button[aria-label=Clear]").click()
    page.locator("#image input[type=file]").set_input_files(str(notes))
    page.locator("#image").get_by_text("notes").wait_for()
    page.locator("#run").click()
    message = page.get_by_test_id("toast-text").filter(has_text="notes.txt is not an image")
    message.first.wait_for(timeout=30_000)
    page.locator("#image button[aria-label=Clear]").click()
    page.locator("#image input[type=file]").set_input_files(str(SCENES / "test_00011.png"))
    page.locator("#image").get_by_text("test_00011").wait_for()
    page.locator("#texts textarea").fill("cross\nring")  # newline separated
    page.locator("#run").click()
    srcs = _wait_overlays(page, 2, old)
    expected = api_overlays(model, SCENES / "test_00011.png", ["cross", "ring"])
    _check_page(page, srcs, expected, model, SCENES / "test_00011.png", ["cross", "ring"])


# ------------------------------------------------------------------ the API endpoint


def test_explain_endpoint_from_gradio_client(server, tiny):
    from gradio_client import Client, handle_file

    client = Client(server.url, verbose=False)
    texts, path = ["circle", "square"], SCENES / "test_00007.png"
    overlays, scores, points, files, report = client.predict(
        handle_file(str(path)),
        "circle, square",
        methods=["clip_surgery", "gem"],
        mode="free-form",
        depth=2,
        gem__iterations=2,
        api_name="/explain",
    )
    ours = api_overlays(tiny, path, texts, single=True, depth=2)
    gem = api_overlays(tiny, path, texts, "gem", single=True, depth=2, iterations=2)
    served = [item["image"] for item in overlays["value"]]  # text by text, methods side by side
    assert len(served) == 4 and overlays["columns"] == 2
    for got, want in zip(served, [ours[0], gem[0], ours[1], gem[1]], strict=True):
        np.testing.assert_array_equal(_decoded(Path(got).read_bytes()), want)
    reports = json.loads(report)
    assert reports["gem"]["settings"]["depth"] == 2 and reports["gem"]["mode"] == "free-form"
    assert reports["gem"]["settings"]["iterations"] == 2
    cosine = tiny.explain(open_image(path, 2048), texts, single=True, depth=2).cosine[0]
    listed = [item["cosine"] for item in reports["clip_surgery"]["images"][0]["texts"]]
    assert listed == [round(v, 6) for v in cosine.tolist()]
    assert sorted(Path(f).name for f in files)[-1] == "explain-gem.json"
    assert any(Path(f).suffix == ".zip" for f in files) and len(points["value"]) == 4


@pytest.mark.parametrize(
    "image,texts,kwargs,message",
    [
        ("scene", "  , \n", {}, "no text given"),
        ("scene", ",".join("abcdefghi"), {}, "9 texts given; this demo takes at most 8"),
        ("scene", "ring", {"depth": 99}, "must be in [0, 3] for this model, got 99"),
        ("scene", "ring", {"size": 5000}, "input size must be 0"),
        ("scene", "ring", {"methods": []}, "no method chosen"),
        ("scene", "ring", {"methods": ["gem"], "gem__temperature": "hot"}, "must be float"),
        ("text", "ring", {}, "notes.txt is not an image"),
        ("huge", "ring", {}, "2100 x 2000 = 4,200,000 pixels; this demo accepts images of at"),
    ],
)
def test_bad_input_is_an_error_and_the_server_keeps_serving(
    server, tmp_path, image, texts, kwargs, message
):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    paths = {"scene": SCENES / "test_00020.png", "text": tmp_path / "notes.txt"}
    paths["text"].write_text("not an image\n")
    paths["huge"] = tmp_path / "huge.png"  # small file, too many pixels
    Image.new("RGB", (2100, 2000)).save(paths["huge"])
    client = Client(server.url, verbose=False)
    with pytest.raises(AppError, match=re.escape(message)):
        client.predict(handle_file(str(paths[image])), texts, api_name="/explain", **kwargs)
    result = client.predict(handle_file(str(paths["scene"])), "ring", api_name="/explain")
    assert len(result[0]["value"]) == 1


def test_uploads_over_the_size_limit_are_refused(server):
    import httpx

    big = np.random.default_rng(0).integers(0, 256, 1_200_000, dtype=np.uint8).tobytes()
    files = {"files": ("big.png", big, "image/png")}
    response = httpx.post(f"{server.url}gradio_api/upload", files=files, timeout=30)
    assert response.status_code == 413
    assert "maximum allowed size of 1048576 bytes" in response.text


# ------------------------------------------------------------------ under load


def test_twenty_concurrent_requests_succeed_with_bounded_memory(server):
    bench.run_load(server.url, 2, 1, texts="ring")  # warm-up
    before = bench.rss_mb(server.process.pid)
    seconds = bench.run_load(server.url, 20, 20, texts="ring", timeout=90)
    after = bench.rss_mb(server.process.pid)
    p50, p95 = bench.percentile(seconds, 50), bench.percentile(seconds, 95)
    print(f"20 concurrent requests: p50 {p50:.2f} s, p95 {p95:.2f} s; RSS {before:.0f} -> "
          f"{after:.0f} MiB")  # fmt: skip
    assert len(seconds) == 20
    assert after - before < 256, (before, after)
    roots = list(server.temp.glob("clip-surgery-demo-*"))
    assert len(roots) == 1 and len(list(roots[0].glob("request-*"))) <= 16  # old ones removed


# ------------------------------------------------------------------ pieces, no server


def test_texts_are_split_on_commas_and_lines_and_bounded():
    from clip_surgery.demo import parse_texts

    assert parse_texts("a cat, sofa\n the wall ,", 8) == ["a cat", "sofa", "the wall"]
    with pytest.raises(TextError, match="no text given"):
        parse_texts(" ,\n ", 8)
    with pytest.raises(TextError, match="3 texts given; this demo takes at most 2"):
        parse_texts("a, b, c", 2)


def test_option_controls_follow_the_catalog():
    from clip_surgery import catalog
    from clip_surgery.demo import method_options, option_fields

    for item in catalog.read()["methods"]:
        fields = {f.key: f for f in option_fields(item["name"])}
        assert set(fields) == set(item["options"]) - {"depth"}
    assert option_fields("gem")[1].kind == "text"  # temperature: empty is None
    assert method_options("gem", 3, {"gem__temperature": "", "sclip__ffn": False}) == {"depth": 3}
    with pytest.raises(OptionError, match="must be >= 0"):
        method_options("clip_surgery", -1, {})


def test_the_depth_control_starts_at_the_models_own_default(tiny):
    """tiny-synth has 3 blocks: the page's depth starts at 3 (6 would be refused); a 12-block
    ViT starts at the paper's 6."""
    from conftest import make_vit

    from clip_surgery.demo import _default_depth

    assert _default_depth(tiny) == 3
    assert _default_depth(clip_surgery.wrap(make_vit(5, layers=12))) == 6


def test_size_and_pixel_checks(tmp_path):
    from clip_surgery.demo import Limits, check_size, read_upload

    assert check_size(0) is None and check_size(224) == 224
    with pytest.raises(OptionError):
        check_size(2.5)
    Image.new("RGB", (30, 20)).save(tmp_path / "small.png")
    with pytest.raises(ImageError, match=r"small.png is 30 x 20 = 600 pixels"):
        read_upload(str(tmp_path / "small.png"), Limits(max_pixels=500))
    with pytest.raises(ImageError, match="no image"):
        read_upload(None, Limits())


def test_app_py_runs_the_demo_command():
    spec = importlib.util.spec_from_file_location("space_app", ROOT / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    from clip_surgery.cli import build_parser

    assert app.space_args({}, []) == ["demo", "--host", "127.0.0.1", "--port", "7860"]
    space = app.space_args({"GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": "7861"}, [])
    args = build_parser().parse_args(space)
    assert (args.command, args.host, args.port, args.model) == ("demo", "0.0.0.0", 7861, None)


def test_readme_shows_the_demo():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "## Web demo" in readme and "clip-surgery demo" in readme
    assert "docs/demo.png" in readme and SCREENSHOT.is_file()


def test_demo_help_lists_the_server_flags():
    result = subprocess.run(
        [sys.executable, "-m", "clip_surgery.cli", "demo", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    for flag in ("--host", "--port", "--concurrency", "--queue-size", "--max-upload-mb"):
        assert flag in result.stdout
