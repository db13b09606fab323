"""Tiny datasets in every on-disk layout the evaluation harness reads (generated, seeded)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from clip_surgery.eval.datasets import SEGMENTATION, class_names


def _image(path: Path, rng, size=(64, 48)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _label(path: Path, rng, classes: int, size=(64, 48), palette: bool = False) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    values = rng.integers(0, classes, (size[1], size[0]), dtype=np.uint8)
    values[:3, :5] = 255  # some ignored pixels
    picture = Image.fromarray(values, mode="L")
    if palette:
        picture = picture.convert("P")
        picture.putpalette(list(rng.integers(0, 256, 768)))
    picture.save(path)
    return values


def make_segmentation(root: Path, name: str, count: int = 3, seed: int = 0) -> list[str]:
    """Write ``count`` images and labels of dataset ``name`` under ``root``; returns the keys."""
    spec = SEGMENTATION[name]
    rng = np.random.default_rng(seed)
    raw_classes = len(class_names(name)) + (1 if spec.reduce_zero_label else 0)
    keys = [f"city{i % 2}/img{i}" if spec.nested else f"img{i}" for i in range(count)]
    for key in keys:
        _image(root / spec.images / f"{key}{spec.image_suffix}", rng)
        _label(
            root / spec.labels / f"{key}{spec.label_suffix}",
            rng,
            raw_classes,
            palette=name.startswith("voc"),
        )
    if spec.split:
        (root / spec.split).parent.mkdir(parents=True, exist_ok=True)
        (root / spec.split).write_text("\n".join(keys) + "\n")
    return keys


def make_voc2007(root: Path, count: int = 4, seed: int = 0) -> np.ndarray:
    """VOC2007 test lists: returns the label matrix written (1, 0, -1 for difficult)."""
    rng = np.random.default_rng(seed)
    base = root / "VOCdevkit/VOC2007"
    keys = [f"{i:06d}" for i in range(count)]
    labels = rng.choice([1, 0, 0, -1], size=(count, 20))
    labels[0, :] = 1  # every class has a positive
    for key in keys:
        _image(base / f"JPEGImages/{key}.jpg", rng)
    marks = {1: " 1", 0: "-1", -1: " 0"}
    for column, names in enumerate(class_names("voc2007")):
        text = "\n".join(f"{key} {marks[labels[row, column]]}" for row, key in enumerate(keys))
        path = base / f"ImageSets/Main/{names[0]}_test.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return labels


def make_coco2014(root: Path, count: int = 3, seed: int = 0) -> np.ndarray:
    """instances_val2014.json with category ids in COCO's sparse numbering."""
    rng = np.random.default_rng(seed)
    category_ids = list(range(1, 91))[:80]
    images, annotations = [], []
    labels = np.zeros((count, 80), dtype=np.int64)
    for index in range(count):
        name = f"COCO_val2014_{index:012d}.jpg"
        _image(root / "val2014" / name, rng)
        images.append({"id": 100 - index, "file_name": name})
        for column in rng.choice(80, size=3, replace=False):
            annotations.append({"image_id": 100 - index, "category_id": category_ids[column]})
    order = sorted(range(count), key=lambda i: 100 - i)
    for row, index in enumerate(order):
        for item in annotations:
            if item["image_id"] == 100 - index:
                labels[row, category_ids.index(item["category_id"])] = 1
    data = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c, "name": str(c)} for c in category_ids],
    }
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations/instances_val2014.json").write_text(json.dumps(data))
    return labels


def make_nus_wide(root: Path, count: int = 3, seed: int = 0) -> np.ndarray:
    """ImageList, Flickr images and per-concept label files (Windows separators, as shipped)."""
    rng = np.random.default_rng(seed)
    concepts = [names[0] for names in class_names("nus_wide")]
    relative = [f"animal\\{i:04d}_123.jpg" for i in range(count)]
    for path in relative:
        _image(root / "Flickr" / path.replace("\\", "/"), rng)
    (root / "ImageList").mkdir(parents=True, exist_ok=True)
    (root / "ImageList/TestImagelist.txt").write_text("\n".join(relative) + "\n")
    labels = rng.integers(0, 2, size=(count, len(concepts)))
    folder = root / "Groundtruth/TrainTestLabels"
    folder.mkdir(parents=True, exist_ok=True)
    for column, concept in enumerate(concepts):
        values = "\n".join(str(v) for v in labels[:, column])
        (folder / f"Labels_{concept}_Test.txt").write_text(values + "\n")
    return labels
