"""Multimodal explanation: which words of a caption drive the image-text match, and where.

After CLIP Surgery's multimodal visualization (Li et al., arXiv 2304.05653): the caption's own
contextual token features (text transformer, ``ln_final``, text projection) are compared with
the image's surgery tokens, after removing the empty string's redundant feature, giving one map
per word. A word's importance is the drop of the image-caption cosine when the word is left out;
``shares`` are the positive drops normalised to sum to 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import TextError
from ..features import similarity_map
from ..text import check_texts


@dataclass
class WordExplanation:
    """Per-word importance and maps for one image and caption."""

    words: list[str]
    cosine: float  # image-caption cosine (CLIP's image embedding, the caption as given)
    drops: list[float]  # cosine minus the cosine without each word
    shares: list[float]  # positive drops normalised to sum to 1 (all 0 if none is positive)
    maps: torch.Tensor  # [W, H, W'] in [0, 1]


def token_features(model, text: str) -> tuple[list[str], torch.Tensor]:
    """The caption's words and each word's projected, normalized contextual feature ``[W, D]``."""
    tower = model.backbone.text
    words = text.split()
    tokens = tower.tokenize([text]).to(model.device)
    with model.inference():
        x = tower.token_features(tokens)  # [1, L, D]
    features, position = [], 1  # position 0 is the start token
    for word in words:
        count = tower.pieces(word)
        features.append(x[0, position : position + count].mean(dim=0))
        position += count
    return words, F.normalize(torch.stack(features).float(), dim=-1)


def explain_words(
    model, image, caption: str, *, size=None, depth: int | None = None
) -> WordExplanation:
    """Importance and a map for each word of ``caption`` on ``image`` (CLIP Surgery's tokens,
    ``depth`` blocks; default: the method's own)."""
    (caption,) = check_texts([caption])
    words = caption.split()
    if len(words) > 40:
        raise TextError("caption too long for a word-by-word explanation (more than 40 words)")
    batch = model.as_batch(image, size)
    options = {} if depth is None else {"depth": depth}
    trace = model.encode(batch, "clip_surgery", **options)
    tokens = F.normalize(trace.tokens, dim=-1)
    full = model.encode_text([caption], templates=None)
    cosine = float(tokens[0, 0] @ full[0])
    # Every leave-one-out caption in one batched text forward (a one-word caption leaves "").
    rests = [" ".join(words[:i] + words[i + 1 :]) for i in range(len(words))]
    kept = [rest for rest in rests if rest]
    without = dict(zip(kept, model.encode_text(kept, templates=None), strict=True)) if kept else {}
    drops = [cosine - (float(tokens[0, 0] @ without[rest]) if rest else 0.0) for rest in rests]
    positive = [max(d, 0.0) for d in drops]
    total = sum(positive)
    shares = [p / total for p in positive] if total > 0 else [0.0] * len(words)
    _, word_features = token_features(model, caption)
    redundant = model.redundant_feature(None)
    similarity = tokens[:, 1:] @ (word_features - redundant).T
    maps = similarity_map(similarity, tuple(batch.shape[-2:]), trace.grid)[0]
    return WordExplanation(words, cosine, drops, shares, maps)


def word_figure(image, result: WordExplanation):
    """A figure: the caption with words coloured by importance, then each word's map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..viz import overlay

    count = len(result.words)
    figure = plt.figure(figsize=(2.4 * max(count, 2), 3.3))
    colours = matplotlib.colormaps["Reds"]
    header = figure.add_axes([0, 0.82, 1, 0.16])
    header.axis("off")
    for index, (word, share) in enumerate(zip(result.words, result.shares, strict=True)):
        header.text(
            (index + 0.5) / count,
            0.5,
            word,
            ha="center",
            va="center",
            fontsize=12,
            bbox={"facecolor": colours(0.15 + 0.85 * share), "edgecolor": "none"},
        )
    for index, word in enumerate(result.words):
        axis = figure.add_axes([index / count + 0.01, 0.02, 1 / count - 0.02, 0.75])
        axis.imshow(overlay(image, result.maps[index]))
        axis.set_title(f"{word} ({result.shares[index]:.0%})", fontsize=9)
        axis.axis("off")
    return figure
