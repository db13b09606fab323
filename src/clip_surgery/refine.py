"""PAMR: pixel-adaptive mask refinement of per-class score maps by the image's local colours.

Araslanov and Roth, "Single-Stage Semantic Segmentation from Image Labels", CVPR 2020; code
github.com/visinf/1-stage-wseg (``models/mods/pamr.py``), used as NACLIP's post-processing
(github.com/sinahmr/NACLIP: 10 iterations, dilations 8 and 16). For each pixel and each of the
8 neighbours at every dilation (border pixels repeated), the affinity is
``-|I(p) - I(n)| / (1e-8 + 0.1 * std)`` with ``std`` the unbiased standard deviation of the
pixel's 3 x 3 neighbourhoods at all dilations (centre included once per dilation), averaged
over the image channels and softmax-normalised over the neighbours; each iteration replaces
every score by the affinity-weighted sum of its neighbours' scores. The neighbours are views
into one padded copy here instead of one convolution per dilation, so memory stays
``O(C H W)`` instead of ``O(8 C H W)`` per dilation; the sums are the same.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import OptionError

PAMR_STEPS = 10
PAMR_DILATIONS = (8, 16)
REFINERS = ("pamr",)


RING = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def _offsets(dilations: Sequence[int]) -> list[tuple[int, int]]:
    """The 8 neighbour offsets ``(dy, dx)`` at each dilation, row by row."""
    return [(dy * d, dx * d) for d in dilations for dy, dx in RING]


def _neighbours(x: Tensor, offsets: list[tuple[int, int]]) -> list[Tensor]:
    """Views ``x[..., y + dy, x + dx]`` for each offset, coordinates clamped to the border
    (one replicate-padded copy)."""
    margin = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    height, width = x.shape[-2:]
    padded = F.pad(x, [margin] * 4, mode="replicate")
    return [
        padded[..., margin + dy : margin + dy + height, margin + dx : margin + dx + width]
        for dy, dx in offsets
    ]


def affinity(image: Tensor, dilations: Sequence[int] = PAMR_DILATIONS) -> Tensor:
    """Neighbour weights ``[B, P, H, W]`` (softmax over the ``P = 8 x len(dilations)``)."""
    image = image.float()
    neighbours = _neighbours(image, _offsets(dilations))
    centres = [image] * len(dilations)  # each dilation's 3 x 3 window includes the pixel
    spread = torch.stack(centres + neighbours, dim=2).std(dim=2)  # [B, K, H, W], unbiased
    distances = torch.stack([(image - n).abs() for n in neighbours], dim=2)
    logits = (-distances / (1e-8 + 0.1 * spread[:, :, None])).mean(dim=1)
    return logits.softmax(dim=1)


def pamr(
    image: Tensor,
    scores: Tensor,
    steps: int = PAMR_STEPS,
    dilations: Sequence[int] = PAMR_DILATIONS,
) -> Tensor:
    """Refined scores ``[B, C, H, W]`` of ``scores`` ``[B, C, h, w]`` by ``image`` ``[B, K, H, W]``.

    Scores of another size are first resized to the image's (bilinear, ``align_corners=True``,
    as the reference).
    """
    if steps < 0 or not dilations or min(dilations) < 1:
        raise OptionError(f"PAMR needs steps >= 0 and dilations >= 1, got {steps}, {dilations}")
    if scores.shape[-2:] != image.shape[-2:]:
        scores = F.interpolate(scores, size=image.shape[-2:], mode="bilinear", align_corners=True)
    weights = affinity(image, dilations)
    offsets = _offsets(dilations)
    scores = scores.float()
    for _ in range(steps):
        refined = torch.zeros_like(scores)
        for index, neighbour in enumerate(_neighbours(scores, offsets)):
            refined.addcmul_(weights[:, index : index + 1], neighbour)
        scores = refined
    return scores


def check_refine(name: str | None) -> str | None:
    """``name`` when it is a known refinement (or None); OptionError otherwise."""
    if name is not None and name not in REFINERS:
        raise OptionError(f"unknown refinement {name!r}; known: {', '.join(REFINERS)}")
    return name
