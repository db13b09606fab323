"""Text prompts: the prompt-ensemble templates, validation and tokenization."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from importlib.resources import files

import torch

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


class PromptTokenizer:
    """Any tokenizer behind one interface: ids ``[P, context]``, token counts, and a TextError
    for a prompt that does not fit instead of silent truncation.

    Takes open_clip's ``SimpleTokenizer`` (CLIP's BPE), open_clip's ``HFTokenizer``, Hugging
    Face ``transformers`` tokenizers, and any callable from a list of prompts to token ids
    ``[P, L]`` with ``L <= context`` (a plain callable cannot count tokens: it is trusted to fit
    its prompts, and word-level explanations need one of the others).
    """

    def __init__(self, tokenizer, context_length: int):
        if not callable(tokenizer):
            raise TextError(f"the tokenizer must be callable, got {type(tokenizer).__name__}")
        self.tokenizer = tokenizer
        self.context_length = context_length
        inner = getattr(tokenizer, "tokenizer", None)  # open_clip's HFTokenizer wraps one
        self._hf = tokenizer if _is_transformers(tokenizer) else inner
        if self._hf is not None and not _is_transformers(self._hf):
            self._hf = None
        self._counts = self._hf is not None or callable(getattr(tokenizer, "encode", None))

    def count(self, prompt: str) -> int | None:
        """Tokens of ``prompt`` with the start and end tokens (None: this tokenizer cannot say)."""
        if self._hf is not None:
            return len(self._hf(prompt)["input_ids"])
        if not self._counts:
            return None
        return len(self.tokenizer.encode(prompt)) + 2

    def pieces(self, word: str) -> int:
        """Tokens of ``word`` alone, without start and end tokens."""
        if self._hf is not None:
            return len(self._hf(word, add_special_tokens=False)["input_ids"])
        if not self._counts:
            raise TextError(
                "this tokenizer cannot count a word's tokens (no encode method): word "
                "explanations need a CLIP, open_clip or transformers tokenizer"
            )
        return len(self.tokenizer.encode(word))

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        """Token ids ``[P, context_length]`` (long)."""
        for prompt in prompts:
            count = self.count(prompt)
            if count is not None and count > self.context_length:
                raise TextError(
                    f"text too long: {prompt[:60]!r}... has {count} tokens, "
                    f"the model's context holds {self.context_length}"
                )
        if _is_transformers(self.tokenizer):
            encoded = self.tokenizer(
                prompts,
                padding="max_length",
                max_length=self.context_length,
                return_tensors="pt",
            )
            return encoded["input_ids"].long()
        return self._checked(self.tokenizer(prompts), len(prompts))

    def _checked(self, ids, prompts: int) -> torch.Tensor:
        """The tokenizer's output as ``[P, L]`` long ids; TextError for any other shape."""
        try:
            ids = torch.as_tensor(ids)
        except (TypeError, ValueError, RuntimeError):
            raise TextError(
                f"the tokenizer returned {type(ids).__name__}, not token ids [prompts, length]"
            ) from None
        if ids.dim() != 2 or len(ids) != prompts or ids.is_floating_point() or ids.is_complex():
            raise TextError(
                f"the tokenizer returned {ids.dtype} of shape {tuple(ids.shape)} for {prompts} "
                "prompt(s); expected integer token ids [prompts, length]"
            )
        if ids.shape[1] > self.context_length:
            raise TextError(
                f"the tokenizer returned {ids.shape[1]} tokens per prompt; the model's context "
                f"holds {self.context_length}"
            )
        return ids.long()


def encode_tokens(tower, tokens: torch.Tensor, device: torch.device, batch: int) -> torch.Tensor:
    """Text embeddings ``[P, D]`` (float) of token ids ``[P, context]``, ``batch`` at a time.

    On a causal text tower (``tower.prompt_lengths`` not None) prompts are grouped by length
    and each group runs only up to its longest prompt: under the causal mask no position sees
    a later one, so the result equals the full-context forward, at a fraction of the cost.
    """
    lengths = tower.prompt_lengths(tokens)
    if lengths is None:
        order, lengths = torch.arange(len(tokens)), torch.full((len(tokens),), tokens.shape[1])
    else:
        order = torch.argsort(lengths, stable=True)
    parts = []
    for chunk in order.split(batch):
        length = int(lengths[chunk].max())
        parts.append(tower.encode(tokens[chunk, :length].to(device)).float())
    embedded = torch.cat(parts)
    return torch.empty_like(embedded).index_copy_(0, order.to(embedded.device), embedded)


def _is_transformers(tokenizer) -> bool:
    return type(tokenizer).__module__.startswith("transformers.")


DEFAULT_TEMPLATES: tuple[str, ...] = default_templates()
"""The default prompt ensemble (docs/method.md, section 6)."""
