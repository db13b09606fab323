"""GEM: a parallel self-self attention path (q-q, k-k, v-v, normalised, with a temperature).

Bousselham et al., "Grounding Everything: Emerging Localization Properties in Vision-Language
Transformers", CVPR 2024; code github.com/WalBouss/GEM (``depth=7`` there means the last 6
blocks; ``ss_attn_iter=1``; temperature from the mean token norm when not given).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from .. import engine
from ..errors import OptionError
from ..typedefs import PositionMode
from .base import ForwardMethod
from .common import parallel_depth


@dataclass(frozen=True)
class GemOptions:
    """depth: blocks with the GEM path (``None``: the paper's 6, or every block of a shallower
    model); iterations: self-self refinement steps; temperature:
    inverse temperature (``None``: mean token norm / sqrt(head dim), as GEM's code)."""

    depth: int | None = None
    iterations: int = 1
    temperature: float | None = None
    positions: PositionMode = "bicubic-antialias"

    def __post_init__(self) -> None:
        if self.iterations < 0:
            raise ValueError(f"option iterations must be >= 0, got {self.iterations}")
        if self.temperature is not None and not self.temperature > 0:
            raise ValueError(f"option temperature must be positive, got {self.temperature}")


def self_self(q, k, v, normed, iterations: int, temperature: float | None):
    """GEM's self-self attention: v-v, k-k and q-q paths, normalised and iterated, averaged."""
    if temperature is None:
        temperature = normed.norm(dim=-1).mean(dim=-1).view(-1, 1, 1, 1) * q.shape[-1] ** -0.5
    outputs = []
    for x in (v, k, q):
        for _ in range(iterations):
            x = F.normalize(x, dim=-1)
            x = torch.softmax(x @ x.transpose(-1, -2) * temperature, dim=-1) @ x
        x = F.normalize(x, dim=-1)
        outputs.append(torch.softmax(x @ x.transpose(-1, -2) * temperature, dim=-1) @ v)
    return sum(outputs) / 3


class Gem(ForwardMethod):
    """GEM (Bousselham et al., CVPR 2024); its image embedding comes from the GEM path too."""

    name = "gem"
    summary = "parallel self-self (q-q, k-k, v-v) attention path with normalisation and temperature"
    citation = (
        "Bousselham et al., Grounding Everything: Emerging Localization "
        "Properties in Vision-Language Transformers, CVPR 2024"
    )
    Options = GemOptions

    def resolved(self, options: GemOptions, tower) -> GemOptions:
        """The depth that runs on ``tower``."""
        return replace(options, depth=parallel_depth(options.depth, len(tower.blocks)))

    def plan(self, options: GemOptions, tower) -> engine.Plan:
        """A parallel path with self-self attention whose CLS is its own."""
        depth = self.resolved(options, tower).depth
        if not 1 <= depth <= len(tower.blocks):
            raise OptionError(
                f"option depth of 'gem' must be in [1, {len(tower.blocks)}] for this model, "
                f"got {depth}"
            )

        def attention(q, k, v, context):
            return self_self(q, k, v, context.normed, options.iterations, options.temperature)

        return engine.Plan(
            blocks=depth,
            attention=attention,
            parallel=True,
            ffn=False,
            pooled_from="new",
            positions=options.positions,
        )
