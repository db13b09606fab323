"""The registry of explanation methods: ``clip_surgery.methods.get(name)``."""

from __future__ import annotations

from ..errors import ModelError
from .base import Method, NoOptions, OptionError, Scores, parse_options
from .chefer import Chefer
from .clearclip import ClearClip
from .clip_surgery import ClipSurgery
from .gem import Gem
from .gradcam import GradCam
from .maskclip import MaskClip
from .naclip import Naclip
from .raw import Raw
from .sclip import Sclip

METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Raw(),
        ClipSurgery(),
        MaskClip(),
        Sclip(),
        ClearClip(),
        Naclip(),
        Gem(),
        GradCam(),
        Chefer(),
    )
}
DEFAULT_METHOD = "clip_surgery"


def names() -> list[str]:
    """Registered method names, in listing order."""
    return list(METHODS)


def get(name: str) -> Method:
    """The method called ``name``; ModelError listing the known ones otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ModelError(f"unknown method {name!r}; known: {', '.join(METHODS)}") from None


__all__ = [
    "DEFAULT_METHOD",
    "METHODS",
    "Method",
    "NoOptions",
    "OptionError",
    "Scores",
    "get",
    "names",
    "parse_options",
]
