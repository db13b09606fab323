"""CLIP Surgery: architecture surgery (a parallel v-v path) plus feature surgery.

Li et al., "A Closer Look at the Explainability of Contrastive Language-Image Pre-training",
Pattern Recognition 2025 (arXiv 2304.05653); reference code github.com/xmed-lab/CLIP_Surgery.
What is computed: docs/method.md, sections 2-4.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F

from .. import engine
from ..errors import OptionError
from ..features import feature_surgery
from ..typedefs import PositionMode
from .base import ForwardMethod, Scores, TextQuery, pairwise
from .common import PARALLEL_DEPTH, parallel_depth


@dataclass(frozen=True)
class ClipSurgeryOptions:
    """depth: blocks with the new path (``None``: the paper's 6, or every block of a shallower
    model); attention: v-v (paper) or q-k/k-k/q-q (ablation);
    ffn: also run each block's FFN on the new path (ablation); feature_surgery: ``auto``
    (class set, or the empty-string redundancy for free-form queries), ``classes``,
    ``redundant``, ``off``; weighting: class-set weights from the ``cls`` token (the
    reference's code) or every ``token`` (its first commit); positions: positional-table
    interpolation."""

    depth: int | None = None
    attention: Literal["vv", "qk", "kk", "qq"] = "vv"
    ffn: bool = False
    feature_surgery: Literal["auto", "classes", "redundant", "off"] = "auto"
    weighting: Literal["cls", "token"] = "cls"
    positions: PositionMode = "bilinear"

    def __post_init__(self) -> None:
        if self.depth is not None and self.depth < 0:
            raise ValueError(f"option depth must be >= 0, got {self.depth}")


DEFAULT_DEPTH = PARALLEL_DEPTH


class ClipSurgery(ForwardMethod):
    """CLIP Surgery (Li et al., Pattern Recognition 2025, arXiv 2304.05653)."""

    name = "clip_surgery"
    summary = "v-v attention path in the last blocks + feature surgery (the default)"
    citation = (
        "Li et al., A Closer Look at the Explainability of Contrastive Language-Image "
        "Pre-training, Pattern Recognition 2025 (arXiv 2304.05653)"
    )
    needs_blocks = False
    Options = ClipSurgeryOptions

    def resolved(self, options: ClipSurgeryOptions, tower) -> ClipSurgeryOptions:
        """The depth that runs on ``tower`` (a ResNet's head keeps ``None``: on)."""
        if not tower.blocks:
            return options
        return replace(options, depth=parallel_depth(options.depth, len(tower.blocks)))

    def plan(self, options: ClipSurgeryOptions, tower) -> engine.Plan:
        """A parallel path over the last ``depth`` blocks, the embedding from the original path;
        on a tower without blocks (ResNet), the attention pool's dense tokens use the attention."""
        attention = pairwise(options.attention)
        if not tower.blocks:
            head = attention if options.depth != 0 else None
            return engine.Plan(head_attention=head, positions=options.positions)
        depth = self.resolved(options, tower).depth
        if depth > len(tower.blocks):
            raise OptionError(
                f"option depth of 'clip_surgery' must be in [0, {len(tower.blocks)}] for this "
                f"model, got {depth}"
            )
        return engine.Plan(
            blocks=depth,
            attention=attention,
            parallel=True,
            ffn=options.ffn,
            positions=options.positions,
        )

    def scores(self, backbone, images, query: TextQuery, options: ClipSurgeryOptions) -> Scores:
        """Feature surgery on the surgery tokens; token scores are their plain cosines."""
        trace = self.encode(backbone, images, options)
        tokens = F.normalize(torch.cat([trace.pooled[:, None], trace.dense], dim=1), dim=-1)
        text = query.embeddings
        mode = options.feature_surgery
        if mode == "auto":
            mode = "redundant" if query.free_form else "classes"
        if mode == "redundant":
            similarity = feature_surgery(tokens, text, query.redundant())
        elif mode == "classes":
            similarity = feature_surgery(tokens, text, weighting=options.weighting)
        else:
            similarity = tokens @ text.T
        cosine = tokens @ text.T
        return Scores(similarity[:, 1:], cosine[:, 1:], cosine[:, 0], trace.grid)
