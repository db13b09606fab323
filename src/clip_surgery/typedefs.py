"""Types shared by every part of the package, defined once."""

from __future__ import annotations

import typing
from typing import Literal

Size = int | tuple[int, int]
"""An image side in pixels, or ``(height, width)``."""

Grid = tuple[int, int]
"""A patch-token grid ``(rows, columns)``."""

PositionMode = Literal["bilinear", "bicubic-dino", "bicubic-antialias"]
"""How a positional table is resized to another grid (see ``backbones.common``)."""

POSITION_MODES: tuple[str, ...] = typing.get_args(PositionMode)
