"""MaskCLIP: the last block's attention replaced by its value path (no query-key attention).

Zhou et al., "Extract Free Dense Labels from CLIP", ECCV 2022; code github.com/chongzhou96/MaskCLIP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .. import engine
from .base import Method


@dataclass(frozen=True)
class MaskClipOptions:
    """residual / ffn: keep the last block's residual and FFN around ``out_proj(v)``."""

    residual: bool = True
    ffn: bool = True
    positions: Literal["bilinear", "bicubic-dino", "bicubic-antialias"] = "bilinear"


class MaskClip(Method):
    """MaskCLIP (Zhou et al., ECCV 2022) on a ViT: last block ``x + out_proj(v)`` then FFN."""

    name = "maskclip"
    summary = "last block: value path only, out_proj(v), no q-k attention"
    citation = "Zhou et al., Extract Free Dense Labels from CLIP, ECCV 2022"
    Options = MaskClipOptions

    def policy(self, options: MaskClipOptions) -> engine.Policy:
        """Replace the last block's attention with the identity over values."""
        return engine.Policy(
            kind="replace",
            blocks=1,
            attention="identity",
            residual=options.residual,
            ffn=options.ffn,
            positions=options.positions,
        )
