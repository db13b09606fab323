"""Defaults shared by the API and the command line, defined once and importable without torch."""

from __future__ import annotations

DEFAULT_METHOD = "clip_surgery"
"""The method ``explain`` and every command use unless told otherwise."""

DEFAULT_MODEL = "ViT-B/16"
"""The model the command line loads without ``--model`` or ``--checkpoint``."""

MAX_INPUT_SIDE = 2048
"""Largest model input side accepted (a ViT-B/16 then sees 128 x 128 = 16384 tokens)."""

DISPLAY_MAX_SIDE = 2048
"""The command line reads images at most this long (overlays too): ``--max-side``."""
