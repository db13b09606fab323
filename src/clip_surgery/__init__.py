"""clip-surgery: make vision-language models explain themselves.

CLIP Surgery (Li et al., "A Closer Look at the Explainability of Contrastive Language-Image
Pre-training", Pattern Recognition 2025, arXiv 2304.05653) and its peers, on open_clip and
Hugging Face transformers CLIP, SigLIP and EVA-CLIP models, through one API.
"""

from . import methods
from .errors import (
    ClipSurgeryError,
    DatasetError,
    ImageError,
    InputFileError,
    ModelError,
    OptionError,
    TextError,
    TokenizerUnavailableError,
    WeightsUnavailableError,
)
from .features import feature_surgery, similarity_map
from .loading import load, wrap
from .model import Explanation, SurgeryModel
from .points import points_for_targets, points_from_map
from .text import DEFAULT_TEMPLATES

__version__ = "0.2.0"


def explain(model: SurgeryModel, images, texts, method: str = "clip_surgery", **options):
    """Maps ``[B, T, H, W]`` in [0, 1] and dense scores of any registered method.

    The same as ``model.explain(images, texts, method=method, **options)``.
    """
    return model.explain(images, texts, method=method, **options)


__all__ = [
    "DEFAULT_TEMPLATES",
    "ClipSurgeryError",
    "DatasetError",
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
