"""The two kinds of method (forward and gradient), what they return, and typed options.

A forward method is its options, a citation and a ``plan`` (engine.Plan: which blocks get
which attention callable); the engine runs it over any backbone adapter. A gradient method
runs the model's own forward with taps and differentiates the image-text score.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import engine
from ..backbones import FAMILIES, Backbone, Family, capabilities
from ..backbones.base import Attention, AttentionContext, VisionTower
from ..errors import ModelError, OptionError
from ..typedefs import Grid


@dataclass(frozen=True)
class NoOptions:
    """This method takes no options."""


@dataclass
class TextQuery:
    """Normalised text embeddings ``[T, D]`` and how to read them.

    ``free_form``: the texts are free-form queries (CLIP Surgery removes the redundant
    feature ``redundant()``, the empty string's embedding under the same templates), not a
    class set.
    """

    embeddings: Tensor
    free_form: bool = False
    redundant_feature: Callable[[], Tensor] | None = None

    def redundant(self) -> Tensor:
        """The empty string's embedding ``[1, D]`` under the templates of ``embeddings``."""
        if self.redundant_feature is None:
            raise ModelError("this text query has no redundant feature")
        return self.redundant_feature()


@dataclass
class Scores:
    """Per-patch scores of B images against T texts."""

    similarity: Tensor  # [B, N, T]: what the maps are made from
    token_scores: Tensor  # [B, N, T]: dense per-token scores for segmentation (argmax over T)
    cosine: Tensor  # [B, T]: cosine of the method's image embedding with each text
    grid: Grid

    @property
    def logits(self) -> Tensor:
        """Deprecated name of ``token_scores``."""
        warnings.warn("Scores.logits is now token_scores", DeprecationWarning, stacklevel=2)
        return self.token_scores


def pairwise(kind: str) -> Attention:
    """``softmax(a b^T / sqrt(d)) v`` with a, b taken from q, k, v by ``kind`` (``"vv"``, ...)."""
    first, second = "qkv".index(kind[0]), "qkv".index(kind[1])

    def attention(q: Tensor, k: Tensor, v: Tensor, context: AttentionContext) -> Tensor:
        sources = (q, k, v)
        return F.scaled_dot_product_attention(sources[first], sources[second], v)

    return attention


class Method:
    """What every method has: a name, a citation, typed options, and scores."""

    name: ClassVar[str]
    summary: ClassVar[str]
    citation: ClassVar[str]
    needs_blocks: ClassVar[bool] = True  # False: also runs on towers without blocks (ResNet)
    requirement: ClassVar[str] = "changes transformer blocks"  # what else it needs, in words
    gradient: ClassVar[bool] = False
    Options: ClassVar[type] = NoOptions

    def options(self, **values: Any):
        """This method's options; strings (from the CLI) are converted to the field types."""
        return parse_options(self.Options, values, self.name)

    def resolved(self, options, tower):
        """``options`` with each model-dependent default (``None``) replaced by what runs on
        ``tower`` (a block count, block indices), for result files to state."""
        return options

    needs_cls_token: ClassVar[bool] = False  # reads a CLS token's own row or value
    needs_plain_positions: ClassVar[bool] = False  # computes q/k itself: no rotary towers

    def supports(self, family: Family) -> bool:
        """True when this method applies to models of ``family``."""
        if self.needs_cls_token and not family.cls_token:
            return False
        if self.needs_plain_positions and family.rotary:
            return False
        return family.has_blocks or not self.needs_blocks

    def families(self) -> list[str]:
        """The names of the families this method applies to."""
        return [family.name for family in FAMILIES if self.supports(family)]

    def check(self, backbone: Backbone) -> None:
        """ModelError naming the supported families when this method cannot run on the model."""
        offered = capabilities(backbone)
        if not self.supports(offered):
            blocks = self.needs_blocks and not offered.has_blocks
            reason = "changes transformer blocks" if blocks else self.requirement
            raise ModelError(
                f"method {self.name!r} {reason} and applies to "
                f"{', '.join(self.families())}; this model is {backbone.family}"
            )

    def scores(
        self, backbone: Backbone, images: Tensor, query: TextQuery, options
    ) -> Scores:  # pragma: no cover - every subclass overrides it
        """Per-patch scores of ``images`` against ``query``."""
        raise NotImplementedError

    def describe(self) -> dict:
        """Name, summary, citation, families and options with their defaults, for listings."""
        fields = {f.name: f.default for f in dataclasses.fields(self.Options)}
        return {
            "name": self.name,
            "summary": self.summary,
            "citation": self.citation,
            "kind": "gradient" if self.gradient else "forward",
            "families": self.families(),
            "options": fields,
        }


class ForwardMethod(Method):
    """A method that changes the forward: ``plan`` says how; scores are cosines of its tokens."""

    def plan(self, options, tower: VisionTower) -> engine.Plan:  # pragma: no cover
        """The engine plan for ``options`` on ``tower``."""
        raise NotImplementedError

    def encode(self, backbone: Backbone, images: Tensor, options) -> engine.Trace:
        """The method's image embedding and dense tokens (projected, not normalised)."""
        self.check(backbone)
        plan = self.plan(options, backbone.vision)
        with backbone.inference():
            trace = engine.run(backbone.vision, images, plan)
        return engine.Trace(trace.pooled.float(), trace.dense.float(), trace.grid)

    def scores(self, backbone: Backbone, images: Tensor, query: TextQuery, options) -> Scores:
        """Cosine of the normalised patch tokens (and image embedding) with each text."""
        trace = self.encode(backbone, images, options)
        text = query.embeddings
        dense = F.normalize(trace.dense, dim=-1) @ text.T
        return Scores(dense, dense, F.normalize(trace.pooled, dim=-1) @ text.T, trace.grid)


class GradientMethod(Method):
    """A method that differentiates the image-text score; it has no token forward."""

    gradient = True

    def encode(self, backbone: Backbone, images: Tensor, options) -> engine.Trace:
        """Gradient methods have no tokens of their own."""
        raise ModelError(f"method {self.name!r} uses gradients; it has no token forward")

    @staticmethod
    def cosine(trace: engine.Trace, text: Tensor) -> Tensor:
        """Cosine ``[B, T]`` of the (differentiable) image embedding with each text."""
        return F.normalize(trace.pooled.float(), dim=-1) @ text.T

    @staticmethod
    def per_text(
        score: Tensor, inputs, compute: Callable[..., Tensor], scale: float = 1.0
    ) -> Tensor:
        """``compute(gradients)`` for each text column of ``score`` ``[B, T]``: ``[B, N, T]``.

        ``scale`` (a power of two) multiplies the score before the backward pass and divides
        the fp32 gradients after it, as a loss scaler does: exact in fp32, and under fp16
        autocast it keeps small gradients from flushing to zero."""
        columns = score.shape[1]
        results = []
        for index in range(columns):
            gradients = torch.autograd.grad(
                score[:, index].sum() * scale, inputs, retain_graph=index < columns - 1
            )
            if scale != 1:  # unscaled in fp32; without a scale the gradients pass as they are
                gradients = [gradient.float() / scale for gradient in gradients]
            results.append(compute(gradients))
        return torch.stack(results, dim=-1).detach().float()


def parse_options(options_type: type, values: dict[str, Any], method: str):
    """Typed options: unknown names are an error, strings are converted, Literals checked."""
    fields = {f.name: f for f in dataclasses.fields(options_type)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        known = ", ".join(fields) or "none"
        raise OptionError(f"unknown option(s) {', '.join(unknown)} for {method!r}; known: {known}")
    hints = typing.get_type_hints(options_type)
    converted = {name: _convert(name, value, hints[name], method) for name, value in values.items()}
    try:
        return options_type(**converted)
    except (ValueError, TypeError) as error:  # an Options.__post_init__ range check
        raise OptionError(f"{method!r}: {error}") from None


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
        converted = hint(value)
    except (TypeError, ValueError):
        raise OptionError(
            f"option {name} of {method!r} must be {hint.__name__}, got {value!r}"
        ) from None
    if hint is float and not math.isfinite(converted):
        raise OptionError(f"option {name} of {method!r} must be a finite number, got {value!r}")
    return converted
