"""clip-surgery: make CLIP explain itself.

CLIP Surgery (Li et al., "A Closer Look at the Explainability of Contrastive Language-Image
Pre-training", Pattern Recognition 2025, arXiv 2304.05653) on open_clip models.
"""

from .errors import (
    ClipSurgeryError,
    ImageError,
    InputFileError,
    ModelError,
    TextError,
    WeightsUnavailableError,
)
from .features import feature_surgery, similarity_map
from .models import DEFAULT_TEMPLATES, Explanation, SurgeryModel, load, wrap
from .points import points_for_targets, points_from_map

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_TEMPLATES",
    "ClipSurgeryError",
    "Explanation",
    "ImageError",
    "InputFileError",
    "ModelError",
    "SurgeryModel",
    "TextError",
    "WeightsUnavailableError",
    "feature_surgery",
    "load",
    "points_for_targets",
    "points_from_map",
    "similarity_map",
    "wrap",
]
