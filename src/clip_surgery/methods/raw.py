"""Raw CLIP: cosine of the plain model's projected patch tokens (the baseline)."""

from __future__ import annotations

from .. import engine
from .base import Method


class Raw(Method):
    """Raw CLIP (Radford et al., ICML 2021): its maps are often opposite (background-heavy)."""

    name = "raw"
    summary = "cosine of the plain model's projected patch tokens (the baseline)"
    citation = (
        "Radford et al., Learning Transferable Visual Models From Natural "
        "Language Supervision, ICML 2021"
    )
    backbones = ("vit", "resnet")

    def policy(self, options) -> engine.Policy:
        """The model as is."""
        return engine.PLAIN
