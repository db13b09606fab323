"""GEM: a parallel self-self attention path (q-q, k-k, v-v, normalised, with a temperature).

Bousselham et al., "Grounding Everything: Emerging Localization Properties in Vision-Language
Transformers", CVPR 2024; code github.com/WalBouss/GEM (``depth=7`` there means the last 6
blocks; ``ss_attn_iter=1``; temperature from the mean token norm when not given).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .. import engine
from .base import Method


@dataclass(frozen=True)
class GemOptions:
    """depth: blocks with the GEM path; iterations: self-self refinement steps; temperature:
    inverse temperature (``None``: mean token norm / sqrt(head dim), as GEM's code)."""

    depth: int = 6
    iterations: int = 1
    temperature: float | None = None
    positions: Literal["bilinear", "bicubic-dino", "bicubic-antialias"] = "bicubic-antialias"


class Gem(Method):
    """GEM (Bousselham et al., CVPR 2024); tokens (CLS included) come from the GEM path."""

    name = "gem"
    summary = "parallel self-self (q-q, k-k, v-v) attention path with normalisation and temperature"
    citation = (
        "Bousselham et al., Grounding Everything: Emerging Localization "
        "Properties in Vision-Language Transformers, CVPR 2024"
    )
    Options = GemOptions

    def policy(self, options: GemOptions) -> engine.Policy:
        """A dual path with self-self attention whose CLS is its own."""
        return engine.Policy(
            kind="dual",
            blocks=options.depth,
            attention="self-self",
            cls="new",
            self_self_iterations=options.iterations,
            self_self_temperature=options.temperature,
            positions=options.positions,
        )
