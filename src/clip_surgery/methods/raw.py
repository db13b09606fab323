"""Raw CLIP: cosine of the plain model's projected patch tokens (the baseline).

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision",
ICML 2021; code github.com/openai/CLIP.
"""

from __future__ import annotations

from .. import engine
from .base import ForwardMethod


class Raw(ForwardMethod):
    """Raw CLIP: its maps are often opposite (background-heavy)."""

    name = "raw"
    summary = "cosine of the plain model's projected patch tokens (the baseline)"
    citation = (
        "Radford et al., Learning Transferable Visual Models From Natural "
        "Language Supervision, ICML 2021"
    )
    needs_blocks = False

    def plan(self, options, tower) -> engine.Plan:
        """The model as is."""
        return engine.PLAIN
