"""ClearCLIP: q-q attention in the last block, without its residual and FFN.

Lan et al., "ClearCLIP: Decomposing CLIP Representations for Dense Vision-Language Inference",
ECCV 2024; code github.com/mc-lan/ClearCLIP (open_clip/transformer.py, ``custom_attn``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .. import engine
from .base import Method


@dataclass(frozen=True)
class ClearClipOptions:
    """residual / ffn: ClearCLIP drops both; attention: ``qq`` (paper) or ``qk``/``kk``."""

    attention: Literal["qq", "qk", "kk", "vv"] = "qq"
    residual: bool = False
    ffn: bool = False
    positions: Literal["bilinear", "bicubic-dino", "bicubic-antialias"] = "bicubic-dino"


class ClearClip(Method):
    """ClearCLIP (Lan et al., ECCV 2024)."""

    name = "clearclip"
    summary = "last block: q-q attention, no residual, no FFN"
    citation = (
        "Lan et al., ClearCLIP: Decomposing CLIP Representations for Dense "
        "Vision-Language Inference, ECCV 2024"
    )
    Options = ClearClipOptions

    def policy(self, options: ClearClipOptions) -> engine.Policy:
        """Self (q-q) attention only in the last block."""
        return engine.Policy(
            kind="replace",
            blocks=1,
            attention=options.attention,
            residual=options.residual,
            ffn=options.ffn,
            positions=options.positions,
        )
