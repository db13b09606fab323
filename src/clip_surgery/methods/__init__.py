"""The registry of explanation methods: ``clip_surgery.methods.get(name)``.

A new method is one file: a ``ForwardMethod`` with a ``plan`` (or a ``GradientMethod``), then
``register(MyMethod())``.
"""

from __future__ import annotations

from ..defaults import DEFAULT_METHOD
from ..errors import ModelError, OptionError
from .base import (
    ForwardMethod,
    GradientMethod,
    Method,
    NoOptions,
    Scores,
    TextQuery,
    pairwise,
    parse_options,
)
from .chefer import Chefer
from .clearclip import ClearClip
from .clip_surgery import ClipSurgery
from .cliper import Cliper
from .gem import Gem
from .gradcam import GradCam
from .legrad import Legrad
from .maskclip import MaskClip
from .naclip import Naclip
from .raw import Raw
from .resclip import Resclip
from .scclip import Scclip
from .sclip import Sclip

METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry under its ``name`` (replacing one of that name)."""
    METHODS[method.name] = method
    return method


for _method in (Raw(), ClipSurgery(), MaskClip(), Sclip(), ClearClip(), Naclip(), Gem(),
                GradCam(), Chefer(), Resclip(), Scclip(), Cliper(), Legrad()):  # fmt: skip
    register(_method)


def names() -> list[str]:
    """Registered method names, in listing order."""
    return list(METHODS)


def get(name: str | Method) -> Method:
    """The method called ``name``; ModelError listing the known ones otherwise."""
    if isinstance(name, Method):
        return name
    try:
        return METHODS[name]
    except KeyError:
        raise ModelError(f"unknown method {name!r}; known: {', '.join(METHODS)}") from None


__all__ = [
    "DEFAULT_METHOD",
    "METHODS",
    "ForwardMethod",
    "GradientMethod",
    "Method",
    "NoOptions",
    "OptionError",
    "Scores",
    "TextQuery",
    "get",
    "names",
    "pairwise",
    "parse_options",
    "register",
]
