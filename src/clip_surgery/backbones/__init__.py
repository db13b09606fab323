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
    attentive_head: bool  # dense tokens go through the head's attention (ResNet's attention pool)
    cls_token: bool  # the image embedding is a CLS token's, which attends in every block
    loads: str  # what ``clip_surgery.load`` takes for it
    rotary: bool = False  # q and k rotated by position (EVA): methods reading q/k themselves differ


FAMILIES = (
    Family(
        "open_clip ViT",
        True,
        False,
        True,
        "open_clip names + tags, OpenAI names, .pt/.bin/.safetensors files, open_clip folders",
    ),
    Family(
        "open_clip ModifiedResNet",
        False,
        True,
        False,
        "RN50, RN101, RN50x4, ... (names or files)",
    ),
    Family(
        "transformers CLIP",
        True,
        False,
        True,
        "hf-hub:ORG/NAME, save_pretrained folders, CLIPModel objects (extra [hf])",
    ),
    Family(
        "open_clip SigLIP",
        True,
        False,
        False,
        "timm ViT towers with a MAP head: ViT-B-16-SigLIP, ViT-B-16-SigLIP2, ... + tag webli, "
        "files (name + file), hf-hub:timm/..., open_clip folders; needs timm and the model's "
        "tokenizer (hub) or tokenizer=",
    ),
    Family(
        "open_clip EVA",
        True,
        False,
        True,
        "timm Eva (or ViT) towers with CLS pooling: EVA02-B-16, EVA02-L-14, ... + tags, files, "
        "open_clip folders; needs timm",
        rotary=True,
    ),
    Family(
        "transformers SigLIP",
        True,
        False,
        False,
        "hf-hub:google/siglip-..., save_pretrained folders, SiglipModel objects (extra [hf]; "
        "SigLIP's tokenizer files or tokenizer=)",
    ),
    Family(
        "open_clip ViT (avg pool)",
        True,
        False,
        False,
        "open_clip ViT configs with pool_type 'avg' (tiny-synth): the model name (+ a weights "
        "file) or a folder with its open_clip config; a bare weights file cannot show the pooling",
    ),
)


def family(name: str) -> Family:
    """The family called ``name``."""
    return next(f for f in FAMILIES if f.name == name)


def capabilities(backbone: Backbone) -> Family:
    """What ``backbone``'s vision tower offers, read from its adapters, under its family's name."""
    vision = backbone.vision
    known = {entry.name: entry.loads for entry in FAMILIES}
    return Family(
        backbone.family,
        bool(vision.blocks),
        vision.head.attentive,
        vision.head.pools_first_token,
        known.get(backbone.family, ""),
        bool(getattr(vision, "rotary", False)),
    )


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
            "(ViT with CLS or average pooling, ModifiedResNet, timm SigLIP and EVA towers) and "
            "transformers CLIPModel and SiglipModel"
        )
    return openclip.build(module, tokenizer, **normalization)


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
    "capabilities",
    "family",
]
