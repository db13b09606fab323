"""The command line, end to end on a random-weight checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import photo
from PIL import Image

from clip_surgery import backbones, methods
from clip_surgery.cli import main
from clip_surgery.outputs import image_folders, slug, text_files
from clip_surgery.viz import overlay


@pytest.fixture()
def images(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    photo((80, 60), seed=1).save(folder / "one.png")
    photo((50, 70), seed=2).save(folder / "two.jpg")
    return folder


def test_explain_writes_overlays_grid_and_json(tmp_path, images, vit_checkpoint, capsys):
    out = tmp_path / "out"
    code = main(
        [
            "explain",
            str(images),
            "--text",
            "cat",
            "blue sky",
            "--checkpoint",
            vit_checkpoint,
            "--out",
            str(out),
            "--json",
            "--no-progress",
            "--batch-size",
            "1",
        ]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads((out / "explain.json").read_text())
    assert [r["image"] for r in report["images"]] == [
        str(images / "one.png"),
        str(images / "two.jpg"),
    ]
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == [
        "001-one/01-cat.png",
        "001-one/02-blue-sky.png",
        "001-one/grid.png",
        "002-two/01-cat.png",
        "002-two/02-blue-sky.png",
        "002-two/grid.png",
        "explain.json",
    ]
    assert Image.open(out / "001-one/01-cat.png").size == (80, 60)
    assert Image.open(out / "002-two/01-cat.png").size == (50, 70)
    entries = report["images"][0]["texts"]
    assert [e["text"] for e in entries] == ["cat", "blue sky"]
    assert entries[1]["overlay"] == str(out / "001-one/02-blue-sky.png")
    assert abs(sum(e["probability"] for e in entries) - 1) < 1e-4
    assert report["method"] == "clip_surgery" and report["mode"] == "class-set"
    assert "naming" in report and oct((out / "001-one/grid.png").stat().st_mode & 0o777) == oct(
        0o666 & ~_umask()
    )
    assert report["settings"] == {
        "size": 224,
        "single": False,
        "depth": 6,  # the default (None) as it ran on this 8-block ViT
        "attention": "vv",
        "ffn": False,
        "feature_surgery": "auto",
        "weighting": "cls",
        "positions": "bilinear",
    }


def test_explain_overlay_matches_api(tmp_path, images, vit_checkpoint):
    import clip_surgery

    out = tmp_path / "out"
    assert (
        main(
            [
                "explain",
                str(images / "one.png"),
                "-t",
                "cat",
                "--single",
                "--checkpoint",
                vit_checkpoint,
                "--out",
                str(out),
                "--no-progress",
                "--size",
                "448",
            ]
        )
        == 0
    )
    model = clip_surgery.load(vit_checkpoint)
    image = Image.open(images / "one.png").convert("RGB")
    result = model.explain(image, ["cat"], size=448, single=True, output_size=(60, 80))
    expected = np.asarray(overlay(image, result.maps[0, 0]), dtype=np.int16)
    written = np.asarray(Image.open(out / "001-one/01-cat.png"), dtype=np.int16)
    assert np.abs(written - expected).max() <= 1


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "clip_surgery.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clip-surgery: error:"), result.stderr
    assert fragment in lines[0]


def test_cli_errors_are_one_line(tmp_path, images, vit_checkpoint):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff" + b"junk" * 50)
    out = tmp_path / "never"
    cases = [
        (["explain", str(tmp_path / "missing.png"), "-t", "x"], "image not found"),
        (
            ["explain", str(corrupt), "-t", "x", "--checkpoint", vit_checkpoint, "--out", str(out)],
            "cannot read image",
        ),
        (["explain", str(images), "-t", "x", "--model", "ViT-Q-99"], "unknown model"),
        (
            ["explain", str(images), "-t", "", "--checkpoint", vit_checkpoint, "--out", str(out)],
            "empty text",
        ),
        (["explain", str(images), "-t", "w " * 90, "--checkpoint", vit_checkpoint], "too long"),
        (
            ["explain", str(images), "-t", "x", "--checkpoint", str(tmp_path / "no.pt")],
            "checkpoint not found",
        ),
        (["explain", str(images), "-t", "x"], "--checkpoint ViT-B-16.pt"),
    ]
    for args, fragment in cases:
        assert_one_line_error(run_cli(*args), fragment)
    assert not out.exists()  # nothing half-written


def test_helpers():
    assert slug("A photo: of a DOG!") == "a-photo-of-a-dog"
    assert slug("???") == "text"
    assert image_folders([Path("a/x.png"), Path("b/x.jpg"), Path("y.png")]) == [
        "001-x",
        "002-x",
        "003-y",
    ]
    assert text_files(["grid", "cat", "cat"]) == ["01-grid.png", "02-cat.png", "03-cat.png"]


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def test_outputs_never_collide(tmp_path, vit_checkpoint, capsys):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    photo((40, 30), seed=3).save(first / "same.png")
    photo((30, 40), seed=4).save(second / "same.png")
    photo((36, 36), seed=5).save(first / "same-2.png")
    inputs = [str(first / "same.png"), str(second / "same.png"), str(first / "same-2.png")]
    out = tmp_path / "out"
    texts = ["grid", "cat", "cat"]
    argv = ["explain", *inputs, "-t", *texts, "--checkpoint", vit_checkpoint, "--out", str(out)]
    assert main([*argv, "--json", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    files = [entry["overlay"] for record in report["images"] for entry in record["texts"]]
    grids = [record["grid"] for record in report["images"]]
    assert len(set(files + grids)) == 3 * 3 + 3  # every (image, text) and grid has its own file
    for record, source in zip(report["images"], inputs, strict=True):
        assert record["image"] == source
        assert [entry["text"] for entry in record["texts"]] == texts
        size = Image.open(source).size
        for entry in record["texts"]:
            assert Image.open(entry["overlay"]).size == size
    assert Image.open(grids[0]).size != Image.open(files[0]).size  # the grid is a figure


def test_methods_listing(capsys):
    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    for name in (
        "raw",
        "clip_surgery",
        "maskclip",
        "sclip",
        "clearclip",
        "naclip",
        "gem",
        "gradcam",
        "chefer",
        "resclip",
        "scclip",
        "cliper",
        "legrad",
    ):
        assert f"\n{name} " in f"\n{text}"
    assert (
        "arXiv 2304.05653" in text
        and "families: open_clip ViT, open_clip ModifiedResNet, transformers CLIP" in text
    )
    assert main(["methods", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert {item["name"] for item in listing} >= {"gem", "chefer"}
    assert next(i for i in listing if i["name"] == "naclip")["options"]["gaussian_std"] == 5.0


def test_option_errors_are_one_line(tmp_path, images, vit_checkpoint):
    cases = [
        (
            [
                "explain",
                str(images),
                "-t",
                "x",
                "--method",
                "sclip",
                "--option",
                "depth=2",
                "--checkpoint",
                vit_checkpoint,
            ],
            "unknown option",
        ),
        (["explain", str(images), "-t", "x", "--option", "depth"], "KEY=VALUE"),
        (["explain", str(images), "-t", "x", "--method", "lime"], "unknown method"),
        (["explain", str(images), "-t", "x", "--option", "attention=zz"], "must be one of"),
    ]
    for args, fragment in cases:
        assert_one_line_error(run_cli(*args), fragment)


def test_backbones_matrix(capsys):
    assert main(["backbones"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split()
    rows = {line[:26].strip(): line[26:].split() for line in lines[1:4]}
    assert header[0] == "family" and header[1:] == methods.names()
    resnet = dict(zip(header[1:], rows["open_clip ModifiedResNet"], strict=True))
    assert [name for name, mark in resnet.items() if mark == "yes"] == [
        "raw",
        "clip_surgery",
        "gradcam",
    ]
    assert set(rows["transformers CLIP"]) == {"yes"} and set(rows["open_clip ViT"]) == {"yes"}
    assert main(["backbones", "--json"]) == 0
    matrix = json.loads(capsys.readouterr().out)
    assert [row["family"] for row in matrix] == [f.name for f in backbones.FAMILIES]
