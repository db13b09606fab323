"""Prompt ensemble, text cache and text errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_vit, relative_error

import clip_surgery
from clip_surgery import DEFAULT_TEMPLATES, TextError


@pytest.fixture(scope="module")
def model():
    return clip_surgery.wrap(make_vit(11))


def test_default_templates_are_the_reference_85():
    assert len(DEFAULT_TEMPLATES) == 85 == len(set(DEFAULT_TEMPLATES))
    assert DEFAULT_TEMPLATES[0] == "a bad photo of a {}."
    assert DEFAULT_TEMPLATES[-5:] == (
        "there is a {} in the scene.",
        "there is the {} in the scene.",
        "this is a {} in the scene.",
        "this is the {} in the scene.",
        "this is one {} in the scene.",
    )
    assert all(t.count("{}") == 1 for t in DEFAULT_TEMPLATES)


def plain_embedding(model, prompts):
    tokens = model.tokenizer(prompts)
    with torch.no_grad():
        return F.normalize(model.clip.encode_text(tokens), dim=-1)


def test_ensemble_is_normalized_mean_of_normalized_prompts(model):
    texts = ["cat", "traffic light"]
    embedded = model.encode_text(texts)
    assert embedded.shape == (2, 64)
    assert torch.allclose(embedded.norm(dim=-1), torch.ones(2), atol=1e-5)
    for row, text in zip(embedded, texts, strict=True):
        prompts = [template.format(text) for template in DEFAULT_TEMPLATES]
        expected = F.normalize(plain_embedding(model, prompts).mean(dim=0), dim=-1)
        assert relative_error(row, expected) < 1e-5


def test_templates_none_and_custom(model):
    as_given = model.encode_text(["a photo of a dog"], templates=None)
    assert relative_error(as_given, plain_embedding(model, ["a photo of a dog"])) < 1e-5
    custom = model.encode_text(["dog"], templates=["a photo of a {}"])
    assert relative_error(custom, as_given) < 1e-6


def test_cache_avoids_recomputing(model, monkeypatch):
    monkeypatch.setattr(model, "cache_dir", None)  # the memory cache alone
    model.encode_text(["zebra", "horse"])
    calls = []
    tower = model.backbone.text
    original = tower.encode
    monkeypatch.setattr(tower, "encode", lambda t: calls.append(len(t)) or original(t))
    again = model.encode_text(["horse", "zebra"])
    assert calls == []
    assert relative_error(again[1], model.encode_text(["zebra"])[0]) == 0
    model.encode_text(["horse", "donkey"])
    assert calls == [len(DEFAULT_TEMPLATES)]  # only the new text's prompts


def test_cache_keyed_by_templates(model):
    one = model.encode_text(["owl"], templates=["a {}"])
    two = model.encode_text(["owl"], templates=["a photo of the {}"])
    assert not torch.allclose(one, two)


def test_redundant_feature_is_empty_string_ensemble(model):
    redundant = model.redundant_feature()
    prompts = [template.format("") for template in DEFAULT_TEMPLATES]
    expected = F.normalize(plain_embedding(model, prompts).mean(dim=0), dim=-1)
    assert redundant.shape == (1, 64)
    assert relative_error(redundant[0], expected) < 1e-5


@pytest.mark.parametrize(
    "texts, message",
    [
        ([], "no text"),
        ([""], "empty text"),
        (["cat", "   "], "empty text"),
        ([3], "strings"),
        (["word " * 80], "too long"),
    ],
)
def test_bad_texts(model, texts, message):
    with pytest.raises(TextError, match=message):
        model.encode_text(texts)


def test_text_too_long_only_with_templates(model):
    text = "word " * 70  # 70 tokens + 2 fits 77 as given, not inside a template
    assert model.encode_text([text], templates=None).shape == (1, 64)
    with pytest.raises(TextError, match="too long"):
        model.encode_text([text])


@pytest.mark.parametrize("templates", [[], ["no placeholder"], ["{} and {}"]])
def test_bad_templates(model, templates):
    with pytest.raises(TextError):
        model.encode_text(["cat"], templates=templates)
