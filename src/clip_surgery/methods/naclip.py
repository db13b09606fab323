"""NACLIP: k-k attention plus a Gaussian neighbourhood prior, last block without residual/FFN.

Hajimiri et al., "Pay Attention to Your Neighbours: Training-Free Open-Vocabulary Semantic
Segmentation", WACV 2025; code github.com/sinahmr/NACLIP (``arch='reduced'``,
``attn_strategy='naclip'``, ``gaussian_std=5``; PAMR post-processing is not applied).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import engine
from ..typedefs import PositionMode
from .base import ForwardMethod


def neighbourhood_bias(grid, prefix: int, std: float, device, dtype) -> torch.Tensor:
    """An additive Gaussian window over patch distances; zero for the prefix rows/columns."""
    rows, cols = torch.meshgrid(
        torch.arange(grid[0], device=device), torch.arange(grid[1], device=device), indexing="ij"
    )
    cells = torch.stack([rows.flatten(), cols.flatten()], dim=1).to(torch.float32)
    squared = torch.cdist(cells, cells).pow(2)
    bias = torch.zeros(len(cells) + prefix, len(cells) + prefix, device=device)
    bias[prefix:, prefix:] = torch.exp(-squared / (2 * std**2))
    return bias.to(dtype)


@dataclass(frozen=True)
class NaclipOptions:
    """gaussian_std: neighbourhood window width in patches; residual/ffn: NACLIP drops both."""

    gaussian_std: float = 5.0
    residual: bool = False
    ffn: bool = False
    positions: PositionMode = "bicubic-dino"

    def __post_init__(self) -> None:
        if not self.gaussian_std > 0:
            raise ValueError(f"option gaussian_std must be positive, got {self.gaussian_std}")


class Naclip(ForwardMethod):
    """NACLIP (Hajimiri et al., WACV 2025)."""

    name = "naclip"
    summary = "last block: k-k attention + Gaussian neighbourhood prior, no residual, no FFN"
    citation = (
        "Hajimiri et al., Pay Attention to Your Neighbours: Training-Free "
        "Open-Vocabulary Semantic Segmentation, WACV 2025"
    )
    Options = NaclipOptions

    def plan(self, options: NaclipOptions, tower) -> engine.Plan:
        """Neighbourhood-aware k-k attention in the last block."""

        def attention(q, k, v, context):
            bias = neighbourhood_bias(
                context.grid, context.prefix, options.gaussian_std, q.device, q.dtype
            )
            return F.scaled_dot_product_attention(k, k, v, attn_mask=bias)

        return engine.Plan(
            blocks=1,
            attention=attention,
            residual=options.residual,
            ffn=options.ffn,
            positions=options.positions,
        )
