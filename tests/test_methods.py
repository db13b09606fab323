"""Every method against an independent implementation (tests/reference.py), options, errors."""

from __future__ import annotations

import pytest
import reference as ref
import torch
import torch.nn.functional as F
from conftest import best_text_agreement, make_resnet, make_vit, random_images, relative_error

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


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_per_text_scale_keeps_a_gradient_below_fp16s_smallest_subnormal(dtype):
    """A gradient of 2^-26 flushes to zero in fp16 (smallest subnormal 2^-24); scaled by 2^10
    it survives and comes back exact, and in fp32 scaling changes nothing."""
    inputs = torch.ones(1, 3, dtype=dtype, requires_grad=True)

    def gradient(scale: float) -> torch.Tensor:
        score = (inputs * 2.0**-26).sum(dim=1, keepdim=True)  # a fresh graph per backward
        return methods.base.GradientMethod.per_text(score, [inputs], lambda g: g[0], scale)

    plain, scaled = gradient(1.0), gradient(2.0**10)
    assert scaled.dtype == torch.float32 and scaled.flatten().tolist() == [2.0**-26] * 3
    assert plain.flatten().tolist() == ([0.0] * 3 if dtype == torch.float16 else [2.0**-26] * 3)


@pytest.fixture(scope="module")
def tiny_scenes():
    """tiny-synth, four test scenes at its input size, and its fp32 Grad-CAM maps of them."""
    from PIL import Image

    from clip_surgery import synth

    model = clip_surgery.load("tiny-synth")
    model.cache_dir = None
    scenes = [synth.make_scene(synth.scene_seed("test", index)) for index in range(4)]
    images = torch.stack([model.preprocess(Image.fromarray(s.image)) for s in scenes])
    return model, images, model.explain(images, list(synth.SHAPES), method="gradcam").maps


@pytest.mark.parametrize("scale", ["shipped", "none"])
def test_gradcam_under_fp16_autocast_matches_fp32_on_a_trained_model(
    tiny_scenes, monkeypatch, scale
):
    """tiny-synth's 400 tokens make each token's gradient tiny: under fp16 autocast (CPU here,
    the same format as CUDA's) Grad-CAM's best text per pixel stays fp32's on >= 99.5% of the
    pixels where fp32's two best texts differ by >= 1% of the range; without its loss scale
    ("none") it does not (about 98% on these scenes). fp32 maps do not depend on the scale."""
    from clip_surgery import synth
    from clip_surgery.methods import gradcam

    if scale == "none":
        monkeypatch.setattr(gradcam, "GRADIENT_SCALE", 1.0)
    model, images, reference_maps = tiny_scenes
    with torch.autocast("cpu", dtype=torch.float16):
        maps = model.explain(images, list(synth.SHAPES), method="gradcam").maps
    assert torch.isfinite(maps).all()
    clear, agree, _ = best_text_agreement(maps, reference_maps)
    assert clear >= 0.75  # the criterion covers most pixels
    assert agree >= 0.995 if scale == "shipped" else agree < 0.995, agree


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
