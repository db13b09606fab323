"""Faithfulness without masks: RISE's deletion and insertion curves and their areas.

Petsiuk, Das and Saenko, "RISE: Randomized Input Sampling for Explanation of Black-box
Models", BMVC 2018; code github.com/eclique/RISE (``evaluation.py``). Pixels are taken in
order of decreasing map value (ties in raster order). **Deletion** starts from the image and
replaces ``ceil(H W / steps)`` more pixels by the baseline at each step; **insertion** starts
from the baseline and puts the image's pixels back in the same order. The model's score is
read at every step (``steps + 1`` points, both ends included) and the area under the curve is
the trapezoid rule over ``[0, 1]`` (RISE's ``auc``). A faithful map gives a low deletion area
and a high insertion area. Scores in ``[0, 1]`` (probabilities) give areas in ``[0, 1]``.

Baselines, on the normalised input: ``mean``, zeros, i.e. the normalisation mean colour
(RISE deletes to zeros of its normalised tensors); ``blur``, a Gaussian blur of the image,
kernel 11, sigma 5, zero padding (RISE's insertion substrate, ``gkern(11, 5)``; the kernel is
the sampled, normalised Gaussian). ``rise`` uses ``mean`` for deletion and ``blur`` for
insertion, as RISE. RISE moves 224 pixels per step at 224 x 224 (224 steps); the step count
here is a parameter (default 20) because every step costs a forward pass.

pytorch-grad-cam's ``metrics`` (github.com/jacobgil/pytorch-grad-cam) is not used: it offers
the confidence change after removing the pixels above one or several percentiles and ROAD's
noisy linear imputation, not RISE's deletion and insertion curves, and it needs OpenCV and
SciPy, which this package does not depend on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import OptionError

Baseline = Literal["blur", "mean"]
BASELINES = ("rise", "blur", "mean")
DEFAULT_STEPS = 20
BLUR_SIZE, BLUR_SIGMA = 11, 5.0
Scorer = Callable[[Tensor], Tensor]
"""``images [K, 3, H, W] -> scores [K]`` (the model's score of the explained text)."""


def baselines(name: str) -> tuple[Baseline, Baseline]:
    """The (deletion, insertion) baselines of ``name`` (``rise``, ``blur`` or ``mean``)."""
    if name not in BASELINES:
        raise OptionError(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}")
    return ("mean", "blur") if name == "rise" else (name, name)


def blurred(image: Tensor) -> Tensor:
    """Gaussian blur (kernel 11, sigma 5, zero padding) of ``[3, H, W]``, channel by channel."""
    x = torch.arange(BLUR_SIZE, dtype=torch.float32, device=image.device) - BLUR_SIZE // 2
    line = torch.exp(-(x**2) / (2 * BLUR_SIGMA**2))
    kernel = torch.outer(line, line)
    kernel = (kernel / kernel.sum()).expand(len(image), 1, BLUR_SIZE, BLUR_SIZE)
    return F.conv2d(image[None].float(), kernel, padding=BLUR_SIZE // 2, groups=len(image))[0]


def substrate(image: Tensor, baseline: Baseline) -> Tensor:
    """What removed pixels become."""
    return torch.zeros_like(image) if baseline == "mean" else blurred(image).to(image.dtype)


def curve(
    score: Scorer,
    image: Tensor,
    heatmap: Tensor,
    mode: Literal["deletion", "insertion"],
    baseline: Baseline,
    steps: int = DEFAULT_STEPS,
    batch: int = 32,
) -> Tensor:
    """The model's scores ``[steps + 1]`` along the deletion or insertion of ``image``
    ``[3, H, W]`` in the order of ``heatmap`` ``[H, W]``."""
    if steps < 1:
        raise OptionError(f"steps must be >= 1, got {steps}")
    if heatmap.shape != image.shape[-2:]:
        raise ValueError(f"heatmap {tuple(heatmap.shape)} and image {tuple(image.shape)} differ")
    pixels = heatmap.numel()
    per_step = math.ceil(pixels / steps)
    order = torch.argsort(-heatmap.flatten().double(), stable=True)
    rank = torch.empty(pixels, dtype=torch.long, device=order.device)
    rank[order] = torch.arange(pixels, device=order.device)
    rank = rank.reshape(heatmap.shape).to(image.device)
    other = substrate(image, baseline)
    start, finish = (image, other) if mode == "deletion" else (other, image)
    scores = []
    for begin in range(0, steps + 1, batch):
        counts = torch.arange(begin, min(begin + batch, steps + 1), device=image.device) * per_step
        changed = (rank[None] < counts[:, None, None])[:, None]  # [K, 1, H, W]
        scores.append(score(torch.where(changed, finish, start)).float().cpu())
    return torch.cat(scores)


def auc(scores: Tensor) -> float:
    """Normalised area under a curve sampled at equal steps over ``[0, 1]`` (trapezoid)."""
    scores = scores.double()
    return float((scores.sum() - scores[0] / 2 - scores[-1] / 2) / (len(scores) - 1))


def deletion_insertion(
    score: Scorer,
    image: Tensor,
    heatmap: Tensor,
    steps: int = DEFAULT_STEPS,
    baseline: str = "rise",
) -> tuple[float, float]:
    """Deletion and insertion areas of one map (``baseline``: see ``baselines``)."""
    deletion, insertion = baselines(baseline)
    removed = curve(score, image, heatmap, "deletion", deletion, steps)
    inserted = curve(score, image, heatmap, "insertion", insertion, steps)
    return auc(removed), auc(inserted)
