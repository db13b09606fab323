"""Training-free open-vocabulary segmentation with any method (sliding windows, batched).

The window arithmetic, overlap averaging, logit scale, synonym max, area and background
thresholds follow SCLIP's segmentor (github.com/wangf3014/SCLIP, ``clip_segmentor.py``); the
optional PAMR refinement of the logits at the label size, guided by the resized image, follows
NACLIP's (github.com/sinahmr/NACLIP, ``naclip.py``; ``clip_surgery.refine``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .. import methods
from ..refine import check_refine, pamr

WINDOW_BATCH = 8


@dataclass(frozen=True)
class Preset:
    """How images are resized, windowed and turned into labels.

    ``short_side``: keep-ratio resize so the short side is this (long side capped at
    ``long_side``); or ``square``: resize the whole image to ``square x square``. ``window`` /
    ``stride``: sliding windows over the resized image (``None``: one forward of the whole image).
    Per pixel: softmax(``logit_scale`` x cosine) over all names, max over a class's names;
    classes covering less than ``area_threshold`` of the foreground and pixels whose top
    probability is below ``prob_threshold`` become class 0 (datasets with a background class).
    ``refine``: ``"pamr"`` refines the per-name logits at the label size before the softmax
    (``None``: no refinement). ``options``: method option values of the method the preset is
    named after (the user's own values take precedence).
    """

    name: str
    short_side: int | None = 336
    long_side: int = 2048
    square: int | None = None
    window: int | None = 224
    stride: int = 112
    logit_scale: float = 40.0
    prob_threshold: float = 0.0
    area_threshold: float | None = None
    templates: int = 80  # the first 80 default templates: OpenAI's ImageNet ensemble
    refine: str | None = None
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_refine(self.refine)

    def settings(self) -> dict:
        """Every value, for the results file."""
        return dataclasses.asdict(self)


@dataclass
class ClassQueries:
    """Text embeddings of every name and the class each name belongs to."""

    query: methods.TextQuery  # [Q, D] embeddings of every name
    class_of: torch.Tensor  # [Q] class index per name
    num_classes: int

    @classmethod
    def build(cls, model, classes: list[list[str]], templates) -> ClassQueries:
        """Encode every name of every class once."""
        names = [name for names in classes for name in names]
        class_of = torch.tensor([i for i, names in enumerate(classes) for _ in names])
        return cls(model.query(names, templates), class_of, len(classes))

    @property
    def embeddings(self) -> torch.Tensor:
        """The names' embeddings ``[Q, D]``."""
        return self.query.embeddings


def resize_for(image: Image.Image, preset: Preset) -> torch.Tensor:
    """The image as a normalised ``[3, h, w]`` tensor at the preset's size (bilinear, no antialias,
    like OpenCV's resize in MMSegmentation pipelines)."""
    array = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
    tensor = array.permute(2, 0, 1)[None]
    if preset.square:
        size = (preset.square, preset.square)
    else:
        height, width = tensor.shape[-2:]
        scale = min(preset.short_side / min(height, width), preset.long_side / max(height, width))
        size = (int(height * scale + 0.5), int(width * scale + 0.5))
    tensor = F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)[0]
    return tensor


def window_boxes(
    height: int, width: int, window: int, stride: int
) -> list[tuple[int, int, int, int]]:
    """(y1, y2, x1, x2) of every window, the last ones shifted back inside the image."""
    rows = max(height - window + stride - 1, 0) // stride + 1
    cols = max(width - window + stride - 1, 0) // stride + 1
    boxes = []
    for row in range(rows):
        for col in range(cols):
            y2, x2 = min(row * stride + window, height), min(col * stride + window, width)
            boxes.append((max(y2 - window, 0), y2, max(x2 - window, 0), x2))
    return boxes


def dense_logits(
    model, image: torch.Tensor, queries: ClassQueries, method: str, options, preset: Preset
) -> torch.Tensor:
    """Per-name logits ``[Q, h, w]`` over the resized image, windows averaged where they overlap."""
    normalised = _normalise(model, image)
    height, width = image.shape[-2:]
    if preset.window is None:
        boxes = [(0, height, 0, width)]
    else:
        boxes = window_boxes(height, width, preset.window, preset.stride)
    total = torch.zeros(len(queries.embeddings), height, width)
    count = torch.zeros(1, height, width)
    for begin in range(0, len(boxes), WINDOW_BATCH):
        chunk = boxes[begin : begin + WINDOW_BATCH]
        crops = torch.stack([normalised[:, y1:y2, x1:x2] for y1, y2, x1, x2 in chunk])
        scores = model.score(crops, queries.query, method, options)
        grid_h, grid_w = scores.grid
        logits = scores.token_scores.transpose(1, 2).reshape(len(chunk), -1, grid_h, grid_w)
        logits = F.interpolate(
            logits.float().cpu(), size=crops.shape[-2:], mode="bilinear", align_corners=False
        )
        for (y1, y2, x1, x2), window_logits in zip(chunk, logits, strict=True):
            total[:, y1:y2, x1:x2] += window_logits
            count[:, y1:y2, x1:x2] += 1
    return total / count


def _normalise(model, image: torch.Tensor) -> torch.Tensor:
    mean, std = model.normalization
    return (image - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def class_probabilities(
    logits: torch.Tensor,
    queries: ClassQueries,
    preset: Preset,
    size: tuple[int, int],
    guide: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-class probabilities ``[C, H, W]`` at the label size: upsample, refine (with the
    normalised image ``guide`` ``[3, h, w]``), softmax, synonym max."""
    logits = F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]
    if preset.refine == "pamr":
        if guide is None:
            raise ValueError("PAMR refinement needs the image")
        guide = F.interpolate(guide[None], size=size, mode="bilinear", align_corners=False)
        logits = pamr(guide, logits[None])[0]
    probabilities = (logits * preset.logit_scale).softmax(dim=0)
    if len(queries.class_of) == queries.num_classes:
        return probabilities
    per_class = torch.full((queries.num_classes, *size), -1.0)
    for index in range(queries.num_classes):
        members = probabilities[queries.class_of == index]
        per_class[index] = members.max(dim=0).values
    return per_class


def predict(probabilities: torch.Tensor, preset: Preset) -> np.ndarray:
    """Labels ``[H, W]``: area threshold, argmax, background threshold (class 0)."""
    probabilities = probabilities.clone()
    if preset.area_threshold is not None:
        winners = probabilities.argmax(dim=0)
        areas = torch.bincount(winners.flatten(), minlength=len(probabilities))[1:].float()
        keep = (areas > preset.area_threshold * areas.sum()).float()
        probabilities[1:] *= keep.view(-1, 1, 1)
    top, labels = probabilities.max(dim=0)
    labels[top < preset.prob_threshold] = 0
    return labels.numpy().astype(np.uint8)


def method_options(method: str, preset: Preset, options=None):
    """Typed options: ``options`` when typed already; else the values of the preset named after
    ``method`` overridden by the dict ``options`` (strings allowed, as from the command line)."""
    chosen = methods.get(method)
    if options is not None and not isinstance(options, dict):
        return options
    defaults = preset.options if preset.name == chosen.name else {}
    return chosen.options(**{**defaults, **(options or {})})


def segment(
    model,
    image: Image.Image,
    queries: ClassQueries,
    method: str = "clip_surgery",
    options=None,
    preset: Preset | None = None,
) -> tuple[np.ndarray, torch.Tensor]:
    """Label map ``[H, W]`` (image size) and class probabilities ``[C, H, W]`` for one image.

    ``options``: the method's typed options, or a dict of values over the preset's own.
    """
    preset = preset or Preset("sclip")
    options = method_options(method, preset, options)
    resized = resize_for(image, preset)
    logits = dense_logits(model, resized, queries, method, options, preset)
    guide = _normalise(model, resized) if preset.refine else None
    size = (image.height, image.width)
    probabilities = class_probabilities(logits, queries, preset, size, guide)
    return predict(probabilities, preset), probabilities
