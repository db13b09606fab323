"""Dataset readers for the on-disk layouts users already have (MMSegmentation convention).

Layouts and label conventions: docs/protocols.md; class names (with synonyms) are package
data in ``clip_surgery/data/classes``.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
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
            keys = [line.strip() for line in _read_text(split).splitlines() if line.strip()]
            _check_unique(keys, split)
            return keys
        pattern = f"*/*{self.image_suffix}" if self.nested else f"*{self.image_suffix}"
        found = sorted(image_dir.glob(pattern))
        return [str(p.relative_to(image_dir))[: -len(self.image_suffix)] for p in found]

    def read_label(self, path: Path) -> np.ndarray:
        """Class indices ``[H, W]`` (uint8), IGNORE where unlabelled; DatasetError naming the
        file for an unreadable label or a value outside the class range."""
        array = read_index_png(path, "label")
        ignored = array == IGNORE
        if self.reduce_zero_label:  # label 0 (background) is ignored, the rest shift down by one
            array = array - 1
            ignored |= array < 0
        outside = ~ignored & ((array < 0) | (array >= len(self.classes)))
        if outside.any():
            value = int(array[outside][0]) + (1 if self.reduce_zero_label else 0)
            raise DatasetError(
                f"{path}: label value {value} is outside {self.name}'s classes "
                f"({self.value_range()}, 255 = ignored)"
            )
        array[ignored] = IGNORE
        return array.astype(np.uint8)

    def value_range(self) -> str:
        """The label values this dataset's files hold, in words."""
        count = len(self.classes)
        if self.reduce_zero_label:
            return f"1..{count}, 0 = ignored"
        return f"0..{count - 1}"

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


def read_index_png(path: Path, what: str) -> np.ndarray:
    """A single-channel index PNG as int64 ``[H, W]``; DatasetError naming the file otherwise."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as picture:
                if picture.mode not in ("P", "L", "I", "I;16"):
                    raise DatasetError(
                        f"{path}: a {what} must be a single-channel index image, got mode "
                        f"{picture.mode}"
                    )
                return np.asarray(picture).astype(np.int64)
    except DatasetError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombWarning) as error:
        detail = " ".join(str(error).split())[:120]
        raise DatasetError(f"cannot read {what} {path}: {detail}") from None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"cannot read {path}: {error}") from None


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
    if name in MULTILABEL:
        raise DatasetError(
            f"{name} is a multi-label dataset; segmentation (and score) takes one of: "
            f"{', '.join(SEGMENTATION)}"
        )
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


def _check_unique(items: list[str], source: Path) -> None:
    repeated = sorted(item for item, count in Counter(items).items() if count > 1)
    if repeated:
        raise DatasetError(
            f"{source}: {len(repeated)} entr(ies) listed more than once, e.g. {repeated[0]!r} "
            "(each image must be scored once)"
        )


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
        rows = [line.split() for line in _read_text(listing).splitlines() if line.strip()]
        values = {"1": 1, "-1": 0, "0": -1}
        for number, row in enumerate(rows, start=1):
            if len(row) != 2 or row[1] not in values:
                raise DatasetError(f"{listing}, line {number}: expected '<image id> 1|-1|0'")
        if keys is None:
            keys = [row[0] for row in rows]
            _check_unique(keys, listing)
        elif [row[0] for row in rows] != keys:
            raise DatasetError(f"voc2007: {listing} lists other images than the first class file")
        columns.append([values[row[1]] for row in rows])
    if not keys:
        raise DatasetError(f"voc2007: {listing} lists no images")
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
    try:
        data = json.loads(_read_text(annotation))
        category_ids = sorted(category["id"] for category in data["categories"])
        column = {category_id: index for index, category_id in enumerate(category_ids)}
        images = sorted(data["images"], key=lambda image: image["id"])
        row = {image["id"]: index for index, image in enumerate(images)}
        labels = np.zeros((len(images), len(category_ids)), dtype=np.int64)
        for item in data["annotations"]:
            labels[row[item["image_id"]], column[item["category_id"]]] = 1
        names = [image["file_name"] for image in images]
    except (ValueError, KeyError, TypeError) as error:
        raise DatasetError(
            f"{annotation}: not a COCO instances file ({type(error).__name__}: {error})"
        ) from None
    if len(category_ids) != len(class_names("coco2014")) or not images:
        raise DatasetError(
            f"{annotation}: expected 80 categories and some images, found "
            f"{len(category_ids)} and {len(images)}"
        )
    _check_unique(names, annotation)
    samples = [
        Sample(Path(name).stem, _check_file(root / "val2014" / name, "coco2014", "image"), None)
        for name in names
    ]
    return MultiLabelSet("coco2014", class_names("coco2014"), samples, labels)


def read_nus_wide(root: Path) -> MultiLabelSet:
    """NUS-WIDE: ImageList/TestImagelist.txt, Flickr/, Groundtruth/TrainTestLabels/."""
    listing = _check_file(root / "ImageList/TestImagelist.txt", "nus_wide", "the image list")
    concepts_file = root / "Concepts81.txt"
    if concepts_file.is_file():
        lines = _read_text(concepts_file).splitlines()
        classes = [[line.strip()] for line in lines if line.strip()]
        if not classes:
            raise DatasetError(f"{concepts_file}: no concept names (one per line expected)")
        _check_unique([names[0] for names in classes], concepts_file)
        for names in classes:
            if not re.fullmatch(r"[\w ()'&.-]+", names[0]):
                raise DatasetError(f"{concepts_file}: {names[0]!r} is not a concept name")
    else:
        classes = class_names("nus_wide")
    relative = [
        line.strip().replace("\\", "/") for line in _read_text(listing).splitlines() if line.strip()
    ]
    if not relative:
        raise DatasetError(f"{listing} lists no images")
    _check_unique(relative, listing)
    columns = []
    for names in classes:
        labels_file = _check_file(
            root / f"Groundtruth/TrainTestLabels/Labels_{names[0]}_Test.txt",
            "nus_wide",
            "the label file",
        )
        try:
            values = [int(v) for v in _read_text(labels_file).split()]
        except ValueError:
            raise DatasetError(f"{labels_file}: expected one 0 or 1 per line") from None
        if set(values) - {0, 1}:
            raise DatasetError(f"{labels_file}: expected one 0 or 1 per line")
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
