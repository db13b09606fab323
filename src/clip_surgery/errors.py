"""One error type per kind of user mistake; the CLI prints any of them as one line."""

from __future__ import annotations


class ClipSurgeryError(Exception):
    """Base class of every error this library raises on bad input."""


class InputFileError(ClipSurgeryError):
    """A file the user named is missing, unreadable or corrupt."""


class ImageError(ClipSurgeryError):
    """An image cannot be used (unsupported mode, wrong tensor shape or size)."""


class ModelError(ClipSurgeryError):
    """An unknown model name or tag, or an architecture this library cannot run."""


class WeightsUnavailableError(ModelError):
    """Pretrained weights could not be downloaded (offline) and no local file was given."""


class TokenizerUnavailableError(ModelError):
    """A model's tokenizer comes from the hub and could not be had (offline, not cached), or
    its files cannot be read; pass a tokenizer instead."""


class TextError(ClipSurgeryError):
    """A text query is empty, not a string, or too long for the model's context."""


class DatasetError(ClipSurgeryError):
    """A dataset root does not have the expected layout, or a label file is unusable."""


class OptionError(ClipSurgeryError):
    """An unknown option, an option value of the wrong type or out of range, or conflicting
    options."""


class OutputError(ClipSurgeryError):
    """An output folder cannot be written (a file in the way, no permission, read-only)."""


class DistributedError(ClipSurgeryError):
    """A torchrun launch cannot go on: a bad environment, a command that does not shard, no GPU
    for a process, or a process group that cannot be joined."""
