"""Small pieces several methods share: running a plan, cosine scores, attention probabilities,
and layer indices given for ViT-B/16 mapped to other depths."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import engine
from ..backbones import Backbone
from ..errors import OptionError
from .base import Scores

REFERENCE_DEPTH = 12  # ViT-B/16: the depth the papers' layer indices are given for
PARALLEL_DEPTH = 6  # CLIP Surgery's and GEM's parallel path: the last 6 blocks in both papers


def run_plan(backbone: Backbone, images: Tensor, plan: engine.Plan) -> engine.Trace:
    """The engine's trace of ``plan`` under the model's inference settings, as float32."""
    with backbone.inference():
        trace = engine.run(backbone.vision, images, plan)
    return engine.Trace(trace.pooled.float(), trace.dense.float(), trace.grid)


def cosine_scores(trace: engine.Trace, text: Tensor) -> Scores:
    """Cosines of the normalised dense tokens and image embedding with each text."""
    dense = F.normalize(trace.dense, dim=-1) @ text.T
    return Scores(dense, dense, F.normalize(trace.pooled, dim=-1) @ text.T, trace.grid)


def probabilities(q: Tensor, k: Tensor) -> Tensor:
    """A block's own attention probabilities ``softmax(q k^T / sqrt(d))`` ``[B, H, N, N]``."""
    return torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)


def layer(index: int | None, paper: int, depth: int, highest: int | None = None) -> int:
    """``index``, or the paper's ViT-B/16 block ``paper`` at the same relative depth (at most
    ``highest``: on a shallow model two relative depths can round past the last valid block)."""
    if index is not None:
        return index
    mapped = math.floor(paper * depth / REFERENCE_DEPTH + 0.5)
    return mapped if highest is None else min(mapped, highest)


def parallel_depth(depth: int | None, blocks: int) -> int:
    """``depth``, or the papers' 6 blocks (every block of a model with fewer)."""
    return min(PARALLEL_DEPTH, blocks) if depth is None else depth


def check_range(method: str, name: str, value: int, low: int, high: int) -> None:
    """OptionError unless ``low <= value <= high`` (a block index for this model)."""
    if not low <= value <= high:
        raise OptionError(
            f"option {name} of {method!r} must be in [{low}, {high}] for this model, got {value}"
        )
