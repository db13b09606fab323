"""NACLIP: k-k attention plus a Gaussian neighbourhood prior, last block without residual/FFN.

Hajimiri et al., "Pay Attention to Your Neighbours: Training-Free Open-Vocabulary Semantic
Segmentation", WACV 2025; code github.com/sinahmr/NACLIP (``arch='reduced'``,
``attn_strategy='naclip'``, ``gaussian_std=5``; PAMR post-processing is not applied).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .. import engine
from .base import Method, OptionError


@dataclass(frozen=True)
class NaclipOptions:
    """gaussian_std: neighbourhood window width in patches; residual/ffn: NACLIP drops both."""

    gaussian_std: float = 5.0
    residual: bool = False
    ffn: bool = False
    positions: Literal["bilinear", "bicubic-dino", "bicubic-antialias"] = "bicubic-dino"


class Naclip(Method):
    """NACLIP (Hajimiri et al., WACV 2025)."""

    name = "naclip"
    summary = "last block: k-k attention + Gaussian neighbourhood prior, no residual, no FFN"
    citation = (
        "Hajimiri et al., Pay Attention to Your Neighbours: Training-Free "
        "Open-Vocabulary Semantic Segmentation, WACV 2025"
    )
    Options = NaclipOptions

    def policy(self, options: NaclipOptions) -> engine.Policy:
        """Neighbourhood-aware k-k attention in the last block."""
        if options.gaussian_std <= 0:
            raise OptionError("option gaussian_std of 'naclip' must be positive")
        return engine.Policy(
            kind="replace",
            blocks=1,
            attention="neighbourhood",
            residual=options.residual,
            ffn=options.ffn,
            gaussian_std=options.gaussian_std,
            positions=options.positions,
        )
