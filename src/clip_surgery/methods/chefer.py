"""Chefer et al.'s gradient-weighted attention relevancy, accumulated over blocks.

Chefer, Gur, Wolf, "Generic Attention-model Explainability for Interpreting Bi-Modal and
Encoder-Decoder Transformers", ICCV 2021; code github.com/hila-chefer/Transformer-MM-Explainability
(CLIP notebook: ``R = I``; per block ``R += mean_heads((grad * A).clamp(min=0)) @ R``; relevance
is the CLS row; the score is CLIP's logit; ``start_layer=-1`` means the last block only).
Towers pooled by a MAP head (SigLIP) have no CLS row, so the method does not apply to them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import engine
from ..errors import OptionError
from ..typedefs import PositionMode
from .base import GradientMethod, Scores, TextQuery


@dataclass(frozen=True)
class CheferOptions:
    """start_layer: first block whose attention is accumulated (-1: the last block only);
    positions: positional-table interpolation at other input sizes."""

    start_layer: int = -1
    positions: PositionMode = "bilinear"


class Chefer(GradientMethod):
    """Chefer et al. (ICCV 2021) relevancy for CLIP ViTs."""

    name = "chefer"
    summary = "gradient-weighted attention relevancy accumulated over blocks"
    citation = (
        "Chefer et al., Generic Attention-model Explainability for "
        "Interpreting Bi-Modal and Encoder-Decoder Transformers, ICCV 2021"
    )
    Options = CheferOptions
    requirement = "reads the CLS token's row of the blocks' attention"

    def supports(self, family) -> bool:
        """Blocks, and an image embedding that is a CLS token's (not a MAP head's latent)."""
        return family.has_blocks and family.cls_token

    def scores(self, backbone, images, query: TextQuery, options: CheferOptions) -> Scores:
        """One backward pass per text over the recorded attention probabilities."""
        self.check(backbone)
        tower = backbone.vision
        count = len(tower.blocks)
        start = count - 1 if options.start_layer == -1 else options.start_layer
        if not 0 <= start < count:
            raise OptionError(f"start_layer must be -1 or in [0, {count - 1}], got {start}")
        recorded = []

        def attention(q, k, v, context):
            probabilities = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
            recorded.append(probabilities)
            return probabilities @ v

        def tap(point, block, tensor):  # a graph exists even when every weight is frozen
            return tensor.detach().requires_grad_(True) if point == "embed" else tensor

        plan = engine.Plan(
            blocks=count - start, attention=attention, positions=options.positions, tap=tap
        )
        with backbone.inference(grad=True):
            trace = engine.run(tower, images, plan)
            cosine = self.cosine(trace, query.embeddings)
            relevance = self.per_text(
                backbone.logit_scale * cosine,
                recorded,
                lambda grads: _relevance(recorded, grads, tower.prefix),
            )
        return Scores(relevance, relevance, cosine.detach(), trace.grid)


def _relevance(probabilities, gradients, prefix: int) -> torch.Tensor:
    batch, _, tokens, _ = probabilities[0].shape
    device = probabilities[0].device
    relevance = torch.eye(tokens, device=device).expand(batch, tokens, tokens)
    for attention, gradient in zip(probabilities, gradients, strict=True):
        weighted = (gradient * attention.detach()).clamp(min=0).mean(dim=1)
        relevance = relevance + weighted @ relevance
    return relevance[:, 0, prefix:]
