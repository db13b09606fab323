"""Backbone adapters: one per model family, over the user's own module (never modified).

``adapt(model)`` picks the family; ``FAMILIES`` lists what each one offers, so a method can
say which families it applies to without naming any (docs/architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .base import Attention, AttentionContext, Backbone, Block, Head, TextTower, VisionTower


@dataclass(frozen=True)
class Family:
    """A family of models and what its vision tower offers a method."""

    name: str
    has_blocks: bool  # transformer blocks whose attention a method may change
    attentive_head: bool  # a pooling head with its own attention (ResNet's attention pool)
    loads: str  # what ``clip_surgery.load`` takes for it


FAMILIES = (
    Family(
        "open_clip ViT",
        True,
        False,
        "open_clip names + tags, OpenAI names, .pt/.bin/.safetensors files, open_clip folders",
    ),
    Family("open_clip ModifiedResNet", False, True, "RN50, RN101, RN50x4, ... (names or files)"),
    Family(
        "transformers CLIP",
        True,
        False,
        "hf-hub:ORG/NAME, save_pretrained folders, CLIPModel objects (extra [hf])",
    ),
)


def family(name: str) -> Family:
    """The family called ``name``."""
    return next(f for f in FAMILIES if f.name == name)


def adapt(module: nn.Module, tokenizer=None, **normalization) -> Backbone:
    """The adapters of a user's model; ModelError naming what is supported otherwise."""
    from . import hf_clip

    if hf_clip.matches(module):
        return hf_clip.build(module, tokenizer, **normalization)
    from ..errors import ModelError
    from . import openclip

    if not openclip.matches(module):
        raise ModelError(
            f"unsupported model {type(module).__name__}: clip-surgery runs open_clip CLIP models "
            "(ViT with CLS pooling, ModifiedResNet) and transformers CLIPModel"
        )
    return openclip.build(module, tokenizer)


__all__ = [
    "FAMILIES",
    "Attention",
    "AttentionContext",
    "Backbone",
    "Block",
    "Family",
    "Head",
    "TextTower",
    "VisionTower",
    "adapt",
    "family",
]
