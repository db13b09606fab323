"""Downstream tasks: points and SAM prompts, multi-label scores, word explanations."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_vit, photo
from PIL import Image

import clip_surgery
from clip_surgery.cli import main
from clip_surgery.points import (
    box_from_map,
    instance_prompts,
    otsu_threshold,
    points_for_targets,
    points_from_map,
)
from clip_surgery.tasks import sam
from clip_surgery.tasks.classify import class_scores, ranked
from clip_surgery.tasks.words import explain_words


@pytest.fixture(scope="module")
def model():
    return clip_surgery.wrap(make_vit(81))


# ------------------------------------------------------------------ points


def two_blobs() -> torch.Tensor:
    grid = torch.zeros(16, 16)
    grid[2:6, 2:6] = 1.0
    grid[10:14, 9:13] = 0.95
    return grid


def test_instances_give_one_prompt_per_region():
    prompts = instance_prompts(two_blobs(), (160, 160))
    assert len(prompts) == 2
    peaks = [tuple(points[0]) for points, _ in prompts]
    assert 20 <= peaks[0][0] <= 60 and 20 <= peaks[0][1] <= 60  # the first blob (x, y)
    assert 90 <= peaks[1][0] <= 130 and 100 <= peaks[1][1] <= 140  # the second
    for points, labels in prompts:
        assert labels[0] == 1 and (labels[1:] == 0).all() and len(points) == len(labels)


def test_otsu_threshold_splits_a_bimodal_map():
    values = torch.cat([torch.full((50,), 0.1), torch.full((30,), 0.9)])
    assert 0.1 < otsu_threshold(values) <= 0.9
    grid = two_blobs()
    grid[6:10, 6:10] = 0.5  # a middle level the fixed 0.8 leaves out
    cells = F.interpolate(grid[None, None], size=(8, 8), mode="bilinear", align_corners=False)
    cells = cells.flatten()
    cells = (cells - cells.min()) / (cells.max() - cells.min())
    cutoff = otsu_threshold(cells)
    expected = min(int((cells >= cutoff).sum()), 32)
    points, labels = points_from_map(grid, (160, 160), threshold="otsu")
    assert int(labels.sum()) == expected == int((labels == 0).sum()) and expected > 1
    assert expected != int(points_from_map(grid, (160, 160))[1].sum())  # differs from 0.8
    with pytest.raises(ValueError, match="otsu"):
        points_from_map(two_blobs(), (160, 160), threshold="auto")


def test_max_points_keeps_the_strongest():
    grid = torch.linspace(0, 1, 256).reshape(16, 16)
    full_points, full_labels = points_from_map(grid, (64, 64), threshold=0.5)
    capped_points, capped_labels = points_from_map(grid, (64, 64), threshold=0.5, max_points=4)
    assert len(capped_points) == 4 and capped_labels.tolist() == [1, 1, 0, 0]
    positives = full_points[full_labels == 1]
    assert (capped_points[:2] == positives[-2:]).all()  # the two highest cells


def test_box_known_answer():
    grid = torch.zeros(8, 8)
    grid[2:4, 4:8] = 1.0  # cells (rows 1, cols 2-3) after 2x downsampling
    box = box_from_map(grid, (80, 80))
    assert box.tolist() == [40.0, 20.0, 79.0, 39.0]
    assert box_from_map(torch.zeros(8, 8), (80, 80)) is None


# ------------------------------------------------------------------ SAM


class FakePredictor:
    """Obeys the predictor protocol: a disk around positive points, or the box."""

    def __init__(self):
        self.images, self.calls = [], []

    def set_image(self, image):
        self.images.append(image.shape)
        self.shape = image.shape[:2]

    def predict(self, point_coords=None, point_labels=None, box=None, multimask_output=True):
        self.calls.append((point_coords, point_labels, box))
        ys, xs = np.mgrid[0 : self.shape[0], 0 : self.shape[1]]
        mask = np.zeros(self.shape, bool)
        for (x, y), label in zip(point_coords, point_labels, strict=True):
            if label == 1:
                mask |= (xs - x) ** 2 + (ys - y) ** 2 <= 25
        if box is not None:
            x0, y0, x1, y1 = box
            mask |= (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
        return np.stack([mask, ~mask]), np.array([0.9, 0.1]), None


def test_segment_text_uses_the_maps_points(model):
    image = photo((96, 64), seed=2)
    predictor = FakePredictor()
    result = sam.segment_text(model, predictor, image, "a cat")
    maps = sam.grid_maps(model, image, ["a cat"], "clip_surgery", None)
    points, labels = points_from_map(maps[0], (64, 96))
    assert np.array_equal(result.points, points) and np.array_equal(result.labels, labels)
    assert predictor.images == [(64, 96, 3)] and len(predictor.calls) == 1
    assert result.mask.shape == (64, 96) and result.mask.any() and result.score == 0.9


def test_segment_combined_target_box_and_instances(model):
    image = photo((64, 64), seed=3)
    predictor = FakePredictor()
    combined = sam.segment_text(model, predictor, image, "person+bench", use_box=True)
    maps = sam.grid_maps(model, image, ["person", "bench"], "clip_surgery", None)
    points, labels = points_for_targets(maps, (64, 64))
    assert np.array_equal(combined.points, points) and np.array_equal(combined.labels, labels)
    assert combined.box is not None and predictor.calls[-1][2] is not None
    several = sam.segment_text(model, FakePredictor(), image, "dog", instances=True, threshold=0.5)
    assert len(several.instances) >= 1
    assert np.array_equal(several.mask, np.any(several.instances, axis=0))


def test_segment_cli_with_fake_predictor(tmp_path, monkeypatch, capsys, vit_checkpoint):
    monkeypatch.setattr(sam, "load_predictor", lambda *a, **k: FakePredictor())
    image = tmp_path / "img.png"
    photo((80, 60)).save(image)
    checkpoint = tmp_path / "sam.pth"
    checkpoint.write_bytes(b"unused by the fake")
    argv = [
        "segment",
        str(image),
        "-t",
        "a cat",
        "person+bench",
        "--sam-checkpoint",
        str(checkpoint),
        "--checkpoint",
        vit_checkpoint,
        "--out",
        str(tmp_path / "out"),
        "--box",
        "--threshold",
        "otsu",
    ]
    assert main(argv) == 0
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == [
        "img_a-cat_mask.png",
        "img_a-cat_sam.png",
        "img_person-bench_mask.png",
        "img_person-bench_sam.png",
    ]
    mask = np.asarray(Image.open(tmp_path / "out/img_a-cat_mask.png"))
    assert mask.shape == (60, 80) and set(np.unique(mask)) <= {0, 255}
    assert "a cat: mask of" in capsys.readouterr().out


def test_sam_errors(tmp_path):
    with pytest.raises(clip_surgery.InputFileError, match="SAM checkpoint not found"):
        sam.load_predictor(tmp_path / "none.pth")
    (tmp_path / "x.pth").write_bytes(b"")
    with pytest.raises(clip_surgery.ModelError, match="unknown SAM type"):
        sam.load_predictor(tmp_path / "x.pth", "vit_z")


@pytest.mark.slow
def test_random_sam_end_to_end(model, tmp_path):
    """segment-anything's smallest SAM (vit_b), randomly initialised, behind the same protocol."""
    from segment_anything import SamPredictor, sam_model_registry

    torch.manual_seed(0)
    predictor = SamPredictor(sam_model_registry["vit_b"](checkpoint=None).eval())
    image = photo((96, 64), seed=5)
    result = sam.segment_text(model, predictor, image, "a red ball", use_box=True)
    assert result.mask.shape == (64, 96) and result.mask.dtype == bool
    assert np.isfinite(result.score)
    picture = sam.mask_overlay(image, result)
    assert picture.size == (96, 64)


# ------------------------------------------------------------------ multi-label


def test_class_scores_plain_and_surgery(model):
    images = [photo(seed=6), photo(seed=7)]
    labels = ["cat", "dog", "car"]
    batch = torch.stack([model.preprocess(i) for i in images])
    text = model.encode_text(labels)
    plain = F.normalize(model.encode_image(batch, surgery=False), dim=-1)
    expected = (model.logit_scale * plain[:, 0] @ text.T).softmax(dim=-1)
    assert torch.allclose(class_scores(model, images, labels, surgery=False), expected, atol=1e-5)
    tokens = F.normalize(model.encode_image(batch), dim=-1)
    local = (model.logit_scale * tokens[:, 1:] @ text.T).softmax(dim=-1).max(dim=1).values
    surgery = class_scores(model, images, labels)
    assert torch.allclose(surgery, expected + local, atol=1e-5)
    ranking = ranked(surgery[0], labels)
    assert [score for _, score in ranking] == sorted(surgery[0].tolist(), reverse=True)


def test_classify_cli(tmp_path, capsys, vit_checkpoint):
    image = tmp_path / "img.png"
    photo().save(image)
    argv = [
        "classify",
        str(image),
        "--labels",
        "cat",
        "dog",
        "--checkpoint",
        vit_checkpoint,
        "--json",
    ]
    assert main(argv) == 0
    ranking = json.loads(capsys.readouterr().out)
    assert {r["label"] for r in ranking} == {"cat", "dog"}
    assert ranking[0]["score"] >= ranking[1]["score"]


# ------------------------------------------------------------------ words


def test_word_importances_sum_and_recompute(model):
    image = photo(seed=8)
    caption = "a red ball on green grass"
    result = explain_words(model, image, caption)
    assert result.words == caption.split() and result.maps.shape == (6, 224, 224)
    if any(d > 0 for d in result.drops):
        assert sum(result.shares) == pytest.approx(1.0)
    assert all(s >= 0 for s in result.shares)
    embedding = F.normalize(model.encode_image(model.preprocess(image)[None]), dim=-1)[0, 0]
    without = model.encode_text(["a ball on green grass"], templates=None)[0]
    full = model.encode_text([caption], templates=None)[0]
    assert result.drops[1] == pytest.approx(float(embedding @ full - embedding @ without), abs=1e-5)
    assert result.cosine == pytest.approx(float(embedding @ full), abs=1e-5)
    assert torch.isfinite(result.maps).all() and result.maps.max() <= 1


def test_explain_text_cli_writes_the_figure(tmp_path, capsys, vit_checkpoint):
    image = tmp_path / "img.png"
    photo((90, 70)).save(image)
    argv = [
        "explain-text",
        str(image),
        "--caption",
        "a small dog",
        "--checkpoint",
        vit_checkpoint,
        "--out",
        str(tmp_path / "out"),
        "--json",
    ]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert [w["word"] for w in report["words"]] == ["a", "small", "dog"]
    assert Image.open(report["figure"]).format == "PNG"
