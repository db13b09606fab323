"""MaskCLIP: the last block's attention replaced by its value path (no query-key attention).

Zhou et al., "Extract Free Dense Labels from CLIP", ECCV 2022; code
github.com/chongzhou96/MaskCLIP.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import engine
from ..typedefs import PositionMode
from .base import ForwardMethod


def values(q, k, v, context):
    """Each token attends to itself only: the output is its own value."""
    return v


@dataclass(frozen=True)
class MaskClipOptions:
    """residual / ffn: keep the last block's residual and FFN around ``out_proj(v)``."""

    residual: bool = True
    ffn: bool = True
    positions: PositionMode = "bilinear"


class MaskClip(ForwardMethod):
    """MaskCLIP (Zhou et al., ECCV 2022) on a ViT: last block ``x + out_proj(v)`` then FFN."""

    name = "maskclip"
    summary = "last block: value path only, out_proj(v), no q-k attention"
    citation = "Zhou et al., Extract Free Dense Labels from CLIP, ECCV 2022"
    Options = MaskClipOptions

    def plan(self, options: MaskClipOptions, tower) -> engine.Plan:
        """The last block's attention becomes the identity over values."""
        return engine.Plan(
            blocks=1,
            attention=values,
            residual=options.residual,
            ffn=options.ffn,
            positions=options.positions,
        )
