"""The adapter protocol: what a method may ask of a vision tower and a text tower.

A backbone adapter reads the user's module and never modifies it. The engine runs any
method's plan over these few operations, so a new family of models is one adapter, and a new
method never touches a family (docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor, nn

from ..inference import inference
from ..typedefs import Grid, PositionMode


@dataclass(frozen=True)
class AttentionContext:
    """What an attention callable may read besides q, k and v."""

    grid: Grid  # patch grid (rows, columns)
    prefix: int  # tokens before the patch tokens (the CLS token, or a pool's mean token)
    normed: Tensor  # the block's normalised input [B, prefix + N, W]
    block: int  # the block's index; -1 inside a pooling head


Attention = Callable[[Tensor, Tensor, Tensor, AttentionContext], Tensor]
"""``(q, k, v, context) -> [B, heads, N, head_dim]``; q, k, v are ``[B, heads, N, head_dim]``."""


class Block(Protocol):
    """One transformer block of a vision tower, pre-norm: ``x + attn(norm1(x))``, then FFN."""

    heads: int

    def norm1(self, x: Tensor) -> Tensor:
        """The norm before attention."""

    def qkv(self, normed: Tensor, grid: Grid) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v of normalised tokens on ``grid``, each ``[B, heads, N, head_dim]`` (the grid
        places rotary position embeddings; blocks without them ignore it)."""

    def attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """The block's own attention (softmax(q k^T / sqrt(d)) v for CLIP)."""

    def out(self, heads: Tensor) -> Tensor:
        """Output projection (bias and layer scale included) of per-head outputs: ``[B, N, W]``."""

    def ffn(self, x: Tensor) -> Tensor:
        """``x + FFN(norm2(x))`` (with the block's layer scale)."""


class Head(Protocol):
    """The tower's pooling head: the image embedding, and the per-token value path."""

    pools_first_token: bool  # the pooled embedding reads token 0 only (CLS pooling)
    attentive: bool  # dense tokens go through the head's own attention (ResNet's attention pool)

    def pool(self, x: Tensor, grid: Grid, positions: PositionMode) -> Tensor:
        """The image embedding ``[B, D]`` (projected, not normalised)."""

    def dense(
        self, x: Tensor, grid: Grid, positions: PositionMode, attention: Attention | None
    ) -> Tensor:
        """One projected feature per patch token ``[B, N, D]``; ``attention`` replaces an
        attentive head's own attention for these tokens (``None``: the head's own); a head
        that is not attentive ignores it (docs/method.md, section 3)."""


class VisionTower(Protocol):
    """A vision tower as the engine sees it."""

    prefix: int  # tokens before the patch tokens after embedding (1: CLS; 0: none)
    blocks: Sequence[Block]
    head: Head
    native_size: tuple[int, int]  # (height, width) the model was trained at
    min_size: int  # smallest input side in pixels that gives one token

    def embed(self, images: Tensor, positions: PositionMode) -> tuple[Tensor, Grid]:
        """Tokens ``[B, prefix + N, W]`` entering the first block, and their grid."""


class TextTower(Protocol):
    """A text tower: tokenizer and encoders."""

    context_length: int

    def tokenize(self, prompts: list[str]) -> Tensor:
        """Token ids ``[P, context_length]``; TextError for a prompt that does not fit."""

    def encode(self, tokens: Tensor) -> Tensor:
        """Projected text embeddings ``[P, D]``, not normalised; ``tokens`` may be cut to fewer
        positions than the context when ``prompt_lengths`` is not None."""

    def prompt_lengths(self, tokens: Tensor) -> Tensor | None:
        """Positions each prompt needs (through its pooled token) when the tower is causal, so
        that cutting the rest is exact; None when every prompt needs the full context."""

    def token_features(self, tokens: Tensor) -> Tensor:
        """Projected contextual features of every token ``[P, L, D]``."""

    def pieces(self, word: str) -> int:
        """How many tokens ``word`` takes (without start and end tokens)."""


@dataclass
class Backbone:
    """A user's model seen through one family's adapters (the model itself is untouched)."""

    family: str
    module: nn.Module
    vision: VisionTower
    text: TextTower
    mean: tuple[float, ...]
    std: tuple[float, ...]
    logit_scale_parameter: Tensor = field(repr=False)
    precision: str = "fp16"  # CUDA autocast dtype (fp16, bf16, or fp32 for none); CPU: fp32

    @property
    def logit_scale(self) -> float:
        """The learned temperature, exponentiated (100 for OpenAI's CLIP)."""
        return float(self.logit_scale_parameter.detach().float().exp())

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters."""
        return next(self.module.parameters()).device

    def inference(self, grad: bool = False):
        """Eval semantics (flags restored after), no grad unless ``grad``, autocast on CUDA."""
        return inference(self.module, self.device, grad, self.precision)
