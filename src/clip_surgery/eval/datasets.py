"""Dataset readers for the on-disk layouts users already have (MMSegmentation convention).

Layouts and label conventions: docs/protocols.md; class names (with synonyms) are package
data in ``clip_surgery/data/classes``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DatasetError

IGNORE = 255


@dataclass(frozen=True)
class Sample:
    """One image and its label file; ``key`` names predictions (``<key>.png``)."""

    key: str
    image: Path
    label: Path | None


@dataclass(frozen=True)
class SegmentationDataset:
    """Where a segmentation dataset's images and labels are below its root, and how to read them."""

    name: str
    images: str
    labels: str
    image_suffix: str
    label_suffix: str
    split: str | None = None
    reduce_zero_label: bool = False
    background: bool = False  # class 0 is background: low-confidence pixels become 0
    nested: bool = False  # images in one sub-folder per city (Cityscapes)

    @property
    def classes(self) -> list[list[str]]:
        """Each class's names (first is its name, the rest synonyms)."""
        return class_names(self.name)

    def samples(self, root: str | Path) -> list[Sample]:
        """Every (image, label) pair under ``root``; DatasetError says what is missing where."""
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"dataset root not found: {root}")
        image_dir, label_dir = root / self.images, root / self.labels
        for folder, what in ((image_dir, "images"), (label_dir, "labels")):
            if not folder.is_dir():
                raise DatasetError(
                    f"{self.name}: expected {what} in {folder} (layout: {self.layout()})"
                )
        keys = self._keys(root, image_dir)
        if not keys:
            raise DatasetError(
                f"{self.name}: no images ending in {self.image_suffix} in {image_dir}"
            )
        samples = []
        for key in keys:
            image = image_dir / f"{key}{self.image_suffix}"
            label = label_dir / f"{key}{self.label_suffix}"
            for path, what in ((image, "image"), (label, "label")):
                if not path.is_file():
                    raise DatasetError(f"{self.name}: expected {what} file {path} for {key!r}")
            samples.append(Sample(key, image, label))
        return samples

    def _keys(self, root: Path, image_dir: Path) -> list[str]:
        if self.split is not None:
            split = root / self.split
            if not split.is_file():
                raise DatasetError(f"{self.name}: expected the split list {split}")
            return [line.strip() for line in split.read_text().splitlines() if line.strip()]
        pattern = f"*/*{self.image_suffix}" if self.nested else f"*{self.image_suffix}"
        found = sorted(image_dir.glob(pattern))
        return [str(p.relative_to(image_dir))[: -len(self.image_suffix)] for p in found]

    def read_label(self, path: Path) -> np.ndarray:
        """Class indices ``[H, W]`` (uint8), IGNORE where unlabelled."""
        try:
            with Image.open(path) as label:
                if label.mode not in ("P", "L", "I", "I;16"):
                    raise DatasetError(f"{path}: labels must be single-channel, got {label.mode}")
                array = np.asarray(label).astype(np.int64)
        except (OSError, ValueError) as error:
            raise DatasetError(f"cannot read label {path}: {error}") from error
        ignored = array == IGNORE
        if self.reduce_zero_label:  # label 0 (background) is ignored, the rest shift down by one
            array = array - 1
        array[ignored | (array < 0) | (array >= len(self.classes))] = IGNORE
        return array.astype(np.uint8)

    def layout(self) -> str:
        """A one-line description of the expected layout."""
        split = f", split list {self.split}" if self.split else ""
        return (
            f"{self.images}/<id>{self.image_suffix}, {self.labels}/<id>{self.label_suffix}{split}"
        )


VOC12 = "VOCdevkit/VOC2012"
VOC10 = "VOCdevkit/VOC2010"
SEGMENTATION = {
    spec.name: spec
    for spec in (
        SegmentationDataset(
            "voc21",
            f"{VOC12}/JPEGImages",
            f"{VOC12}/SegmentationClass",
            ".jpg",
            ".png",
            f"{VOC12}/ImageSets/Segmentation/val.txt",
            background=True,
        ),
        SegmentationDataset(
            "voc20",
            f"{VOC12}/JPEGImages",
            f"{VOC12}/SegmentationClass",
            ".jpg",
            ".png",
            f"{VOC12}/ImageSets/Segmentation/val.txt",
            reduce_zero_label=True,
        ),
        SegmentationDataset(
            "context60",
            f"{VOC10}/JPEGImages",
            f"{VOC10}/SegmentationClassContext",
            ".jpg",
            ".png",
            f"{VOC10}/ImageSets/SegmentationContext/val.txt",
            background=True,
        ),
        SegmentationDataset(
            "context59",
            f"{VOC10}/JPEGImages",
            f"{VOC10}/SegmentationClassContext",
            ".jpg",
            ".png",
            f"{VOC10}/ImageSets/SegmentationContext/val.txt",
            reduce_zero_label=True,
        ),
        SegmentationDataset(
            "coco_object",
            "coco_object/images/val2017",
            "coco_object/annotations/val2017",
            ".jpg",
            "_instanceTrainIds.png",
            background=True,
        ),
        SegmentationDataset(
            "coco_stuff",
            "coco_stuff164k/images/val2017",
            "coco_stuff164k/annotations/val2017",
            ".jpg",
            "_labelTrainIds.png",
        ),
        SegmentationDataset(
            "cityscapes",
            "cityscapes/leftImg8bit/val",
            "cityscapes/gtFine/val",
            "_leftImg8bit.png",
            "_gtFine_labelTrainIds.png",
            nested=True,
        ),
        SegmentationDataset(
            "synthetic",
            f"{VOC12}/JPEGImages",
            f"{VOC12}/SegmentationClass",
            ".png",
            ".png",
            f"{VOC12}/ImageSets/Segmentation/val.txt",
            background=True,
        ),
        SegmentationDataset(
            "ade20k",
            "ade/ADEChallengeData2016/images/validation",
            "ade/ADEChallengeData2016/annotations/validation",
            ".jpg",
            ".png",
            reduce_zero_label=True,
        ),
    )
}


@cache
def class_names(name: str) -> list[list[str]]:
    """The class list of a dataset: one list of names per class."""
    text = files("clip_surgery").joinpath(f"data/classes/{name}.txt").read_text(encoding="utf-8")
    return [
        [n.strip() for n in line.split(",") if n.strip()]
        for line in text.splitlines()
        if line.strip()
    ]


def segmentation_dataset(name: str) -> SegmentationDataset:
    """The segmentation dataset called ``name``."""
    try:
        return SEGMENTATION[name]
    except KeyError:
        known = ", ".join([*SEGMENTATION, *MULTILABEL])
        raise DatasetError(f"unknown dataset {name!r}; known: {known}") from None


# ---------------------------------------------------------------- multi-label


@dataclass(frozen=True)
class MultiLabelSet:
    """Images and a label matrix ``[N, C]``: 1 present, 0 absent, -1 ignored (VOC difficult)."""

    name: str
    classes: list[list[str]]
    samples: list[Sample]
    labels: np.ndarray


def _check_file(path: Path, name: str, what: str) -> Path:
    if not path.is_file():
        raise DatasetError(f"{name}: expected {what} {path}")
    return path


def read_voc2007(root: Path, split: str = "test") -> MultiLabelSet:
    """VOCdevkit/VOC2007: JPEGImages, ImageSets/Main/<class>_<split>.txt (1, -1, 0 difficult)."""
    base = root / "VOCdevkit/VOC2007"
    classes = class_names("voc2007")
    columns, keys = [], None
    for names in classes:
        listing = _check_file(
            base / f"ImageSets/Main/{names[0]}_{split}.txt", "voc2007", "the class list"
        )
        rows = [line.split() for line in listing.read_text().splitlines() if line.strip()]
        if keys is None:
            keys = [row[0] for row in rows]
        elif [row[0] for row in rows] != keys:
            raise DatasetError(f"voc2007: {listing} lists other images than the first class file")
        columns.append([{"1": 1, "-1": 0, "0": -1}.get(row[1], 0) for row in rows])
    samples = [
        Sample(k, _check_file(base / f"JPEGImages/{k}.jpg", "voc2007", "image"), None) for k in keys
    ]
    return MultiLabelSet("voc2007", classes, samples, np.array(columns, dtype=np.int64).T)


def read_coco2014(root: Path) -> MultiLabelSet:
    """annotations/instances_val2014.json and the val2014/ images it names."""
    import json

    annotation = _check_file(
        root / "annotations/instances_val2014.json", "coco2014", "the annotation file"
    )
    data = json.loads(annotation.read_text())
    category_ids = sorted(category["id"] for category in data["categories"])
    column = {category_id: index for index, category_id in enumerate(category_ids)}
    images = sorted(data["images"], key=lambda image: image["id"])
    row = {image["id"]: index for index, image in enumerate(images)}
    labels = np.zeros((len(images), len(category_ids)), dtype=np.int64)
    for item in data["annotations"]:
        labels[row[item["image_id"]], column[item["category_id"]]] = 1
    samples = [
        Sample(
            Path(image["file_name"]).stem,
            _check_file(root / "val2014" / image["file_name"], "coco2014", "image"),
            None,
        )
        for image in images
    ]
    return MultiLabelSet("coco2014", class_names("coco2014"), samples, labels)


def read_nus_wide(root: Path) -> MultiLabelSet:
    """NUS-WIDE: ImageList/TestImagelist.txt, Flickr/, Groundtruth/TrainTestLabels/."""
    listing = _check_file(root / "ImageList/TestImagelist.txt", "nus_wide", "the image list")
    concepts_file = root / "Concepts81.txt"
    if concepts_file.is_file():
        classes = [
            [line.strip()] for line in concepts_file.read_text().splitlines() if line.strip()
        ]
    else:
        classes = class_names("nus_wide")
    relative = [
        line.strip().replace("\\", "/") for line in listing.read_text().splitlines() if line.strip()
    ]
    columns = []
    for names in classes:
        labels_file = _check_file(
            root / f"Groundtruth/TrainTestLabels/Labels_{names[0]}_Test.txt",
            "nus_wide",
            "the label file",
        )
        values = [int(v) for v in labels_file.read_text().split()]
        if len(values) != len(relative):
            raise DatasetError(
                f"nus_wide: {labels_file} has {len(values)} rows, the image list {len(relative)}"
            )
        columns.append(values)
    samples = [
        Sample(
            path.replace("/", "_").rsplit(".", 1)[0],
            _check_file(root / "Flickr" / path, "nus_wide", "image"),
            None,
        )
        for path in relative
    ]
    return MultiLabelSet("nus_wide", classes, samples, np.array(columns, dtype=np.int64).T)


MULTILABEL = {"voc2007": read_voc2007, "coco2014": read_coco2014, "nus_wide": read_nus_wide}


def multilabel_dataset(name: str, root: str | Path) -> MultiLabelSet:
    """Read the multi-label dataset called ``name`` under ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root not found: {root}")
    return MULTILABEL[name](root)
