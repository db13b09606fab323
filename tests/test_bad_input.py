"""Ordinary and bad input: no silent wrong answer, no traceback, nothing half-written.

Each command error is checked for its exit code (2), a single line naming the cause, and that
no output exists afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from conftest import make_vit, perturb, photo, random_images, relative_error
from PIL import Image
from tiny_datasets import make_nus_wide, make_segmentation

import clip_surgery
from clip_surgery import ModelError, WeightsUnavailableError
from clip_surgery.cli import main
from clip_surgery.eval.datasets import SEGMENTATION
from clip_surgery.eval.metrics import ConfusionMatrix, ExplainabilityMeter, mean_average_precision
from clip_surgery.images import open_image


def fails(capsys, argv: list[str], fragment: str, absent: Path | None = None) -> str:
    """Run the CLI in-process: exit code 2, one stderr line containing ``fragment``."""
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clip-surgery: error: "), lines
    assert fragment in lines[0], lines[0]
    if absent is not None:
        assert not absent.exists(), f"{absent} was written"
    return lines[0]


@pytest.fixture()
def image(tmp_path) -> Path:
    path = tmp_path / "photo.png"
    photo((80, 60), seed=11).save(path)
    return path


def explain_args(image, checkpoint, out, *extra) -> list[str]:
    return ["explain", str(image), "-t", "cat", "dog", "--checkpoint", checkpoint,
            "--out", str(out), "--no-progress", *extra]  # fmt: skip


# ---------------------------------------------------------------- silent wrong answers


def test_one_text_is_explained_as_a_free_form_query(tmp_path, image, vit_checkpoint):
    out = tmp_path / "out"
    argv = ["explain", str(image), "-t", "cat", "--checkpoint", vit_checkpoint, "--out", str(out)]
    assert main([*argv, "--no-progress"]) == 0
    report = json.loads((out / "explain.json").read_text())
    assert report["mode"] == "free-form"
    overlay = np.asarray(Image.open(report["images"][0]["texts"][0]["overlay"]), np.float32)
    assert overlay.std() > 1  # a map, not the flat colour of an all-zero one


def test_exif_orientation_is_applied_everywhere(tmp_path, vit_checkpoint):
    stored = photo((80, 60), seed=12)  # stored landscape, shown portrait (orientation 6)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    stored.save(path, exif=exif)
    upright = open_image(path)
    assert upright.size == (60, 80)
    assert np.array_equal(
        np.asarray(upright), np.asarray(Image.open(path).convert("RGB").transpose(Image.ROTATE_270))
    )
    out = tmp_path / "out"
    assert main(explain_args(path, vit_checkpoint, out)) == 0
    assert Image.open(out / "001-phone" / "01-cat.png").size == (60, 80)
    model = clip_surgery.load(vit_checkpoint)
    via_path = model.explain(str(path), ["cat", "dog"])
    assert torch.equal(via_path.maps, model.explain(upright, ["cat", "dog"]).maps)


def test_gelu_checkpoint_needs_its_name_and_then_equals_open_clip(tmp_path):
    reference = perturb(open_clip.create_model("ViT-B-16", pretrained=None), 5)  # GELU
    path = tmp_path / "laion-style.pt"
    torch.save(reference.state_dict(), path)
    with pytest.raises(ModelError, match="QuickGELU .* or GELU"):
        clip_surgery.load(path)
    loaded = clip_surgery.load("ViT-B-16", pretrained=str(path))
    images = random_images(1, 224, 224, seed=3)
    with torch.no_grad():
        expected = reference.encode_image(images)
    assert relative_error(loaded.encode_image(images, surgery=False)[:, 0], expected) < 1e-5
    assert isinstance(loaded.clip.visual.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)


def test_offline_advice_names_the_model_for_non_openai_tags():
    with pytest.raises(WeightsUnavailableError) as caught:
        clip_surgery.load("ViT-B-16", pretrained="laion2b_s34b_b88k")
    message = str(caught.value)
    assert "\n" not in message and "--model ViT-B-16 --checkpoint" in message
    assert "load('ViT-B-16', pretrained=" in message


def test_degenerate_metrics_are_undefined_not_zero():
    void = ConfusionMatrix(3)
    void.update(np.zeros((2, 2), np.uint8), np.full((2, 2), 255, np.uint8))
    with pytest.raises(clip_surgery.DatasetError, match="nothing could be scored"):
        void.results()
    matrix = ConfusionMatrix(3)
    matrix.update(np.zeros((2, 2), np.uint8), np.zeros((2, 2), np.uint8))  # class 0 everywhere
    results = matrix.results()
    assert results["per_class_iou"] == [100.0, None, None] and results["undefined_classes"] == 2
    assert results["miou"] == 100.0
    meter = ExplainabilityMeter()
    everything = torch.ones(2, 2, dtype=torch.bool)
    meter.update(torch.rand(2, 2), everything, everything)  # the class covers every pixel
    with pytest.raises(clip_surgery.DatasetError, match="1 undefined pairs"):
        meter.results()
    found = mean_average_precision(np.array([[0.9, 0.2], [0.1, 0.3]]), np.array([[1, 0], [0, 0]]))
    assert found["per_class_ap"] == [100.0, None] and found["undefined_classes"] == 1
    with pytest.raises(clip_surgery.DatasetError, match="no class has a positive"):
        mean_average_precision(np.ones((2, 1)), np.zeros((2, 1), np.int64))


def test_degenerate_datasets_fail_with_the_file_named(tmp_path, capsys, vit_checkpoint):
    spec = SEGMENTATION["voc21"]
    root = tmp_path / "voc"
    keys = make_segmentation(root, "voc21", count=2)
    for key in keys:  # every pixel void
        Image.fromarray(np.full((48, 64), 255, np.uint8)).save(root / spec.labels / f"{key}.png")
    out = tmp_path / "results"
    argv = ["eval", "--dataset", "voc21", "--root", str(root), "--method", "raw",
            "--checkpoint", vit_checkpoint, "--out", str(out), "--no-progress"]  # fmt: skip
    fails(capsys, argv, "nothing could be scored", absent=out / "voc21-raw-sclip.json")
    Image.fromarray(np.full((48, 64), 33, np.uint8)).save(root / spec.labels / f"{keys[0]}.png")
    fails(capsys, argv, f"{keys[0]}.png: label value 33 is outside voc21's classes")
    (root / spec.split).write_text(f"{keys[1]}\n{keys[1]}\n")
    fails(capsys, argv, "val.txt: 1 entr(ies) listed more than once, e.g. 'img1'")


@pytest.mark.parametrize(
    "method, option, fragment",
    [
        ("naclip", "gaussian_std=nan", "must be a finite number"),
        ("naclip", "gaussian_std=0", "gaussian_std must be positive"),
        ("gem", "iterations=-3", "iterations must be >= 0"),
        ("gem", "temperature=0", "temperature must be positive"),
        ("clip_surgery", "depth=-1", "depth must be >= 0"),
        ("clip_surgery", "depth=99", "depth of 'clip_surgery' must be in [0, 8]"),
        ("chefer", "start_layer=40", "start_layer must be -1 or in [0, 7]"),
    ],
)
def test_invalid_options(tmp_path, capsys, image, vit_checkpoint, method, option, fragment):
    out = tmp_path / "out"
    args = explain_args(image, vit_checkpoint, out, "--method", method, "--option", option)
    fails(capsys, args, fragment, absent=out)


def test_conflicting_depth_flags(tmp_path, capsys, image, vit_checkpoint):
    out = tmp_path / "out"
    args = explain_args(image, vit_checkpoint, out, "--depth", "3", "--option", "depth=5")
    fails(capsys, args, "--depth 3 conflicts with --option depth=5", absent=out)


# ---------------------------------------------------------------- plain mistakes


def test_device_without_gpu(tmp_path, capsys, image, vit_checkpoint):
    out = tmp_path / "out"
    device = "cuda:99" if torch.cuda.is_available() else "cuda"
    fails(capsys, explain_args(image, vit_checkpoint, out, "--device", device), "cuda", absent=out)
    fails(capsys, explain_args(image, vit_checkpoint, out, "--device", "gpu"), "unknown device")


def test_out_is_a_file_or_not_writable(tmp_path, capsys, image, vit_checkpoint, monkeypatch):
    blocker = tmp_path / "taken"
    blocker.write_text("a file")
    fails(capsys, explain_args(image, vit_checkpoint, blocker), "--out")
    fails(capsys, explain_args(image, vit_checkpoint, blocker / "sub"), "is a file, not a folder")
    assert blocker.read_text() == "a file"
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    out = tmp_path / "locked" / "out"
    fails(capsys, explain_args(image, vit_checkpoint, out), "cannot write in", absent=out)


def test_decompression_bomb_limit_and_flag(tmp_path, capsys, vit_checkpoint):
    path = tmp_path / "large.png"
    photo((120, 100), seed=2).save(path)
    out = tmp_path / "out"
    args = explain_args(path, vit_checkpoint, out, "--max-pixels", "5000")
    line = fails(capsys, args, "12000 pixels, over the limit of 5000", absent=out)
    assert "--max-pixels 12000" in line
    try:
        assert main(explain_args(path, vit_checkpoint, out, "--max-pixels", "12000")) == 0
    finally:
        clip_surgery.images.set_max_pixels(89478485)


def test_sam_checkpoint_wrong_type_or_corrupt(tmp_path, capsys, image, vit_checkpoint):
    pytest.importorskip("segment_anything", reason="the dev extra installs segment-anything")
    wrong = tmp_path / "wrong.pth"
    torch.save(make_vit(1).state_dict(), wrong)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"PK\x03\x04" + os.urandom(300))
    out = tmp_path / "out"
    for checkpoint in (wrong, corrupt):
        args = ["segment", str(image), "-t", "cat", "--sam-checkpoint", str(checkpoint),
                "--checkpoint", vit_checkpoint, "--out", str(out)]  # fmt: skip
        fails(capsys, args, f"{checkpoint} is not a vit_b SAM checkpoint", absent=out)


def test_score_errors(tmp_path, capsys):
    root = tmp_path / "voc"
    keys = make_segmentation(root, "voc21", count=2)
    spec = SEGMENTATION["voc21"]
    pred = tmp_path / "pred"
    pred.mkdir()
    for key in keys:
        label = spec.read_label(root / spec.labels / f"{key}.png")
        Image.fromarray(np.where(label == 255, 0, label).astype(np.uint8)).save(pred / f"{key}.png")
    assert main(["score", "--dataset", "voc21", "--root", str(root), "--pred", str(pred)]) == 0
    assert capsys.readouterr().out.strip().endswith("mIoU: 100.00")
    (pred / f"{keys[1]}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"broken")
    argv = ["score", "--dataset", "voc21", "--root", str(root), "--pred", str(pred)]
    fails(capsys, argv, f"cannot read prediction {pred / keys[1]}.png")
    argv[2] = "voc2007"
    fails(capsys, argv, "voc2007 is a multi-label dataset; segmentation (and score) takes")


def test_score_index_space(tmp_path, capsys):
    root = tmp_path / "ade"
    keys = make_segmentation(root, "ade20k", count=1)
    spec = SEGMENTATION["ade20k"]
    pred = tmp_path / "pred"
    pred.mkdir()
    raw = np.asarray(Image.open(root / spec.labels / f"{keys[0]}.png")).astype(np.int64)
    one_based = np.where(raw == 255, 1, np.clip(raw, 1, 150)).astype(np.uint8)
    one_based[0, 0] = 150
    Image.fromarray(one_based).save(pred / f"{keys[0]}.png")
    argv = ["score", "--dataset", "ade20k", "--root", str(root), "--pred", str(pred)]
    fails(capsys, argv, "class id 150 outside 0..149; score expects 0-based class ids (1-based")
    Image.fromarray((one_based - 1).astype(np.uint8)).save(pred / f"{keys[0]}.png")
    assert main(argv) == 0
    city = tmp_path / "city"
    keys = make_segmentation(city, "cityscapes", count=2)
    flat = tmp_path / "flat"
    flat.mkdir()
    for key in keys:  # city-less file names, as many tools write them
        label = SEGMENTATION["cityscapes"].read_label(
            city / "cityscapes/gtFine/val" / f"{key}_gtFine_labelTrainIds.png"
        )
        Image.fromarray(np.where(label == 255, 0, label).astype(np.uint8)).save(
            flat / f"{Path(key).name}.png"
        )
    assert main(["score", "--dataset", "cityscapes", "--root", str(city), "--pred", str(flat)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("mIoU: ")


def test_class_file_errors(tmp_path, capsys, vit_checkpoint):
    root = tmp_path / "nus"
    make_nus_wide(root, count=2)
    argv = ["eval", "--dataset", "nus_wide", "--root", str(root), "--checkpoint",
            vit_checkpoint, "--out", str(tmp_path / "r"), "--no-progress"]  # fmt: skip
    (root / "Concepts81.txt").write_text("\n  \n")
    fails(capsys, argv, "Concepts81.txt: no concept names")
    (root / "Concepts81.txt").write_text("sky\nsky\n")
    fails(capsys, argv, "Concepts81.txt: 1 entr(ies) listed more than once")
    (root / "Concepts81.txt").write_text("sky\n\x00\x01bad\n")
    fails(capsys, argv, "is not a concept name")


def test_flags_a_task_does_not_use_are_refused(tmp_path, capsys, vit_checkpoint):
    root = tmp_path / "nus"
    make_nus_wide(root, count=2)
    base = ["eval", "--dataset", "nus_wide", "--root", str(root), "--checkpoint", vit_checkpoint]
    fails(capsys, [*base, "--single"], "--single does not apply to --task multilabel")
    fails(capsys, [*base, "--save-pred", str(tmp_path / "p")], "--save-pred does not apply")


def test_checkpoint_errors_name_what_is_wrong(tmp_path):
    state = make_vit(2).state_dict()
    truncated = {
        k: v for k, v in state.items() if not k.startswith("visual.transformer.resblocks.3.")
    }
    torch.save({**truncated, "input_resolution": torch.tensor(224)}, tmp_path / "t.pt")
    with pytest.raises(ModelError, match="incomplete \\(truncated\\?\\), 12 tensors missing"):
        clip_surgery.load(tmp_path / "t.pt")
    no_proj = {k: v for k, v in state.items() if k != "visual.proj"}
    torch.save(no_proj, tmp_path / "p.pt")
    with pytest.raises(ModelError, match="ViT checkpoint: no 'visual.proj'"):
        clip_surgery.load(tmp_path / "p.pt")


def test_gradient_methods_take_positions(vit_checkpoint):
    model = clip_surgery.load(vit_checkpoint)
    images = random_images(1, 224, 288, seed=4)
    for name in ("gradcam", "chefer"):
        plain = model.explain(images, ["a", "b"], method=name, templates=None)
        bicubic = model.explain(
            images, ["a", "b"], method=name, templates=None, positions="bicubic-dino"
        )
        assert (plain.similarity - bicubic.similarity).abs().max() > 0


def test_ctrl_c_ends_quickly_with_130_and_no_partial_file(tmp_path, vit_checkpoint):
    folder = tmp_path / "many"
    folder.mkdir()
    for index in range(60):
        photo((64, 48), seed=index).save(folder / f"img{index:02d}.png")
    out = tmp_path / "out"
    args = [sys.executable, "-m", "clip_surgery.cli", *explain_args(folder, vit_checkpoint, out)]
    args.append("--batch-size=1")
    process = subprocess.Popen(
        args,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        # as a terminal's Ctrl-C finds it: a suite run as a background job starts its children
        # with SIGINT ignored, and Python then installs no KeyboardInterrupt handler
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 240
    while not list(out.glob("*/grid.png")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(out.glob("*/grid.png")), "the run never wrote an output"
    process.send_signal(signal.SIGINT)
    interrupted = time.monotonic()
    code = process.wait(timeout=30)
    assert code == 130 and time.monotonic() - interrupted < 5
    assert process.stderr.read().strip() == "clip-surgery: interrupted"
    leftovers = [p for p in out.rglob("*") if p.name.startswith(".")]
    assert not leftovers and not (out / "explain.json").exists()
    for written in out.rglob("*.png"):
        Image.open(written).load()  # every file that exists is whole
