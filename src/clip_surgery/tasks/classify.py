"""Multi-label recognition with CLIP, plain and with surgery (no training).

Plain: CLIP's zero-shot scores, softmax over the labels of the logit-scaled cosine between the
image embedding (CLS) and each label's prompt ensemble. With surgery: the same global score plus
local evidence, the best patch's softmax score from CLIP Surgery's dense tokens. CLIP Surgery
(Li et al., arXiv 2304.05653) reports multi-label gains from its dense features without
training; its text does not spell out the scoring, so this global + max-local form is ours.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import methods


def class_scores(
    model,
    images,
    labels: Sequence[str],
    *,
    surgery: bool = True,
    size=None,
    method: str | None = None,
    options=None,
    local: bool | None = None,
) -> torch.Tensor:
    """Scores ``[B, C]`` of each label for each image (higher = more likely present).

    ``method`` (default ``clip_surgery``, or ``raw`` when ``surgery=False``) gives the image
    embedding's softmax over the labels; ``local`` (default: every method but ``raw``) adds the
    best patch's score: softmax over labels of its cosines for forward methods, its share of
    relevance over the labels for gradient methods.
    """
    method = method or ("clip_surgery" if surgery else "raw")
    chosen = methods.get(method)
    scores = model.score(model.as_batch(images, size), model.query(list(labels)), chosen, options)
    scale = model.logit_scale
    result = (scale * scores.cosine).softmax(dim=-1)
    if local if local is not None else chosen.name != "raw":
        if chosen.gradient:
            dense = scores.token_scores.clamp_min(0)
            share = dense / dense.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        else:
            share = (scale * scores.token_scores).softmax(dim=-1)  # [B, N, C]
        result = result + share.max(dim=1).values
    return result


def ranked(scores: torch.Tensor, labels: Sequence[str]) -> list[tuple[str, float]]:
    """One image's labels sorted by score, highest first."""
    order = torch.argsort(scores, descending=True).tolist()
    return [(labels[i], float(scores[i])) for i in order]
