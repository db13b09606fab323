"""SC-CLIP: self-calibration of anomaly tokens and of the last block by intermediate features.

Bai, Liu, Han, Zhang and Tang, "Self-Calibrated CLIP for Training-Free Open-Vocabulary
Segmentation", arXiv 2411.15869; code github.com/SuleBai/SC-CLIP (``clip/model.py``,
``pre_adjust_idx=8``, ``post_adjust_idx=3``, ``multi_start_idx=3``, ``multi_end_idx=10``,
``res_cls=0.3``, ``beta=0.4``; LOF with 30 neighbours and 5% contamination). With ``X_i`` the
output of block ``i`` (0-based, of 12) and ``x = X_10``:

1. **Anomaly tokens**: the local outlier factor of every patch token of ``x`` (squared
   Euclidean distances; as the code, each reachability distance is the point's own k-distance);
   tokens above the 95% quantile are replaced by the mean of their non-anomalous 3 x 3
   neighbours (in ``x`` and in ``X_8``).
2. **Calibration**: with ``S = cos(X_8)`` between patches (after that replacement), each token
   becomes the ``S``-weighted mean (``S < beta`` set to 0, rows summing to 1) of ``x``; the last
   block's attention is ``(softmax(M) + softmax(k k^T / sqrt(d))) / 2`` with
   ``M = 3 (S - mean S)`` and ``-inf`` where negative, without residual and FFN, plus
   ``res_cls`` times the CLS token; the result is aggregated again by ``cos(X_3)``.
3. **Multi-level fusion**: ``sum_{i=3}^{9} X_i`` goes through the same attention (plus
   ``res_cls`` times its CLS row) and aggregation and is added.

Patch tokens only; the image embedding (``cosine``) is CLIP's own, from the plain forward that
records the ``X_i`` (the code returns no image embedding). Departures: any batch size (the
code handles one image); anomalies are located row-major on non-square grids (the code divides
by the row count, exact only on square grids); LOF uses ``min(30, N - 1)`` neighbours on grids
of 30 patches or fewer; block indices given for other depths are the same relative depth.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import engine
from ..errors import OptionError
from ..typedefs import Grid, PositionMode
from .base import ForwardMethod, Scores, TextQuery
from .common import check_range, cosine_scores, layer


@dataclass(frozen=True)
class ScclipOptions:
    """pre_adjust/post_adjust: blocks whose outputs give the similarities before and after the
    last block (None: 8 and 3 of 12); multi_start/multi_end: blocks summed for the fusion
    (None: 3 to 10, end excluded); res_cls: weight of the CLS token added back; beta:
    similarities below it are dropped; neighbors/contamination: LOF settings."""

    pre_adjust: int | None = None
    post_adjust: int | None = None
    multi_start: int | None = None
    multi_end: int | None = None
    res_cls: float = 0.3
    beta: float = 0.4
    neighbors: int = 30
    contamination: float = 0.05
    positions: PositionMode = "bicubic-dino"

    def __post_init__(self) -> None:
        if not -1 <= self.beta <= 1:
            raise ValueError(f"option beta must be in [-1, 1], got {self.beta}")
        if self.neighbors < 1:
            raise ValueError(f"option neighbors must be >= 1, got {self.neighbors}")
        if not 0 < self.contamination < 1:
            raise ValueError(f"option contamination must be in (0, 1), got {self.contamination}")


@dataclass(frozen=True)
class Layers:
    """The resolved block indices of one call."""

    pre: int
    post: int
    start: int
    end: int


class Scclip(ForwardMethod):
    """SC-CLIP (Bai et al., arXiv 2411.15869)."""

    name = "scclip"
    needs_cls_token = True
    needs_plain_positions = True
    requirement = (
        "keeps the CLS token beside attention it computes itself (CLS pooling, no rotary "
        "position embeddings)"
    )
    summary = "anomaly tokens repaired; last block calibrated by mid-layer similarities; fusion"
    citation = (
        "Bai et al., Self-Calibrated CLIP for Training-Free Open-Vocabulary Segmentation, "
        "arXiv 2411.15869"
    )
    Options = ScclipOptions

    def plan(self, options: ScclipOptions, tower) -> engine.Plan:
        """The model's own forward, recording block outputs (``encode`` does the rest)."""
        return engine.Plan(positions=options.positions)

    def resolved(self, options: ScclipOptions, tower) -> ScclipOptions:
        """The block indices that run on ``tower``."""
        chosen = self.layers(options, len(tower.blocks))
        return replace(
            options,
            pre_adjust=chosen.pre,
            post_adjust=chosen.post,
            multi_start=chosen.start,
            multi_end=chosen.end,
        )

    def layers(self, options: ScclipOptions, depth: int) -> Layers:
        """Block indices for a model of ``depth`` blocks (checked)."""
        if depth < 2:
            raise OptionError("scclip reads blocks before the last: it needs 2 or more")
        chosen = Layers(
            layer(options.pre_adjust, 8, depth, highest=depth - 2),
            layer(options.post_adjust, 3, depth, highest=depth - 2),
            layer(options.multi_start, 3, depth, highest=depth - 2),
            layer(options.multi_end, 10, depth, highest=depth - 1),
        )
        check_range(self.name, "pre_adjust", chosen.pre, 0, depth - 2)
        check_range(self.name, "post_adjust", chosen.post, 0, depth - 2)
        check_range(self.name, "multi_start", chosen.start, 0, depth - 2)
        check_range(self.name, "multi_end", chosen.end, chosen.start + 1, depth - 1)
        return chosen

    def encode(self, backbone, images: Tensor, options: ScclipOptions) -> engine.Trace:
        """CLIP's image embedding and SC-CLIP's dense tokens."""
        self.check(backbone)
        tower = backbone.vision
        depth = len(tower.blocks)
        chosen = self.layers(options, depth)
        outputs: dict[int, Tensor] = {}

        def tap(point: str, block: int, tensor: Tensor) -> Tensor:
            if point == "block" and block < depth - 1:
                outputs[block] = tensor
            return tensor

        plan = engine.Plan(positions=options.positions, tap=tap)
        with backbone.inference():
            trace = engine.run(tower, images, plan)
            dense = calibrated(tower, outputs, chosen, options, trace.grid)
        return engine.Trace(trace.pooled.float(), dense.float(), trace.grid)

    def scores(self, backbone, images: Tensor, query: TextQuery, options) -> Scores:
        """Cosines of SC-CLIP's patch tokens (and CLIP's embedding) with each text."""
        return cosine_scores(self.encode(backbone, images, options), query.embeddings)


def calibrated(tower, outputs: dict, chosen: Layers, options: ScclipOptions, grid: Grid):
    """SC-CLIP's projected patch features ``[B, N, D]`` from the recorded block outputs."""
    prefix, block = tower.prefix, tower.blocks[-1]
    x = outputs[len(tower.blocks) - 2]
    cls, patches = x[:, :1], x[:, prefix:]
    anomalous = torch.stack([anomalies(p, options) for p in patches.float()])  # [B, N]
    patches = repaired(patches, anomalous, grid)
    before = cosines(repaired(outputs[chosen.pre][:, prefix:], anomalous, grid))
    prior = before.clone()
    after = cosines(outputs[chosen.post][:, prefix:])
    x = aggregate(patches, before, options.beta)
    x = calibrated_attention(block, x, prior) + options.res_cls * cls
    x = aggregate(x, after, options.beta)
    fused = sum(outputs[i] for i in range(chosen.start, chosen.end))
    extra = calibrated_attention(block, fused[:, prefix:], prior) + options.res_cls * fused[:, :1]
    x = x + aggregate(extra, after, options.beta)
    filler = torch.zeros_like(x[:, :prefix])
    return tower.head.dense(torch.cat([filler, x], dim=1), grid, options.positions, None)


def cosines(tokens: Tensor) -> Tensor:
    """Cosine similarities ``[B, N, N]`` between tokens."""
    normed = F.normalize(tokens, dim=-1)
    return normed @ normed.transpose(1, 2)


def aggregate(tokens: Tensor, similarity: Tensor, beta: float) -> Tensor:
    """Each token the mean of all tokens weighted by ``similarity`` (below ``beta``: 0)."""
    weights = torch.where(similarity < beta, torch.zeros_like(similarity), similarity)
    weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-6)
    return weights @ tokens


def calibrated_attention(block, tokens: Tensor, prior: Tensor) -> Tensor:
    """``out((softmax(M) + softmax(k k^T / sqrt(d))) / 2 v)`` over the patch tokens."""
    q, k, v = block.qkv(block.norm1(tokens), None)  # patch tokens, no rotary: grid unread
    centred = (prior - prior.mean(dim=(1, 2), keepdim=True)) * 3.0
    centred = centred.masked_fill(centred < 0, float("-inf"))[:, None]
    keys = torch.softmax(k @ k.transpose(-1, -2) * k.shape[-1] ** -0.5, dim=-1)
    return block.out(((torch.softmax(centred, dim=-1) + keys) / 2).to(v.dtype) @ v)


def anomalies(tokens: Tensor, options: ScclipOptions) -> Tensor:
    """Boolean ``[N]``: local outlier factor above its ``1 - contamination`` quantile."""
    neighbors = min(options.neighbors, len(tokens) - 1)
    distances = torch.cdist(tokens, tokens, compute_mode="donot_use_mm_for_euclid_dist") ** 2
    near, index = torch.topk(distances, neighbors + 1, largest=False)
    near, index = near[:, 1:], index[:, 1:]
    reach = torch.maximum(near, near[:, -1:].expand_as(near))
    density = neighbors / torch.nan_to_num(reach.mean(dim=1), nan=1e-6)
    factor = (density[index] / density[:, None]).mean(dim=1)
    return factor > torch.quantile(factor, 1 - options.contamination)


def repaired(tokens: Tensor, anomalous: Tensor, grid: Grid) -> Tensor:
    """Anomalous tokens replaced by the mean of their valid 3 x 3 neighbours (if any)."""
    batch, _, width = tokens.shape
    maps = tokens.transpose(1, 2).reshape(batch, width, *grid)
    keep = (~anomalous).to(tokens.dtype).reshape(batch, 1, *grid)
    ring = torch.ones(1, 1, 3, 3, dtype=tokens.dtype, device=tokens.device)
    ring[0, 0, 1, 1] = 0
    total = F.conv2d(maps * keep, ring.expand(width, 1, 3, 3), padding=1, groups=width)
    count = F.conv2d(keep, ring, padding=1)
    update = (1 - keep) * (count > 0).to(tokens.dtype)
    mean = total / count.clamp_min(1)
    result = maps * (1 - update) + mean * update
    return result.reshape(batch, width, -1).transpose(1, 2)
