"""One generic forward over any backbone adapter, driven by a method's plan.

The engine knows no method: a method hands it a ``Plan`` (which last blocks get the method's
attention callable, on a parallel path or in place, with or without residual and FFN, and
what a pooling head does for dense tokens) and reads the ``Trace``. The user's model is only
read, so the same model still gives its plain outputs at any resolution (docs/method.md,
sections 2-3; docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .backbones.base import Attention, AttentionContext, Block, VisionTower
from .errors import ImageError, ModelError
from .typedefs import Grid, PositionMode

Tap = Callable[[str, int, Tensor], Tensor]
"""``(point, block, tensor) -> tensor``: sees ``"embed"`` (block -1), each block's ``"normed"``
input and ``"block"`` output (the original path's, for a parallel plan); may return a
replacement (e.g. a leaf for gradients)."""


@dataclass(frozen=True)
class Plan:
    """What a method changes in a forward.

    ``blocks``: the last ``blocks`` transformer blocks run ``attention`` (earlier blocks are
    the model's own). ``parallel``: a new path beside the original one,
    ``s <- s + attention(norm1(o))`` (then the block's FFN when ``ffn``), never fed back;
    otherwise each block becomes ``[x +] attention(norm1(x))`` (``residual``) then
    ``[+ FFN]`` (``ffn``). ``pooled_from``: which path gives the image embedding.
    ``head_attention``: the attention a pooling head with attention of its own (ResNet) uses
    for the dense tokens (``None``: the head's own). ``tap``: sees intermediate tensors.
    """

    blocks: int = 0
    attention: Attention | None = None
    parallel: bool = False
    residual: bool = True
    ffn: bool = True
    pooled_from: Literal["original", "new"] = "original"
    head_attention: Attention | None = None
    positions: PositionMode = "bilinear"
    tap: Tap | None = None


PLAIN = Plan()


@dataclass
class Trace:
    """What one forward yields: the image embedding and one feature per patch token."""

    pooled: Tensor  # [B, D] projected, not normalised
    dense: Tensor  # [B, N, D] projected, not normalised
    grid: Grid

    @property
    def tokens(self) -> Tensor:
        """``[B, 1+N, D]``: the embedding first, then the patch tokens."""
        return torch.cat([self.pooled[:, None], self.dense], dim=1)


def _untapped(point: str, block: int, tensor: Tensor) -> Tensor:
    return tensor


def check_input(tower: VisionTower, images: Tensor) -> None:
    """ImageError for an input smaller than one token."""
    if min(images.shape[-2:]) < tower.min_size:
        raise ImageError(
            f"input {tuple(images.shape[-2:])} is smaller than {tower.min_size} pixels"
        )


def run(tower: VisionTower, images: Tensor, plan: Plan = PLAIN) -> Trace:
    """Run ``plan`` over ``tower`` for images ``[B, 3, H, W]``."""
    check_input(tower, images)
    blocks = tower.blocks
    if not 0 <= plan.blocks <= len(blocks):
        raise ModelError(
            f"the method changes the last {plan.blocks} blocks but the model has {len(blocks)} "
            f"(depth must be in [0, {len(blocks)}])"
        )
    if plan.blocks and plan.attention is None:
        raise ValueError("a plan that changes blocks needs an attention callable")
    tap = plan.tap or _untapped
    x, grid = tower.embed(images, plan.positions)
    x = tap("embed", -1, x)
    first = len(blocks) - plan.blocks
    for index in range(first):
        x = _plain_block(blocks[index], index, x, grid, tap)
    original = new = x
    if plan.blocks and plan.parallel:
        cls_only = tower.head.pools_first_token and plan.pooled_from == "original"
        for index in range(first, len(blocks)):
            last = cls_only and plan.tap is None and index == len(blocks) - 1
            original, new = _parallel_block(
                blocks[index], index, original, new, plan, grid, tower, last, tap
            )
    elif plan.blocks:
        for index in range(first, len(blocks)):
            new = _replaced_block(blocks[index], index, new, plan, grid, tower.prefix, tap)
        original = new
    pooled_input = original if plan.pooled_from == "original" else new
    pooled = tower.head.pool(pooled_input, grid, plan.positions)
    dense = tower.head.dense(new, grid, plan.positions, plan.head_attention)
    return Trace(pooled, dense, grid)


def _plain_block(block: Block, index: int, x: Tensor, grid: Grid, tap: Tap) -> Tensor:
    normed = tap("normed", index, block.norm1(x))
    q, k, v = block.qkv(normed, grid)
    return tap("block", index, block.ffn(x + block.out(block.attention(q, k, v))))


def _parallel_block(block, index, original, new, plan: Plan, grid, tower, last: bool, tap):
    normed = tap("normed", index, block.norm1(original))
    q, k, v = block.qkv(normed, grid)
    context = AttentionContext(grid, tower.prefix, normed, index)
    new = new + block.out(plan.attention(q, k, v, context))
    if plan.ffn:
        new = block.ffn(new)
    if last:
        # After the last block only the original path's CLS is used: one query, one FFN row.
        q, original = q[:, :, :1], original[:, :1]
    original = block.ffn(original + block.out(block.attention(q, k, v)))
    return tap("block", index, original), new


def _replaced_block(block, index, x, plan: Plan, grid, prefix: int, tap):
    normed = tap("normed", index, block.norm1(x))
    q, k, v = block.qkv(normed, grid)
    out = block.out(plan.attention(q, k, v, AttentionContext(grid, prefix, normed, index)))
    x = x + out if plan.residual else out
    return tap("block", index, block.ffn(x) if plan.ffn else x)
