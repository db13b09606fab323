"""ClearCLIP: q-q attention in the last block, without its residual and FFN.

Lan et al., "ClearCLIP: Decomposing CLIP Representations for Dense Vision-Language Inference",
ECCV 2024; code github.com/mc-lan/ClearCLIP (open_clip/transformer.py, ``custom_attn``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .. import engine
from ..typedefs import PositionMode
from .base import ForwardMethod, pairwise


@dataclass(frozen=True)
class ClearClipOptions:
    """residual / ffn: ClearCLIP drops both; attention: ``qq`` (paper) or ``qk``/``kk``/``vv``."""

    attention: Literal["qq", "qk", "kk", "vv"] = "qq"
    residual: bool = False
    ffn: bool = False
    positions: PositionMode = "bicubic-dino"


class ClearClip(ForwardMethod):
    """ClearCLIP (Lan et al., ECCV 2024)."""

    name = "clearclip"
    summary = "last block: q-q attention, no residual, no FFN"
    citation = (
        "Lan et al., ClearCLIP: Decomposing CLIP Representations for Dense "
        "Vision-Language Inference, ECCV 2024"
    )
    Options = ClearClipOptions

    def plan(self, options: ClearClipOptions, tower) -> engine.Plan:
        """Self (q-q) attention only in the last block."""
        return engine.Plan(
            blocks=1,
            attention=pairwise(options.attention),
            residual=options.residual,
            ffn=options.ffn,
            positions=options.positions,
        )
