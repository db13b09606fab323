"""CLIP Surgery: architecture surgery (dual path) plus feature surgery.

Li et al., "A Closer Look at the Explainability of Contrastive Language-Image Pre-training",
Pattern Recognition 2025 (arXiv 2304.05653); reference code github.com/xmed-lab/CLIP_Surgery.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch.nn.functional as F

from .. import engine
from ..features import feature_surgery
from .base import Method, Scores


@dataclass(frozen=True)
class ClipSurgeryOptions:
    """depth: blocks with the new path; attention: v-v (paper) or q-k/k-k/q-q (ablation);
    ffn: also run each block's FFN on the new path (ablation); feature_surgery: ``auto``
    (class set, or the empty-string redundancy when ``single``), ``classes``, ``redundant``,
    ``off``; weighting: class-set weights from the ``cls`` token (METHOD.md) or every
    ``token`` (reference code); positions: positional-table interpolation."""

    depth: int = 6
    attention: Literal["vv", "qk", "kk", "qq"] = "vv"
    ffn: bool = False
    feature_surgery: Literal["auto", "classes", "redundant", "off"] = "auto"
    weighting: Literal["cls", "token"] = "cls"
    positions: Literal["bilinear", "bicubic-dino", "bicubic-antialias"] = "bilinear"


class ClipSurgery(Method):
    """CLIP Surgery (Li et al., Pattern Recognition 2025, arXiv 2304.05653)."""

    name = "clip_surgery"
    summary = "v-v attention path in the last blocks + feature surgery (the default)"
    citation = (
        "Li et al., A Closer Look at the Explainability of Contrastive Language-Image "
        "Pre-training, Pattern Recognition 2025 (arXiv 2304.05653)"
    )
    backbones = ("vit", "resnet")
    Options = ClipSurgeryOptions

    def policy(self, options: ClipSurgeryOptions) -> engine.Policy:
        """A dual path over the last ``depth`` blocks, CLS from the original path."""
        if options.depth == 0:
            return engine.Policy(positions=options.positions)
        return engine.Policy(
            kind="dual",
            blocks=options.depth,
            attention=options.attention,
            ffn=options.ffn,
            positions=options.positions,
        )

    def encode_resnet(self, model, images, options: ClipSurgeryOptions):
        """The v-v attention pool (the ResNet has no depth or attention knobs)."""
        return engine.encode_tokens(model.clip.visual, images, depth=1 if options.depth else 0)

    def scores(self, model, images, text, options: ClipSurgeryOptions, redundant=None) -> Scores:
        """Feature surgery on the surgery tokens; logits are the plain cosines (for argmax)."""
        tokens, grid = self.encode(model, images, options)
        tokens = F.normalize(tokens.float(), dim=-1)
        mode = options.feature_surgery
        if mode == "auto":
            mode = "redundant" if redundant is not None else "classes"
        if mode == "redundant":
            if redundant is None:
                redundant = model.redundant_feature()
            similarity = feature_surgery(tokens, text, redundant)
        elif mode == "classes":
            similarity = feature_surgery(tokens, text, weighting=options.weighting)
        else:
            similarity = tokens @ text.T
        logits = tokens[:, 1:] @ text.T
        return Scores(similarity[:, 1:], logits, tokens[:, 0] @ text.T, grid)
