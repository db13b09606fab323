"""SCLIP: correlative self-attention softmax(qq^T) + softmax(kk^T) in the last block.

Wang et al., "SCLIP: Rethinking Self-Attention for Dense Vision-Language Inference", ECCV 2024;
code github.com/wangf3014/SCLIP (clip/model.py keeps the last block's residual and FFN, and
interpolates positions bicubically with DINO's scale-factor trick).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .. import engine
from .base import Method


@dataclass(frozen=True)
class SclipOptions:
    """residual / ffn: keep the last block's residual and FFN (SCLIP's code keeps both)."""

    residual: bool = True
    ffn: bool = True
    positions: Literal["bilinear", "bicubic-dino", "bicubic-antialias"] = "bicubic-dino"


class Sclip(Method):
    """SCLIP (Wang et al., ECCV 2024)."""

    name = "sclip"
    summary = "last block: correlative attention softmax(qq^T) + softmax(kk^T)"
    citation = (
        "Wang et al., SCLIP: Rethinking Self-Attention for Dense "
        "Vision-Language Inference, ECCV 2024"
    )
    Options = SclipOptions

    def policy(self, options: SclipOptions) -> engine.Policy:
        """Correlative self-attention in the last block."""
        return engine.Policy(
            kind="replace",
            blocks=1,
            attention="csa",
            residual=options.residual,
            ffn=options.ffn,
            positions=options.positions,
        )
