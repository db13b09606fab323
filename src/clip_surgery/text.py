"""Text prompts: the prompt-ensemble templates, validation and tokenization."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from importlib.resources import files

import torch
from open_clip.tokenizer import SimpleTokenizer

from .errors import TextError


@cache
def default_templates() -> tuple[str, ...]:
    """The 85 templates of CLIP Surgery's reference code (80 ImageNet + 5 scene templates).

    From OpenAI's CLIP ImageNet notebook and github.com/xmed-lab/CLIP_Surgery (clip/clip.py).
    """
    text = files("clip_surgery").joinpath("data/templates.txt").read_text(encoding="utf-8")
    return tuple(line for line in text.splitlines() if line.strip())


def check_texts(texts: Sequence[str] | str) -> list[str]:
    """Return texts as a list, raising TextError for an empty list or an empty/non-str item."""
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise TextError("no text given: pass at least one text query")
    for text in texts:
        if not isinstance(text, str):
            raise TextError(f"text queries must be strings, got {type(text).__name__}")
        if not text.strip():
            raise TextError("empty text query: every text must contain at least one word")
    return texts


def check_templates(templates: Sequence[str] | None) -> tuple[str, ...] | None:
    """Return templates as a tuple; each must contain exactly one '{}'."""
    if templates is None:
        return None
    templates = tuple(templates)
    if not templates:
        raise TextError("empty template list: pass templates=None to encode texts as given")
    for template in templates:
        if template.count("{}") != 1:
            raise TextError(f"template {template!r} must contain '{{}}' exactly once")
    return templates


def prompts_for(text: str, templates: tuple[str, ...] | None) -> list[str]:
    """The prompts for one text: each template filled in, or the text itself."""
    return [text] if templates is None else [template.format(text) for template in templates]


def tokenize(tokenizer, prompts: list[str], context_length: int) -> torch.Tensor:
    """Tokenize prompts, raising TextError instead of silently truncating a long one."""
    if isinstance(tokenizer, SimpleTokenizer):
        for prompt in prompts:
            count = len(tokenizer.encode(prompt)) + 2
            if count > context_length:
                raise TextError(
                    f"text too long: {prompt[:60]!r}... has {count} tokens, "
                    f"the model's context holds {context_length}"
                )
    return tokenizer(prompts)
