"""ResCLIP, SC-CLIP, CLIPer, LeGrad and PAMR against independent implementations
(tests/reference_recent.py), at 224 and a non-square size, plus their options and errors."""

from __future__ import annotations

import pytest
import reference_recent as rr
import torch
import torch.nn.functional as F
from conftest import make_resnet, make_vit, random_images, relative_error

import clip_surgery
from clip_surgery import ModelError, OptionError, methods
from clip_surgery.methods import resclip
from clip_surgery.refine import pamr

TOLERANCE = 2e-4
SIZES = [(224, 224), (224, 288)]
TEXTS = ["cat", "dog", "tree"]


@pytest.fixture(scope="module")
def vit():
    return make_vit(71)


@pytest.fixture(scope="module")
def wrapped(vit):
    return clip_surgery.wrap(vit)


@pytest.fixture(scope="module")
def text(wrapped):
    return wrapped.encode_text(TEXTS, templates=None)


def explain(wrapped, images, name, **options):
    return wrapped.explain(images, TEXTS, method=name, templates=None, **options)


@pytest.mark.parametrize("size", SIZES)
def test_pamr_matches_explicit_kernels(size):
    generator = torch.Generator().manual_seed(1)
    image = torch.randn(2, 3, *size, generator=generator)
    scores = torch.randn(2, 4, size[0] // 16, size[1] // 16, generator=generator)
    expected = rr.pamr(image, scores)
    assert relative_error(pamr(image, scores), expected) < TOLERANCE
    small = rr.pamr(image, scores, steps=3, dilations=(1, 2))
    assert relative_error(pamr(image, scores, steps=3, dilations=(1, 2)), small) < TOLERANCE


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize(
    "options, expected_options",
    [
        ({}, {}),
        (
            {"rcs_first": 2, "rcs_last": 4, "rcs_mix": 0.6, "rcs_weight": 1.5},
            {"rcs": (2, 4), "l_rcs": 0.6, "tau_rcs": 1.5},
        ),
        ({"sfr_paths": False, "sfr_mix": 0.2}, {"paths": False, "l_sfr": 0.2}),
        ({"residual": True, "ffn": True}, {"residual": True, "ffn": True}),
    ],
)
def test_resclip_matches_reference(vit, wrapped, monkeypatch, size, options, expected_options):
    images = random_images(2, *size, seed=3)
    # texts taken from patch tokens, so the semantic feedback sees several labels and paths
    # that leave their label (on random weights, dataset-like texts all give one label)
    rcs = {k: v for k, v in options.items() if k.startswith("rcs")}
    tokens = wrapped.encode_image(images, method="resclip", sfr=False, **rcs)
    text = F.normalize(torch.cat([tokens[0, [1, 130]], tokens[1, [60, 190]]]), dim=-1)
    seen = []
    original = resclip.feedback_matrix
    monkeypatch.setattr(
        resclip, "feedback_matrix", lambda *a: seen.append(a[0].unique().numel()) or original(*a)
    )
    result = wrapped.score(images, methods.TextQuery(text), "resclip", resclip_options(options))
    assert max(seen) > 1, "the test needs patches of several labels"
    with torch.no_grad():
        expected = rr.resclip(vit, images, text, **expected_options)
    dense = F.normalize(expected[:, 1:], dim=-1) @ text.T
    assert relative_error(result.similarity, dense) < TOLERANCE
    cls = F.normalize(expected[:, 0], dim=-1) @ text.T
    assert relative_error(result.cosine, cls) < TOLERANCE


def resclip_options(values):
    return methods.get("resclip").options(**values)


def test_resclip_patch_labels_threshold_and_mode():
    generator = torch.Generator().manual_seed(9)
    images = torch.randn(2, 3, 64, 48, generator=generator)
    scores = 0.02 * torch.randn(2, 3, 64, 48, generator=generator)
    probs = torch.softmax(rr.pamr(images, scores) * 40.0, dim=1)
    threshold = float(probs.max(dim=1).values.median())  # half the pixels fall below it
    options = resclip_options({"sfr_threshold": threshold, "logit_scale": 40.0})
    feedback = resclip.Feedback(options, type("Tower", (), {"min_size": 16}), images, None, {})
    labels = feedback.patch_labels(scores, (4, 3))
    for b in range(2):
        pixels = probs[b].argmax(dim=0)
        pixels[probs[b].max(dim=0).values < threshold] = 0
        assert len(pixels.unique()) == 3
        assert torch.equal(labels[b], rr.patch_labels(pixels, (4, 3), 16))


def test_resclip_paths_decay_pairs_that_leave_their_label():
    labels = torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    valid, steps, longest = resclip.straight_paths(labels)
    assert longest == 3 and int(steps[0, 11]) == 3
    assert valid[0, 3] and not valid[0, 8]  # along the top row / across the middle row
    matrix = resclip.feedback_matrix(labels, 1, resclip_options({"gaussian_std": 0.1}))
    assert matrix.shape == (13, 13) and matrix[0].abs().sum() == 0 and matrix[:, 0].abs().sum() == 0
    assert torch.isclose(matrix.max(), torch.tensor(1.0))


def test_resclip_rcs_alone_is_a_token_forward(vit, wrapped, text):
    images = random_images(1, 224, 224, seed=4)
    tokens = wrapped.encode_image(images, method="resclip", sfr=False)
    with torch.no_grad():
        expected = rr.resclip(vit, images, text, sfr=False)
    assert relative_error(tokens, expected) < TOLERANCE
    with pytest.raises(ModelError, match="needs the texts"):
        wrapped.encode_image(images, method="resclip")


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize(
    "options, expected_options",
    [
        ({}, {}),
        (
            {"pre_adjust": 4, "post_adjust": 1, "multi_start": 1, "multi_end": 6, "beta": 0.2,
             "res_cls": 0.5, "neighbors": 12},
            {"pre": 4, "post": 1, "start": 1, "end": 6, "beta": 0.2, "res_cls": 0.5,
             "neighbors": 12},
        ),
    ],
)  # fmt: skip
def test_scclip_matches_reference(vit, wrapped, text, size, options, expected_options):
    images = random_images(2, *size, seed=5)
    result = explain(wrapped, images, "scclip", **options)
    with torch.no_grad():
        tokens = rr.scclip(vit, images, **expected_options)
        plain = rr.plain_embedding(vit, images, "bicubic-dino")
    expected = F.normalize(tokens, dim=-1) @ text.T
    assert relative_error(result.similarity, expected) < TOLERANCE
    assert relative_error(result.cosine, F.normalize(plain, dim=-1) @ text.T) < TOLERANCE


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("options", [{}, {"logit_scale": 50.0, "attention_thr": 0.5}])
def test_cliper_matches_reference(vit, wrapped, text, size, options):
    images = random_images(2, *size, seed=6)
    result = explain(wrapped, images, "cliper", **options)
    renamed = {
        "scale": options.get("logit_scale", 100.0),
        "threshold": options.get("attention_thr", 0.2),
    }
    with torch.no_grad():
        expected = rr.cliper(vit, images, text, **renamed)
    assert relative_error(result.similarity, expected) < TOLERANCE
    assert torch.equal(result.similarity, result.token_scores)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("start_layer, start", [(0, 0), (-2, 6), (5, 5)])
def test_legrad_matches_reference(vit, wrapped, text, size, start_layer, start):
    images = random_images(2, *size, seed=7)
    result = explain(wrapped, images, "legrad", start_layer=start_layer)
    expected = rr.legrad(vit, images, text, start=start)
    assert relative_error(result.similarity, expected) < TOLERANCE


def test_new_methods_leave_the_model_alone(vit, wrapped):
    flags = [p.requires_grad for p in vit.parameters()]
    state = {k: v.clone() for k, v in vit.state_dict().items()}
    images = random_images(1, 224, 288, seed=8)
    for name in ("resclip", "scclip", "cliper", "legrad"):
        maps = explain(wrapped, images, name).maps
        assert torch.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    assert flags == [p.requires_grad for p in vit.parameters()]
    assert all(p.grad is None for p in vit.parameters())
    assert all(torch.equal(state[k], v) for k, v in vit.state_dict().items())


def test_options_checked(wrapped):
    images = random_images(1, 224, 224)
    cases = [
        ("resclip", {"rcs_mix": 1.5}, "rcs_mix must be in"),
        ("resclip", {"logit_scale": 0}, "logit_scale must be positive"),
        ("resclip", {"rcs_last": 7}, r"rcs_last of 'resclip' must be in \[3, 6\]"),
        ("scclip", {"contamination": 1.0}, "contamination must be in"),
        ("scclip", {"multi_end": 2, "multi_start": 2}, "multi_end"),
        ("scclip", {"pre_adjust": 7}, "pre_adjust"),
        ("cliper", {"attention_thr": -0.1}, "attention_thr must be in"),
        ("legrad", {"start_layer": 8}, "start_layer"),
        ("legrad", {"start_layer": -9}, "start_layer"),
    ]
    for name, options, message in cases:
        with pytest.raises(OptionError, match=message):
            explain(wrapped, images, name, **options)
    with pytest.raises(ModelError, match="no tokens"):
        wrapped.encode_image(images, method="cliper")
    with pytest.raises(ModelError, match="gradients"):
        wrapped.encode_image(images, method="legrad")


def test_resnet_refused():
    model = clip_surgery.wrap(make_resnet(72))
    for name in ("resclip", "scclip", "cliper", "legrad"):
        with pytest.raises(ModelError, match="changes transformer blocks"):
            model.explain(random_images(1, 224, 224), ["a"], method=name, templates=None)


def test_registry_has_the_new_methods_with_sources():
    for name in ("resclip", "scclip", "cliper", "legrad"):
        described = methods.get(name).describe()
        assert described["citation"] and described["summary"]
        assert {"open_clip ViT", "transformers CLIP"} <= set(described["families"])


def test_a_shallow_model_gets_defaults_within_its_blocks():
    """On a 3-block ViT every default block choice is a valid one: the parallel paths of
    clip_surgery and gem take every block, and the ViT-B/16 block indices of ResCLIP and SC-CLIP,
    mapped to the same relative depth, are capped at the last block each may name; explicit
    values are still checked. On 12 blocks the papers' own indices come back unchanged."""
    from clip_surgery.methods.common import layer

    shallow = clip_surgery.wrap(make_vit(73, layers=3))
    images = random_images(1, 224, 224, seed=5)
    explicit = {
        "clip_surgery": {"depth": 3},
        "gem": {"depth": 3},
        "resclip": {"rcs_first": 1, "rcs_last": 1},
        "scclip": {"pre_adjust": 1, "post_adjust": 1, "multi_start": 1, "multi_end": 2},
    }
    for name, values in explicit.items():
        default = explain(shallow, images, name)
        assert torch.equal(default.similarity, explain(shallow, images, name, **values).similarity)
        ran = default.options  # what ran, as result files state it
        assert {key: getattr(ran, key) for key in values} == values, name
    with pytest.raises(OptionError, match=r"depth of 'clip_surgery' must be in \[0, 3\]"):
        explain(shallow, images, "clip_surgery", depth=6)
    with pytest.raises(OptionError, match=r"rcs_last of 'resclip' must be in \[1, 1\]"):
        explain(shallow, images, "resclip", rcs_last=2)
    assert [layer(None, paper, 12, highest=10) for paper in (3, 5, 8, 10)] == [3, 5, 8, 10]
    single = clip_surgery.wrap(make_vit(74, layers=1))
    for name in ("resclip", "scclip"):
        with pytest.raises(OptionError, match=f"{name}.*needs 2 or more"):
            explain(single, images, name)
    assert explain(single, images, "clip_surgery").similarity.shape[-1] == len(TEXTS)
