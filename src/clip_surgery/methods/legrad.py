"""LeGrad: the gradient of every layer's own image-text score with respect to its attention.

Bousselham, Boggust, Chaybouti, Strobelt and Kuehne, "LeGrad: An Explainability Method for
Vision Transformers via Feature Formation Sensitivity", ICCV 2025 (arXiv 2404.03214); code
github.com/WalBouss/LeGrad (``legrad/wrapper.py``, ``compute_legrad_clip``). For each block
``l`` from ``start_layer``: the image embedding of layer ``l`` is the final norm and
projection of the mean of all its output tokens (CLS included), normalised; its score is the
dot product with the normalised text embedding; the map is the gradient of that score with
respect to block ``l``'s attention probabilities, clamped at 0 and averaged over heads and
query tokens, at the patch (key) tokens. Maps are summed over layers (the min-max of the
explanation maps comes after, as for every method).

The paper aggregates over all layers, the default here (``start_layer=0``); the code's
wrapper defaults to ``layer_index=-2`` (the last two blocks), available as
``start_layer=-2``. Positions are resized as the code does (timm's bicubic with antialias;
the code writes the resized table into the model, this library never does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import engine
from ..typedefs import PositionMode
from .base import GradientMethod, Scores, TextQuery
from .common import check_range, probabilities


@dataclass(frozen=True)
class LegradOptions:
    """start_layer: first block explained (negative: counted from the end; 0: all blocks, as
    the paper); positions: positional-table interpolation at other input sizes."""

    start_layer: int = 0
    positions: PositionMode = "bicubic-antialias"


class Legrad(GradientMethod):
    """LeGrad (Bousselham et al., ICCV 2025) on CLIP ViTs."""

    name = "legrad"
    needs_cls_token = True
    requirement = "differentiates the CLS token's score through every layer (CLS pooling)"
    summary = "gradients of each layer's mean-token score w.r.t. its attention, over layers"
    citation = (
        "Bousselham et al., LeGrad: An Explainability Method for Vision Transformers "
        "via Feature Formation Sensitivity, ICCV 2025"
    )
    Options = LegradOptions

    def scores(self, backbone, images: Tensor, query: TextQuery, options: LegradOptions) -> Scores:
        """One backward pass per layer and text; the user's flags are not touched."""
        self.check(backbone)
        tower = backbone.vision
        count = len(tower.blocks)
        start = options.start_layer + count if options.start_layer < 0 else options.start_layer
        check_range(self.name, "start_layer", start, 0, count - 1)
        recorded: dict[int, Tensor] = {}
        outputs: dict[int, Tensor] = {}

        def attention(q, k, v, context):
            recorded[context.block] = weights = probabilities(q, k)
            return weights @ v

        def tap(point: str, block: int, tensor: Tensor) -> Tensor:
            if point == "embed":  # a graph exists even when every weight is frozen
                return tensor.detach().requires_grad_(True)
            if point == "block" and block >= start:
                outputs[block] = tensor
            return tensor

        plan = engine.Plan(
            blocks=count - start, attention=attention, positions=options.positions, tap=tap
        )
        text = query.embeddings.float()
        with backbone.inference(grad=True):
            trace = engine.run(tower, images, plan)
            relevance = layer_relevance(tower, outputs, recorded, text, trace.grid, options)
        cosine = F.normalize(trace.pooled.detach().float(), dim=-1) @ text.T
        return Scores(relevance, relevance, cosine, trace.grid)


def layer_relevance(tower, outputs, recorded, text: Tensor, grid, options) -> Tensor:
    """Summed per-layer relevance ``[B, N, T]``."""
    layers = sorted(outputs)
    total = 0
    for position, block in enumerate(layers):
        pooled = tower.head.pool(outputs[block].mean(dim=1, keepdim=True), grid, options.positions)
        score = F.normalize(pooled.float(), dim=-1) @ text.T  # [B, T]
        columns = []
        for column in range(score.shape[1]):
            last = position == len(layers) - 1 and column == score.shape[1] - 1
            (gradient,) = torch.autograd.grad(
                score[:, column].sum(), recorded[block], retain_graph=not last
            )
            relevance = gradient.clamp(min=0).mean(dim=1).mean(dim=1)  # heads, then queries
            columns.append(relevance[:, tower.prefix :])
        total = total + torch.stack(columns, dim=-1).float()
    return total.detach()
