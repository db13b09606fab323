"""clip-surgery: make CLIP explain itself.

CLIP Surgery (Li et al., "A Closer Look at the Explainability of Contrastive Language-Image
Pre-training", Pattern Recognition 2025, arXiv 2304.05653) on open_clip models.
"""

from . import methods
from .errors import (
    ClipSurgeryError,
    DatasetError,
    ImageError,
    InputFileError,
    ModelError,
    TextError,
    WeightsUnavailableError,
)
from .features import feature_surgery, similarity_map
from .methods import OptionError
from .models import DEFAULT_TEMPLATES, Explanation, SurgeryModel, load, wrap
from .points import points_for_targets, points_from_map

__version__ = "0.1.0"


def explain(model: SurgeryModel, images, texts, method: str = "clip_surgery", **options):
    """Maps ``[B, T, H, W]`` in [0, 1] and dense logits of any registered method.

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
