"""Deprecated module name, kept so old imports work: the wrapper is in ``clip_surgery.model``,
loading in ``clip_surgery.loading``."""

from __future__ import annotations

from .loading import build_from_state_dict, infer_config, load, read_state_dict, wrap
from .methods.clip_surgery import DEFAULT_DEPTH
from .model import Explanation, SurgeryModel
from .text import DEFAULT_TEMPLATES

__all__ = [
    "DEFAULT_DEPTH",
    "DEFAULT_TEMPLATES",
    "Explanation",
    "SurgeryModel",
    "build_from_state_dict",
    "infer_config",
    "load",
    "read_state_dict",
    "wrap",
]
