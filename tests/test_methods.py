"""Every method against an independent implementation (tests/reference.py), options, errors."""

from __future__ import annotations

import pytest
import reference as ref
import torch
import torch.nn.functional as F
from conftest import make_resnet, make_vit, random_images, relative_error

import clip_surgery
from clip_surgery import ModelError, OptionError, methods

TOLERANCE = 2e-4
SIZES = [(224, 224), (224, 288)]


@pytest.fixture(scope="module")
def vit():
    return make_vit(51)


@pytest.fixture(scope="module")
def wrapped(vit):
    return clip_surgery.wrap(vit)


def method_tokens(wrapped, images, name, **options):
    return wrapped.encode_image(images, method=name, **options)


FORWARD_CASES = [
    ("raw", {}, lambda m, x: ref.project(m.visual, _plain(m, x))),
    ("clip_surgery", {}, lambda m, x: ref.vit_dual(m, x, 6, "vv")),
    ("clip_surgery", {"depth": 3, "attention": "kk"}, lambda m, x: ref.vit_dual(m, x, 3, "kk")),
    (
        "clip_surgery",
        {"attention": "qk", "ffn": True},
        lambda m, x: ref.vit_dual(m, x, 6, "qk", ffn=True),
    ),
    ("maskclip", {}, lambda m, x: ref.vit_replace(m, x, "identity", True, True)),
    (
        "maskclip",
        {"residual": False, "ffn": False},
        lambda m, x: ref.vit_replace(m, x, "identity", False, False),
    ),
    ("sclip", {}, lambda m, x: ref.vit_replace(m, x, "csa", True, True, "bicubic-dino")),
    ("clearclip", {}, lambda m, x: ref.vit_replace(m, x, "qq", False, False, "bicubic-dino")),
    (
        "naclip",
        {},
        lambda m, x: ref.vit_replace(m, x, "neighbourhood", False, False, "bicubic-dino", std=5.0),
    ),
    (
        "naclip",
        {"gaussian_std": 1.5},
        lambda m, x: ref.vit_replace(m, x, "neighbourhood", False, False, "bicubic-dino", std=1.5),
    ),
    (
        "gem",
        {},
        lambda m, x: ref.vit_dual(m, x, 6, "self-self", cls="new", mode="bicubic-antialias"),
    ),
    (
        "gem",
        {"iterations": 2, "temperature": 3.0, "depth": 4},
        lambda m, x: ref.vit_dual(
            m, x, 4, "self-self", cls="new", mode="bicubic-antialias", iterations=2, temperature=3.0
        ),
    ),
]


def _plain(model, images):
    x, _ = ref.embed(model.visual, images)
    for block in model.visual.transformer.resblocks:
        x = ref.plain_block(block, x)
    return x


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name, options, expected_fn", FORWARD_CASES)
def test_forward_methods_match_reference(vit, wrapped, size, name, options, expected_fn):
    images = random_images(2, *size, seed=3)
    tokens = method_tokens(wrapped, images, name, **options)
    with torch.no_grad():
        expected = expected_fn(vit, images)
    assert tokens.shape == expected.shape
    assert relative_error(tokens, expected) < TOLERANCE


def test_methods_differ_from_each_other(wrapped):
    images = random_images(1, 224, 224, seed=4)
    outputs = {
        name: method_tokens(wrapped, images, name)[:, 1:]
        for name in ("raw", "clip_surgery", "maskclip", "sclip", "clearclip", "naclip", "gem")
    }
    names = list(outputs)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            assert (outputs[first] - outputs[second]).abs().max() > 1e-3, (first, second)


def test_clip_surgery_scores_apply_feature_surgery(wrapped):
    images = random_images(2, 224, 224, seed=5)
    text = wrapped.encode_text(["cat", "dog", "tree"])
    tokens = F.normalize(method_tokens(wrapped, images, "clip_surgery"), dim=-1)
    redundant = wrapped.redundant_feature()
    for mode, free_form, expected in [
        ("classes", False, clip_surgery.feature_surgery(tokens, text)),
        ("redundant", False, clip_surgery.feature_surgery(tokens, text, redundant)),
        ("off", False, tokens @ text.T),
        ("auto", True, clip_surgery.feature_surgery(tokens, text, redundant)),
        ("auto", False, clip_surgery.feature_surgery(tokens, text)),
    ]:
        method = methods.get("clip_surgery")
        query = methods.TextQuery(text, free_form, wrapped.redundant_feature)
        scores = method.scores(
            wrapped.backbone, images, query, method.options(feature_surgery=mode)
        )
        assert relative_error(scores.similarity, expected[:, 1:]) < 1e-5
        assert relative_error(scores.token_scores, (tokens @ text.T)[:, 1:]) < 1e-5


def test_gradcam_vit_matches_reference(vit, wrapped):
    images = random_images(2, 224, 224, seed=6)
    text = wrapped.encode_text(["cat", "dog"], templates=None)
    result = wrapped.explain(images, ["cat", "dog"], method="gradcam", templates=None)
    expected = ref.gradcam_vit(vit, images, text)
    assert relative_error(result.similarity, expected) < TOLERANCE
    assert result.maps.shape == (2, 2, 224, 224)


@pytest.mark.parametrize("start_layer", [-1, 5])
def test_chefer_matches_reference(vit, wrapped, start_layer):
    images = random_images(2, 224, 224, seed=7)
    text = wrapped.encode_text(["cat", "dog"], templates=None)
    result = wrapped.explain(
        images, ["cat", "dog"], method="chefer", templates=None, start_layer=start_layer
    )
    start = len(vit.visual.transformer.resblocks) - 1 if start_layer == -1 else start_layer
    expected = ref.chefer_vit(vit, images, text, wrapped.logit_scale, start)
    assert relative_error(result.similarity, expected) < TOLERANCE


def test_gradcam_resnet_matches_reference():
    model = make_resnet(52)
    wrapped = clip_surgery.wrap(model)
    images = random_images(2, 224, 224, seed=8)
    text = wrapped.encode_text(["cat", "dog"], templates=None)
    result = wrapped.explain(images, ["cat", "dog"], method="gradcam", templates=None)
    visual = model.visual
    with torch.enable_grad():
        features = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(images)))))
        features = features.detach().requires_grad_(True)
        embedding = F.normalize(visual.attnpool(features), dim=-1)
        expected = []
        for index in range(2):
            (grad,) = torch.autograd.grad(
                (embedding @ text[index]).sum(), features, retain_graph=True
            )
            weights = grad.mean(dim=(2, 3), keepdim=True)
            expected.append(torch.relu((weights * features).sum(dim=1)).flatten(1))
    assert relative_error(result.similarity, torch.stack(expected, dim=-1)) < TOLERANCE


def test_gradient_methods_leave_flags_and_grads_alone(vit):
    images = random_images(1, 224, 224, seed=9)
    frozen = make_vit(53)
    for param in frozen.parameters():
        param.requires_grad_(False)
    for model in (vit, frozen):
        flags = [p.requires_grad for p in model.parameters()]
        wrapped = clip_surgery.wrap(model)
        for name in ("gradcam", "chefer"):
            result = wrapped.explain(images, ["a", "b"], method=name, templates=None)
            assert torch.isfinite(result.maps).all()
        assert flags == [p.requires_grad for p in model.parameters()]
        assert all(p.grad is None for p in model.parameters())


def test_resnet_support_and_errors():
    wrapped = clip_surgery.wrap(make_resnet(54))
    images = random_images(1, 224, 224)
    for name in ("raw", "clip_surgery", "gradcam"):
        maps = wrapped.explain(images, ["a", "b"], method=name, templates=None).maps
        assert torch.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    for name in ("maskclip", "sclip", "clearclip", "naclip", "gem", "chefer", "resclip", "legrad"):
        with pytest.raises(
            ModelError,
            match="changes transformer blocks and applies to open_clip ViT, transformers CLIP",
        ):
            wrapped.explain(images, ["a"], method=name, templates=None)
    surgery = wrapped.encode_image(images, method="clip_surgery")
    assert relative_error(surgery, wrapped.encode_image(images)) < 1e-6


def test_options_are_typed_and_checked(wrapped):
    images = random_images(1, 224, 224)
    with pytest.raises(OptionError, match="unknown option"):
        wrapped.explain(images, ["a"], method="sclip", depth=3)
    with pytest.raises(OptionError, match="must be one of"):
        wrapped.explain(images, ["a"], method="clip_surgery", attention="xx")
    with pytest.raises(OptionError, match="must be int"):
        methods.get("clip_surgery").options(depth="deep")
    with pytest.raises(OptionError, match="must be bool"):
        methods.get("maskclip").options(ffn="maybe")
    assert methods.get("clip_surgery").options(depth="4", ffn="true").depth == 4
    assert methods.get("gem").options(temperature="none").temperature is None
    assert methods.get("gem").options(temperature="2.5").temperature == 2.5
    with pytest.raises(ModelError, match="unknown method"):
        wrapped.explain(images, ["a"], method="lime")
    with pytest.raises(ModelError, match="gradients"):
        wrapped.encode_image(images, method="gradcam")
    with pytest.raises(OptionError, match="need method"):
        wrapped.encode_image(images, attention="kk")


def test_registry_lists_every_method_with_citation():
    expected = {
        "raw",
        "clip_surgery",
        "maskclip",
        "sclip",
        "clearclip",
        "naclip",
        "gem",
        "gradcam",
        "chefer",
        "resclip",
        "scclip",
        "cliper",
        "legrad",
    }
    assert set(methods.names()) == expected
    for name in methods.names():
        described = methods.get(name).describe()
        assert described["citation"] and described["summary"] and described["families"]


def test_top_level_explain_is_model_explain(wrapped):
    images = random_images(1, 224, 224)
    first = clip_surgery.explain(wrapped, images, ["a", "b"], method="naclip", templates=None)
    second = wrapped.explain(images, ["a", "b"], method="naclip", templates=None)
    assert torch.equal(first.maps, second.maps) and first.method == "naclip"
    assert first.logits.shape == (1, 196, 2)
