"""The one call most users need: model.explain."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_vit, photo, relative_error

import clip_surgery
from clip_surgery import ImageError, TextError, feature_surgery, similarity_map


@pytest.fixture(scope="module")
def model():
    return clip_surgery.wrap(make_vit(31))


def test_explain_class_set_matches_the_pieces(model):
    images = [photo((120, 80), seed=1), photo((60, 60), seed=2)]
    texts = ["cat", "dog", "grass"]
    result = model.explain(images, texts, size=224)
    batch = torch.stack([model.preprocess(image, 224) for image in images])
    tokens = F.normalize(model.encode_image(batch), dim=-1)
    text = model.encode_text(texts)
    sim = feature_surgery(tokens, text)[:, 1:]
    assert result.maps.shape == (2, 3, 224, 224)
    assert relative_error(result.maps, similarity_map(sim, 224)) < 1e-5
    assert result.grid == (14, 14) and result.similarity.shape == (2, 196, 3)
    assert relative_error(result.cosine, tokens[:, 0] @ text.T) < 1e-5
    assert torch.allclose(result.probs.sum(dim=-1), torch.ones(2), atol=1e-5)
    assert result.maps.min() >= 0 and result.maps.max() <= 1


def test_explain_single_uses_empty_string_redundancy(model, tmp_path):
    path = tmp_path / "img.png"
    photo(seed=3).save(path)
    result = model.explain(str(path), "a red ball", single=True, output_size=(30, 40))
    tokens = F.normalize(model.encode_image(model.preprocess(path)), dim=-1)
    sim = feature_surgery(tokens, model.encode_text(["a red ball"]), model.redundant_feature())
    assert result.maps.shape == (1, 1, 30, 40)
    assert relative_error(result.similarity, sim[:, 1:]) < 1e-5


def test_explain_non_square_and_tensor_input(model):
    tensor = model.preprocess(photo(seed=4), size=(224, 320))
    result = model.explain(tensor, ["a", "b"], depth=3)
    assert result.grid == (14, 20) and result.maps.shape == (1, 2, 224, 320)


def test_explain_bad_inputs(model):
    with pytest.raises(TextError):
        model.explain(photo(), [])
    with pytest.raises(ImageError, match="no images"):
        model.explain([], ["cat"])


def test_mixed_tensor_shapes_in_one_batch(model):
    tensors = [model.preprocess(photo(), 224), model.preprocess(photo(), 256)]
    with pytest.raises(ImageError, match="share a shape"):
        model.explain(tensors, ["cat"])
    mixed = [photo((30, 40)), model.preprocess(photo(), 224)]
    assert model.explain(mixed, ["cat"]).maps.shape == (2, 1, 224, 224)


def test_one_text_is_a_free_form_query(model):
    """A class set of one gave an all-zero map (the mean over one class is itself)."""
    image = photo(seed=7)
    alone = model.explain(image, ["a red ball"])
    assert alone.free_form and alone.maps.amax() - alone.maps.amin() > 0.5  # not all zero
    assert torch.equal(alone.maps, model.explain(image, ["a red ball"], single=True).maps)
    assert not model.explain(image, ["a red ball", "a tree"]).free_form
