"""Evaluation harness: every layout end to end through the CLI, metrics, score, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_vit
from PIL import Image
from tiny_datasets import make_coco2014, make_nus_wide, make_segmentation, make_voc2007

import clip_surgery
from clip_surgery import DatasetError
from clip_surgery.cli import main
from clip_surgery.eval import runner
from clip_surgery.eval.datasets import IGNORE, SEGMENTATION, multilabel_dataset
from clip_surgery.eval.metrics import (
    ConfusionMatrix,
    ExplainabilityMeter,
    average_precision,
    mean_average_precision,
)
from clip_surgery.eval.presets import preset_for
from clip_surgery.tasks.segment import window_boxes


@pytest.fixture(autouse=True)
def few_templates(monkeypatch):
    """Three templates instead of 80 keep text encoding of 171 classes fast in tests."""
    from clip_surgery.eval import presets

    original = presets.preset_for
    monkeypatch.setattr(
        runner,
        "preset_for",
        lambda *a, **k: __import__("dataclasses").replace(original(*a, **k), templates=3),
    )


@pytest.mark.parametrize("dataset", sorted(SEGMENTATION))
def test_eval_cli_every_layout(tmp_path, capsys, vit_checkpoint, dataset):
    make_segmentation(tmp_path / "data", dataset, count=3)
    out = tmp_path / "results"
    argv = [
        "eval",
        "--dataset",
        dataset,
        "--root",
        str(tmp_path / "data"),
        "--method",
        "raw",
        "--checkpoint",
        vit_checkpoint,
        "--limit",
        "2",
        "--out",
        str(out),
        "--no-progress",
        "--save-pred",
        str(tmp_path / "pred"),
    ]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("mIoU: ")
    report = json.loads((out / f"{dataset}-raw-sclip-limit2.json").read_text())
    assert not (out / f"{dataset}-raw-sclip.json").exists()  # the full run's name stays free
    assert report["images"] == 2 and 0 <= report["miou"] <= 100
    assert report["limit"] == 2 and report["root"] == str(tmp_path / "data") and report["split"]
    assert float(lines[-1].split()[1]) == pytest.approx(report["miou"], abs=0.01)
    assert report["preset"]["name"] == "sclip" and report["weights"]
    assert len(report["per_class_iou"]) == len(SEGMENTATION[dataset].classes)
    assert "| method |" in (out / f"{dataset}-raw-sclip-limit2.md").read_text()
    assert not list(out.glob(".state-*"))  # finished runs leave no state behind


def test_score_ground_truth_is_100_and_known_perturbation(tmp_path, capsys):
    root = tmp_path / "data"
    keys = make_segmentation(root, "voc21", count=2)
    spec = SEGMENTATION["voc21"]
    pred = tmp_path / "pred"
    pred.mkdir()
    labels = {}
    for key in keys:
        label = spec.read_label(root / spec.labels / f"{key}.png")
        labels[key] = label
        Image.fromarray(np.where(label == IGNORE, 0, label).astype(np.uint8)).save(
            pred / f"{key}.png"
        )
    assert main(["score", "--dataset", "voc21", "--root", str(root), "--pred", str(pred)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "mIoU: 100.00"

    # Known perturbation: every pixel labelled 3 in the first image predicted as 4.
    first = labels[keys[0]].copy()
    moved = first == 3
    first[moved] = 4
    Image.fromarray(np.where(first == IGNORE, 0, first).astype(np.uint8)).save(
        pred / f"{keys[0]}.png"
    )
    count3 = sum(int((label == 3).sum()) for label in labels.values())
    count4 = sum(int((label == 4).sum()) for label in labels.values())
    moved_count = int(moved.sum())
    iou3 = (count3 - moved_count) / count3
    iou4 = count4 / (count4 + moved_count)
    present = [c for c in range(21) if any((label == c).any() for label in labels.values())]
    expected = (len(present) - 2 + iou3 + iou4) / len(present) * 100
    assert main(["score", "--dataset", "voc21", "--root", str(root), "--pred", str(pred)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"mIoU: {expected:.2f}"


def test_confusion_matrix_known_answer_and_ignore():
    label = np.array([[0, 0, 1, 1], [2, 2, 255, 255]], dtype=np.uint8)
    prediction = np.array([[0, 1, 1, 1], [2, 0, 3, 3]], dtype=np.uint8)
    matrix = ConfusionMatrix(5)
    matrix.update(prediction, label)
    results = matrix.results()
    # class 0: inter 1, union 3; class 1: 2/3; class 2: 1/2; class 3 and 4: absent everywhere
    # (class 3 predicted only on ignored pixels), so they are not averaged.
    assert results["per_class_iou"][:3] == pytest.approx([100 / 3, 200 / 3, 50])
    assert results["per_class_iou"][3:] == [None, None]
    assert results["miou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3 * 100)
    assert results["aacc"] == pytest.approx(4 / 6 * 100)


def test_confusion_matrix_against_independent_computation():
    rng = np.random.default_rng(3)
    labels = [rng.integers(0, 6, (20, 30)).astype(np.uint8) for _ in range(4)]
    preds = [rng.integers(0, 7, (20, 30)).astype(np.uint8) for _ in range(4)]
    for label in labels:
        label[rng.random(label.shape) < 0.1] = IGNORE
    matrix = ConfusionMatrix(7)
    for prediction, label in zip(preds, labels, strict=True):
        matrix.update(prediction, label)
    ious = []
    for c in range(7):
        inter = union = 0
        for prediction, label in zip(preds, labels, strict=True):
            valid = label != IGNORE
            inter += int(((prediction == c) & (label == c) & valid).sum())
            union += int((((prediction == c) | (label == c)) & valid).sum())
        if union:
            ious.append(inter / union)
    assert matrix.results()["miou"] == pytest.approx(np.mean(ious) * 100)


def test_reduce_zero_label(tmp_path):
    spec = SEGMENTATION["context59"]
    path = tmp_path / "label.png"
    Image.fromarray(np.array([[0, 1, 59, 255]], dtype=np.uint8)).save(path)
    assert spec.read_label(path).tolist() == [[255, 0, 58, 255]]
    voc = SEGMENTATION["voc21"]
    Image.fromarray(np.array([[0, 20, 255]], dtype=np.uint8)).save(path)
    assert voc.read_label(path).tolist() == [[0, 20, 255]]
    Image.fromarray(np.array([[0, 20, 21, 255]], dtype=np.uint8)).save(path)
    with pytest.raises(DatasetError, match=r"label.png: label value 21 is outside voc21's"):
        voc.read_label(path)  # out of range is an error, not silently ignored


def test_explainability_meter_known_answer():
    meter = ExplainabilityMeter()
    heatmap = torch.tensor([[1.0, 0.8], [0.2, 0.0]])
    mask = torch.tensor([[True, True], [False, False]])
    meter.update(heatmap, mask, torch.ones(2, 2, dtype=torch.bool))
    results = meter.results()
    assert results["miou"] == pytest.approx(100.0)  # any threshold in (0.2, 0.8] separates
    assert 0.2 < results["threshold"] <= 0.8
    assert results["msc"] == pytest.approx((0.9 - 0.1) * 100)
    opposite = ExplainabilityMeter()
    opposite.update(1 - heatmap, mask, torch.ones(2, 2, dtype=torch.bool))
    assert opposite.results()["msc"] == pytest.approx(-80.0)


def test_average_precision_against_explicit_formula():
    rng = np.random.default_rng(5)
    scores = rng.random((30, 4))
    labels = rng.integers(0, 2, (30, 4))
    labels[rng.random((30, 4)) < 0.1] = -1
    for column in range(4):
        keep = labels[:, column] >= 0
        pairs = sorted(zip(scores[keep, column], labels[keep, column], strict=True), reverse=True)
        hits, total = 0, 0.0
        for rank, (_, label) in enumerate(pairs, start=1):
            if label == 1:
                hits += 1
                total += hits / rank
        expected = total / max(hits, 1)
        assert average_precision(scores[:, column], labels[:, column]) == pytest.approx(expected)
    assert mean_average_precision(np.array([[0.9], [0.1]]), np.array([[1], [0]]))["map"] == 100


def test_layout_errors_say_what_is_expected(tmp_path):
    with pytest.raises(DatasetError, match="root not found"):
        SEGMENTATION["voc21"].samples(tmp_path / "none")
    with pytest.raises(DatasetError, match="expected images in .*JPEGImages"):
        SEGMENTATION["voc21"].samples(tmp_path)
    keys = make_segmentation(tmp_path, "ade20k", count=2)
    (tmp_path / SEGMENTATION["ade20k"].labels / f"{keys[1]}.png").unlink()
    with pytest.raises(DatasetError, match=f"expected label file .*{keys[1]}.png"):
        SEGMENTATION["ade20k"].samples(tmp_path)
    make_segmentation(tmp_path / "voc", "voc21", count=1)
    (tmp_path / "voc" / SEGMENTATION["voc21"].split).unlink()
    with pytest.raises(DatasetError, match="split list"):
        SEGMENTATION["voc21"].samples(tmp_path / "voc")


def test_eval_cli_errors_are_one_line(tmp_path, capsys, vit_checkpoint):
    cases = [
        (["eval", "--dataset", "voc99", "--root", str(tmp_path)], "unknown dataset"),
        (["eval", "--dataset", "voc21", "--root", str(tmp_path)], "expected images"),
        (
            ["score", "--dataset", "voc21", "--root", str(tmp_path), "--pred", str(tmp_path)],
            "expected images",
        ),
    ]
    for argv, fragment in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0]


def test_resume_after_interruption(tmp_path, monkeypatch):
    root = tmp_path / "data"
    make_segmentation(root, "voc20", count=4)
    model = clip_surgery.wrap(make_vit(71))
    clean = runner.evaluate_segmentation(model, "voc20", root, method="raw", progress=False)
    calls = {"count": 0}
    original = runner.segment

    def flaky(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(runner, "segment", flaky)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        runner.evaluate_segmentation(model, "voc20", root, method="raw", out=out, progress=False)
    assert len(list(out.glob(".state-*.npz"))) == 1
    calls["count"] = -100  # no more interruptions
    resumed = runner.evaluate_segmentation(
        model, "voc20", root, method="raw", out=out, progress=False
    )
    assert calls["count"] == -100 + 2  # only the two images not done before
    assert resumed["miou"] == pytest.approx(clean["miou"])
    assert resumed["per_class_iou"] == clean["per_class_iou"]


def test_text_embeddings_computed_once_per_run(tmp_path, monkeypatch):
    root = tmp_path / "data"
    make_segmentation(root, "context59", count=3)
    model = clip_surgery.wrap(make_vit(72))
    calls = []
    original = model.query
    monkeypatch.setattr(model, "query", lambda *a, **k: calls.append(1) or original(*a, **k))
    runner.evaluate_segmentation(model, "context59", root, method="clip_surgery", progress=False)
    assert len(calls) == 1


def test_sliding_windows_cover_the_image():
    boxes = window_boxes(336, 500, 224, 112)
    assert boxes[0] == (0, 224, 0, 224) and boxes[-1] == (112, 336, 276, 500)
    covered = np.zeros((336, 500), bool)
    for y1, y2, x1, x2 in boxes:
        assert (y2 - y1, x2 - x1) == (224, 224)
        covered[y1:y2, x1:x2] = True
    assert covered.all()
    assert window_boxes(100, 150, 224, 112) == [(0, 100, 0, 150)]  # small image: one crop


def test_presets_record_every_setting():
    voc = preset_for("sclip", "voc21")
    assert (voc.short_side, voc.prob_threshold, voc.logit_scale, voc.area_threshold) == (
        336,
        0.1,
        65.0,
        0.1,
    )
    assert preset_for("sclip", "cityscapes").short_side == 560
    assert preset_for("clip_surgery", "voc21").window is None
    assert preset_for("naclip", "voc21").window is None and preset_for("naclip", "ade20k").window
    with pytest.raises(DatasetError, match="unknown preset"):
        preset_for("mine", "voc21")


def test_explainability_eval(tmp_path, capsys, vit_checkpoint):
    make_segmentation(tmp_path / "data", "voc21", count=2)
    argv = [
        "eval",
        "--dataset",
        "voc21",
        "--root",
        str(tmp_path / "data"),
        "--task",
        "explainability",
        "--checkpoint",
        vit_checkpoint,
        "--out",
        str(tmp_path / "out"),
        "--no-progress",
    ]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2].startswith("mSC: ") and lines[-1].startswith("mIoU: ")
    report = json.loads((tmp_path / "out/voc21-clip_surgery-explainability.json").read_text())
    assert report["pairs"] > 0 and report["threshold"] is not None


@pytest.mark.parametrize(
    "dataset, maker",
    [("voc2007", make_voc2007), ("coco2014", make_coco2014), ("nus_wide", make_nus_wide)],
)
def test_multilabel_readers_and_eval(tmp_path, capsys, vit_checkpoint, dataset, maker):
    labels = maker(tmp_path)
    data = multilabel_dataset(dataset, tmp_path)
    assert np.array_equal(data.labels, labels)
    assert len(data.samples) == len(labels) and all(s.image.is_file() for s in data.samples)
    argv = [
        "eval",
        "--dataset",
        dataset,
        "--root",
        str(tmp_path),
        "--checkpoint",
        vit_checkpoint,
        "--out",
        str(tmp_path / "out"),
        "--no-progress",
        "--method",
        "raw",
    ]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("mAP: ")
