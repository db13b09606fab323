"""CLIPer's early-layer fusion: every layer's patch embeddings through a fused-attention last
block, per-layer text probabilities averaged, the last one spread by the fused attention.

Sun, Cao, Xie, Jiang and Pang, "CLIPer: Hierarchically Improving Spatial Representation of
CLIP for Open-Vocabulary Semantic Segmentation", ICCV 2025 (arXiv 2411.13836); code
github.com/linsun449/cliper.code (``modified_clip/model.py``, ``attn_type='fused-attn'``,
``fuse_feature=True``, ``select_layer=-1``). The fine-grained compensation (the self-attention
maps of Stable Diffusion refining the maps) is omitted: this is the early-layer fusion alone,
the numbers the code's README gives in parentheses.

With ``A`` the sum over blocks ``0..L-2`` of their q-k attention probabilities (per head), the
last block's attention is ``A`` normalised over columns then rows, symmetrised, minus its
column means, clamped at 0 and row-normalised. As the code (which normalises ``A`` in place
on each call), the input of layer ``l`` (``l = 0..L-1``) sees ``A`` after ``l + 1`` rounds of
column-then-row normalisation. Layer ``l``'s embeddings (the normalised input of block ``l``,
and for ``l = L-1`` the raw input of the last block) go through the last block's norm and
that attention without residual or FFN, then the final norm and projection; per patch,
``softmax(logit_scale * cos)`` over the texts plus their mean (the code's foreground texts
plus background texts plus the foreground mean; here the given texts are the set), without
the added mean. The last layer's probabilities are set to 0 below ``attention_thr`` times
their maximum over the patches (in place, as the code, so also in the mean) and spread by the
final fused attention (mean over heads); the result is that plus the mean over layers:
``S[n, t] = sum_m P[m, t] W[m, n] + mean_l P_l[n, t]``.

The maps are probabilities (``token_scores``); the image embedding is CLIP's own. Departures:
any batch size; no float16 rounding of the resized positional table; a row of the fused
attention that is all zero after the clamp stays zero (the code divides by zero).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import engine
from ..errors import ModelError
from ..typedefs import PositionMode
from .base import Method, Scores, TextQuery
from .common import probabilities


@dataclass(frozen=True)
class CliperOptions:
    """logit_scale: the per-patch softmax scale (the code's ``logit_scale``: 100, or 50 for
    COCO); attention_thr: the last layer's probabilities below this share of their maximum
    are dropped before spreading; positions: positional-table interpolation (bilinear, as
    the code)."""

    logit_scale: float = 100.0
    attention_thr: float = 0.2
    positions: PositionMode = "bilinear"

    def __post_init__(self) -> None:
        if not self.logit_scale > 0:
            raise ValueError(f"option logit_scale must be positive, got {self.logit_scale}")
        if not 0 <= self.attention_thr <= 1:
            raise ValueError(f"option attention_thr must be in [0, 1], got {self.attention_thr}")


class Cliper(Method):
    """CLIPer (Sun et al., ICCV 2025), early-layer fusion without fine-grained compensation."""

    name = "cliper"
    summary = "early-layer fusion (no diffusion compensation), fused-attention last block"
    citation = (
        "Sun et al., CLIPer: Hierarchically Improving Spatial Representation of CLIP "
        "for Open-Vocabulary Semantic Segmentation, ICCV 2025"
    )
    Options = CliperOptions

    def encode(self, backbone, images: Tensor, options) -> engine.Trace:
        """CLIPer scores text probabilities; it has no token forward of its own."""
        raise ModelError(f"method {self.name!r} scores per-text probabilities; it has no tokens")

    def scores(self, backbone, images: Tensor, query: TextQuery, options) -> Scores:
        """Fused per-patch text probabilities ``[B, N, T]``."""
        self.check(backbone)
        tower = backbone.vision
        depth = len(tower.blocks)
        recorded = Recorded()

        def attention(q, k, v, context):
            weights = probabilities(q, k)
            if context.block < depth - 1:
                recorded.attention = recorded.attention + weights.float()
            return weights @ v

        def tap(point: str, block: int, tensor: Tensor) -> Tensor:
            if point == "normed" and block < depth - 1:
                recorded.layers.append(tensor)
            if point == "block" and block == depth - 2:
                recorded.layers.append(tensor)
            return tensor

        plan = engine.Plan(blocks=depth, attention=attention, positions=options.positions, tap=tap)
        with backbone.inference():
            trace = engine.run(tower, images, plan)
            text = query.embeddings.float()
            maps = fused_maps(tower, recorded, text, options, trace.grid)
        cosine = F.normalize(trace.pooled.float(), dim=-1) @ text.T
        return Scores(maps, maps, cosine, trace.grid)


@dataclass
class Recorded:
    """Summed attention probabilities of blocks ``0..L-2`` and each layer's embeddings."""

    attention: Tensor | int = 0
    layers: list = field(default_factory=list)


def fused_maps(tower, recorded: Recorded, text: Tensor, options: CliperOptions, grid):
    """CLIPer's fused text probabilities ``[B, N, T]`` (see the module docstring)."""
    block, prefix = tower.blocks[-1], tower.prefix
    summed = recorded.attention.clone()
    classes = torch.cat([text, F.normalize(text.mean(dim=0, keepdim=True), dim=-1)])
    layer_probs = []
    for embeddings in recorded.layers:
        summed = sinkhorn_step(summed)
        weights = fused_attention(summed)
        q, k, v = block.qkv(block.norm1(embeddings), grid)
        tokens = block.out(weights.to(v.dtype) @ v)
        dense = tower.head.dense(tokens, grid, options.positions, None).float()
        logits = options.logit_scale * F.normalize(dense, dim=-1) @ classes.T
        layer_probs.append(logits.softmax(dim=-1)[..., : len(text)])
    last = layer_probs[-1]
    last = torch.where(last < last.amax(dim=1, keepdim=True) * options.attention_thr, 0, last)
    layer_probs[-1] = last  # as the code, whose in-place threshold also changes the mean
    spread = weights.mean(dim=1)[:, prefix:, prefix:]  # [B, N, N]
    return spread.transpose(1, 2) @ last + torch.stack(layer_probs).mean(dim=0)


def sinkhorn_step(matrix: Tensor) -> Tensor:
    """One column-then-row normalisation of ``[B, H, N, N]``."""
    matrix = matrix / matrix.sum(dim=-2, keepdim=True)
    return matrix / matrix.sum(dim=-1, keepdim=True)


def fused_attention(matrix: Tensor) -> Tensor:
    """Symmetrised, minus column means, clamped at 0, row-normalised."""
    fused = (matrix + matrix.transpose(-1, -2)) / 2
    fused = (fused - fused.mean(dim=-2, keepdim=True)).clamp_min(0)
    return fused / fused.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(fused.dtype).tiny)
