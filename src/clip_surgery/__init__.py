"""clip-surgery: make vision-language models explain themselves.

CLIP Surgery (Li et al., "A Closer Look at the Explainability of Contrastive Language-Image
Pre-training", Pattern Recognition 2025, arXiv 2304.05653) and its peers, on open_clip and
Hugging Face transformers CLIP, SigLIP and EVA-CLIP models, through one API.

The public names below are imported on first use, so ``import clip_surgery`` (and the command
line's ``--help``) stays fast: torch and open_clip load when a model is first needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .defaults import DEFAULT_METHOD
from .errors import (
    ClipSurgeryError,
    DatasetError,
    DistributedError,
    ImageError,
    InputFileError,
    ModelError,
    OptionError,
    TextError,
    TokenizerUnavailableError,
    WeightsUnavailableError,
)

__version__ = "0.2.0"

_LAZY = {
    "methods": (".methods", None),
    "feature_surgery": (".features", "feature_surgery"),
    "similarity_map": (".features", "similarity_map"),
    "load": (".loading", "load"),
    "wrap": (".loading", "wrap"),
    "Explanation": (".model", "Explanation"),
    "SurgeryModel": (".model", "SurgeryModel"),
    "points_for_targets": (".points", "points_for_targets"),
    "points_from_map": (".points", "points_from_map"),
    "DEFAULT_TEMPLATES": (".text", "DEFAULT_TEMPLATES"),
}

if TYPE_CHECKING:
    from . import methods
    from .features import feature_surgery, similarity_map
    from .loading import load, wrap
    from .model import Explanation, SurgeryModel
    from .points import points_for_targets, points_from_map
    from .text import DEFAULT_TEMPLATES


def __getattr__(name: str):
    """Import a public name on first use (PEP 562)."""
    if name not in _LAZY:
        raise AttributeError(f"module 'clip_surgery' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name, __name__)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def explain(model: SurgeryModel, images, texts, method: str = DEFAULT_METHOD, **options):
    """Maps ``[B, T, H, W]`` in [0, 1] and dense scores of any registered method.

    The same as ``model.explain(images, texts, method=method, **options)``.
    """
    return model.explain(images, texts, method=method, **options)


__all__ = [
    "DEFAULT_TEMPLATES",
    "ClipSurgeryError",
    "DatasetError",
    "DistributedError",
    "Explanation",
    "ImageError",
    "InputFileError",
    "ModelError",
    "OptionError",
    "SurgeryModel",
    "TextError",
    "TokenizerUnavailableError",
    "WeightsUnavailableError",
    "explain",
    "feature_surgery",
    "load",
    "methods",
    "points_for_targets",
    "points_from_map",
    "similarity_map",
    "wrap",
]
