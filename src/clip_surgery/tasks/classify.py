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
import torch.nn.functional as F


def class_scores(
    model, images, labels: Sequence[str], *, surgery: bool = True, size=None
) -> torch.Tensor:
    """Scores ``[B, C]`` of each label for each image (higher = more likely present)."""
    batch = model.as_batch(images, size)
    text = model.encode_text(list(labels))
    tokens = F.normalize(model.encode_image(batch, surgery=surgery), dim=-1)
    scale = model.logit_scale
    scores = (scale * tokens[:, 0] @ text.T).softmax(dim=-1)
    if surgery:
        local = (scale * tokens[:, 1:] @ text.T).softmax(dim=-1)  # [B, N, C]
        scores = scores + local.max(dim=1).values
    return scores


def ranked(scores: torch.Tensor, labels: Sequence[str]) -> list[tuple[str, float]]:
    """One image's labels sorted by score, highest first."""
    order = torch.argsort(scores, descending=True).tolist()
    return [(labels[i], float(scores[i])) for i in order]
