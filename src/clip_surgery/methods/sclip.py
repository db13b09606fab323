"""SCLIP: correlative self-attention softmax(qq^T) + softmax(kk^T) in the last block.

Wang et al., "SCLIP: Rethinking Self-Attention for Dense Vision-Language Inference", ECCV 2024;
code github.com/wangf3014/SCLIP (clip/model.py keeps the last block's residual and FFN, and
interpolates positions bicubically with DINO's scale-factor trick).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from .. import engine
from ..typedefs import PositionMode
from .base import ForwardMethod


def correlative(q, k, v, context):
    """Correlative self-attention: query-query plus key-key attention over the values."""
    return F.scaled_dot_product_attention(q, q, v) + F.scaled_dot_product_attention(k, k, v)


@dataclass(frozen=True)
class SclipOptions:
    """residual / ffn: keep the last block's residual and FFN (SCLIP's code keeps both)."""

    residual: bool = True
    ffn: bool = True
    positions: PositionMode = "bicubic-dino"


class Sclip(ForwardMethod):
    """SCLIP (Wang et al., ECCV 2024)."""

    name = "sclip"
    summary = "last block: correlative attention softmax(qq^T) + softmax(kk^T)"
    citation = (
        "Wang et al., SCLIP: Rethinking Self-Attention for Dense "
        "Vision-Language Inference, ECCV 2024"
    )
    Options = SclipOptions

    def plan(self, options: SclipOptions, tower) -> engine.Plan:
        """Correlative self-attention in the last block."""
        return engine.Plan(
            blocks=1,
            attention=correlative,
            residual=options.residual,
            ffn=options.ffn,
            positions=options.positions,
        )
