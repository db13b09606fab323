"""Pieces every adapter shares: head splitting, positional tables, the CLS-token head."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..typedefs import POSITION_MODES, Grid, PositionMode
from .base import Attention


def split_heads(x: Tensor, heads: int) -> Tensor:
    """``[B, N, W]`` to ``[B, heads, N, W / heads]``."""
    batch, tokens, width = x.shape
    return x.view(batch, tokens, heads, width // heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """``[B, heads, N, d]`` to ``[B, N, heads * d]``."""
    batch, heads, tokens, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * head_dim)


def interpolate_positions(
    table: Tensor, native_grid: Grid, grid: Grid, mode: PositionMode = "bilinear"
) -> Tensor:
    """Resize the patch part of a ``[prefix + h*w, C]`` positional table to ``grid``.

    The leading rows (CLS position) stay. ``bilinear``: CLIP Surgery's reference
    (``align_corners=False``, no antialias). ``bicubic-dino``: bicubic with DINO's
    ``scale_factor=(g + 0.1) / side`` trick, as SCLIP, ClearCLIP and NACLIP do.
    ``bicubic-antialias``: timm's resampling, as GEM does. Returns a new tensor; the model's
    table is never written to (docs/method.md, section 2).
    """
    if tuple(native_grid) == tuple(grid):
        return table
    cells = native_grid[0] * native_grid[1]
    prefix, patches = table[: len(table) - cells], table[len(table) - cells :]
    patches = patches.reshape(1, native_grid[0], native_grid[1], -1).permute(0, 3, 1, 2)
    if mode == "bilinear":
        patches = F.interpolate(patches, size=grid, mode="bilinear", align_corners=False)
    elif mode == "bicubic-dino":
        factor = ((grid[0] + 0.1) / native_grid[0], (grid[1] + 0.1) / native_grid[1])
        patches = F.interpolate(patches, scale_factor=factor, mode="bicubic")
    elif mode == "bicubic-antialias":
        patches = F.interpolate(patches, size=grid, mode="bicubic", antialias=True)
    else:
        raise ValueError(f"unknown position interpolation {mode!r}; one of {POSITION_MODES}")
    return torch.cat([prefix, patches.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)])


def sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(d)) v with PyTorch's fused kernel."""
    return F.scaled_dot_product_attention(q, k, v)


class ClsHead:
    """CLS pooling: the embedding is ``project(norm(x[:, 0]))``; each patch token's feature is
    the same norm and projection of that token (the head's value path is the identity)."""

    pools_first_token = True
    attentive = False

    def __init__(self, norm: nn.Module, project: Callable[[Tensor], Tensor]):
        self.norm = norm
        self.project = project

    def pool(self, x: Tensor, grid: Grid, positions: PositionMode) -> Tensor:
        """``project(norm(CLS))``."""
        return self.project(self.norm(x[:, 0]))

    def dense(
        self, x: Tensor, grid: Grid, positions: PositionMode, attention: Attention | None
    ) -> Tensor:
        """``project(norm(token))`` for every patch token."""
        return self.project(self.norm(x[:, 1:]))
