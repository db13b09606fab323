"""What every explanation method provides, and typed option parsing."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from .. import engine
from ..errors import ClipSurgeryError, ModelError


class OptionError(ClipSurgeryError):
    """An unknown option, or an option value of the wrong type or out of range."""


@dataclass(frozen=True)
class NoOptions:
    """This method takes no options."""


@dataclass
class Scores:
    """Per-patch scores of B images against T texts."""

    similarity: torch.Tensor  # [B, N, T]: what the maps are made from
    logits: torch.Tensor  # [B, N, T]: dense per-token scores for segmentation (argmax)
    cosine: torch.Tensor  # [B, T]: cosine of the method's CLS token with each text
    grid: tuple[int, int]


class Method:
    """Base class: a name, a citation, typed options, and how to score patches against texts.

    Forward methods set ``policy`` (the ViT's last blocks) and inherit everything else;
    gradient methods override ``scores``.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    citation: ClassVar[str]
    backbones: ClassVar[tuple[str, ...]] = ("vit",)
    gradient: ClassVar[bool] = False
    Options: ClassVar[type] = NoOptions

    def options(self, **values: Any):
        """Build this method's options, converting strings (from the CLI) to the field types."""
        return parse_options(self.Options, values, self.name)

    def check_backbone(self, model) -> None:
        """Raise ModelError when the model's visual tower is not one this method supports."""
        backbone = "vit" if model.is_vit else "resnet"
        if backbone not in self.backbones:
            kind = "ViT" if "vit" in self.backbones else "ResNet"
            raise ModelError(f"method {self.name!r} needs a {kind}; this model is a ModifiedResNet")

    def policy(self, options) -> engine.Policy:
        """The ViT policy of a forward method."""
        raise ModelError(f"method {self.name!r} does not change the forward; it has no tokens")

    def encode(self, model, images: torch.Tensor, options) -> tuple[torch.Tensor, tuple[int, int]]:
        """The method's projected tokens ``[B, 1+N, D]`` (CLS first, not normalized), grid."""
        self.check_backbone(model)
        if self.gradient:
            raise ModelError(f"method {self.name!r} uses gradients; it has no token forward")
        with model.inference():
            if model.is_vit:
                return engine.encode_vit(model.clip.visual, images, self.policy(options))
            return self.encode_resnet(model, images, options)

    def encode_resnet(self, model, images, options):
        """ResNet tokens; only methods that list ``resnet`` in ``backbones`` get here."""
        return engine.encode_tokens(model.clip.visual, images, depth=0)

    def scores(self, model, images, text, options, redundant=None) -> Scores:
        """Cosine of the method's normalized patch tokens with each text."""
        tokens, grid = self.encode(model, images, options)
        tokens = F.normalize(tokens.float(), dim=-1)
        logits = tokens[:, 1:] @ text.T
        return Scores(logits, logits, tokens[:, 0] @ text.T, grid)

    def describe(self) -> dict:
        """Name, summary, citation, backbones and options with their defaults, for listings."""
        fields = {f.name: f.default for f in dataclasses.fields(self.Options)}
        return {
            "name": self.name,
            "summary": self.summary,
            "citation": self.citation,
            "backbones": list(self.backbones),
            "options": fields,
        }


def parse_options(options_type: type, values: dict[str, Any], method: str):
    """Typed options: unknown names are an error, strings are converted, Literals checked."""
    fields = {f.name: f for f in dataclasses.fields(options_type)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        known = ", ".join(fields) or "none"
        raise OptionError(f"unknown option(s) {', '.join(unknown)} for {method!r}; known: {known}")
    hints = typing.get_type_hints(options_type)
    converted = {name: _convert(name, value, hints[name], method) for name, value in values.items()}
    return options_type(**converted)


def _convert(name: str, value: Any, hint, method: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            raise OptionError(f"option {name} of {method!r} must be one of {args}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        hint = next(arg for arg in args if arg is not type(None))
    try:
        if hint is bool and isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        if hint is bool and not isinstance(value, bool):
            raise ValueError(value)
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return hint(value)
    except (TypeError, ValueError):
        raise OptionError(
            f"option {name} of {method!r} must be {hint.__name__}, got {value!r}"
        ) from None
