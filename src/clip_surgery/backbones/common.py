"""Pieces every adapter shares: head splitting, positional tables, the CLS-token head and the
multi-head attention pooling (MAP) head."""

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
    the same norm and projection of that token (the head's value path is the identity).
    ``prefix``: tokens before the patch tokens (the CLS token first, then any registers)."""

    pools_first_token = True
    attentive = False

    def __init__(self, norm: nn.Module, project: Callable[[Tensor], Tensor], prefix: int = 1):
        self.norm = norm
        self.project = project
        self.prefix = prefix

    def pool(self, x: Tensor, grid: Grid, positions: PositionMode) -> Tensor:
        """``project(norm(CLS))``."""
        return self.project(self.norm(x[:, 0]))

    def dense(
        self, x: Tensor, grid: Grid, positions: PositionMode, attention: Attention | None
    ) -> Tensor:
        """``project(norm(token))`` for every patch token."""
        return self.project(self.norm(x[:, self.prefix :]))


class MeanHead(ClsHead):
    """Average pooling: the embedding is ``project(mean(norm(patch tokens)))`` (open_clip's
    ``pool_type="avg"``, norm before the pool); each patch token's feature is
    ``project(norm(token))`` as in ``ClsHead``, so the embedding is the mean of the dense
    features."""

    pools_first_token = False

    def pool(self, x: Tensor, grid: Grid, positions: PositionMode) -> Tensor:
        """``project(mean(norm(patch tokens)))``."""
        return self.project(self.norm(x[:, self.prefix :]).mean(dim=1))


class LatentPoolHead:
    """Multi-head attention pooling (MAP): one learned latent query attends over the tokens,
    then the output projection and a residual MLP ``y + mlp(norm(y))``, then any projection.

    MAP heads pool SigLIP and SigLIP 2 towers (Zhai et al., "Sigmoid Loss for Language Image
    Pre-Training", ICCV 2023; Tschannen et al., "SigLIP 2", arXiv 2502.14786; code
    github.com/google-research/big_vision). There is no CLS token to read dense features from, so
    a patch token's dense feature is the head's value path: its attention replaced by each token
    attending to itself only (MaskCLIP's treatment of ResNet's attention pool: Zhou et al.,
    ECCV 2022, github.com/chongzhou96/MaskCLIP), i.e. ``out(v(token))``, then the same residual
    MLP and projection (docs/method.md, section 3). When every token is the same vector, the
    pooled embedding equals each dense token. A family adapter supplies ``query``, ``values``,
    ``keys`` (per head), ``out`` and ``residual_mlp``.
    """

    pools_first_token = False
    attentive = False  # the latent query is the head's only query: no attention to replace

    def __init__(self, prefix: int, project: Callable[[Tensor], Tensor], pool_prefix: bool):
        self.prefix = prefix  # prefix tokens before the patch tokens
        self.project = project  # after the residual MLP (a tower projection, or the identity)
        self.pool_prefix = pool_prefix  # the pooled embedding also attends to the prefix tokens

    def query(self, batch: int) -> Tensor:  # pragma: no cover - every adapter overrides it
        """The latent query per head ``[B, heads, 1, head_dim]``."""
        raise NotImplementedError

    def keys(self, tokens: Tensor) -> Tensor:  # pragma: no cover - every adapter overrides it
        """Keys per head ``[B, heads, N, head_dim]``."""
        raise NotImplementedError

    def values(self, tokens: Tensor) -> Tensor:  # pragma: no cover - every adapter overrides it
        """Values per head ``[B, heads, N, head_dim]``."""
        raise NotImplementedError

    def out(self, heads: Tensor) -> Tensor:  # pragma: no cover - every adapter overrides it
        """Output projection of per-head outputs: ``[B, n, W]``."""
        raise NotImplementedError

    def residual_mlp(self, x: Tensor) -> Tensor:  # pragma: no cover - every adapter overrides it
        """``x + mlp(norm(x))``."""
        raise NotImplementedError

    def normed(self, x: Tensor) -> Tensor:
        """The tower's final norm before the head (the identity unless an adapter has one)."""
        return x

    def pool(self, x: Tensor, grid: Grid, positions: PositionMode) -> Tensor:
        """The latent query's attention over the tokens, out, residual MLP, projection."""
        x = self.normed(x)
        tokens = x if self.pool_prefix else x[:, self.prefix :]
        attended = sdpa(self.query(len(x)).to(x.dtype), self.keys(tokens), self.values(tokens))
        return self.project(self.residual_mlp(self.out(attended)))[:, 0]

    def dense(
        self, x: Tensor, grid: Grid, positions: PositionMode, attention: Attention | None
    ) -> Tensor:
        """The value path of every patch token: ``project(residual_mlp(out(v)))``."""
        values = self.values(self.normed(x)[:, self.prefix :])
        return self.project(self.residual_mlp(self.out(values)))
