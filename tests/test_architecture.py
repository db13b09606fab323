"""The shape of the code: imports point one way, methods are plug-ins, one route to tokens."""

from __future__ import annotations

import ast
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_vit, random_images, relative_error

import clip_surgery
from clip_surgery import engine, feature_surgery, methods
from clip_surgery.tasks.classify import class_scores

PACKAGE = Path(clip_surgery.__file__).parent
CORE = [PACKAGE / "engine.py", *sorted((PACKAGE / "backbones").glob("*.py"))]


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports (relative imports resolved against the package)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(part for part in (base, node.module or "") if part)
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def code_words(path: Path) -> set[str]:
    """Identifiers and string literals of a file's code (docstrings and comments excluded)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    words = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            words.add(node.id)
        elif isinstance(node, ast.Attribute):
            words.add(node.attr)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            words.add(node.name)
        elif isinstance(node, ast.arg):
            words.add(node.arg)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if id(node) in docstrings:
                continue
            words.update(node.value.lower().replace("-", " ").split())
    return {word.lower() for word in words}


@pytest.mark.parametrize("path", CORE, ids=lambda p: p.name)
def test_engine_and_adapters_know_no_method(path):
    assert not [m for m in imported_modules(path) if m.startswith("clip_surgery.methods")]
    words = code_words(path)
    for name in methods.names():
        assert name not in words, name
    for kind in ("vv", "kk", "qq", "csa", "neighbourhood", "self_self", "gaussian_std"):
        assert kind not in words, kind


def test_tasks_do_not_import_eval():
    for path in sorted((PACKAGE / "tasks").glob("*.py")):
        assert not [m for m in imported_modules(path) if m.startswith("clip_surgery.eval")]


def test_import_is_light():
    code = (
        "import sys, clip_surgery; "
        "print(sorted(m for m in ('transformers', 'matplotlib', 'open_clip', 'segment_anything')"
        " if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_no_comment_points_outside_the_repository():
    root = PACKAGE.parents[1]
    sources = [*PACKAGE.rglob("*.py")] + [
        path
        for folder in ("tests", "benchmarks", "scripts", "docs")
        for path in (root / folder).rglob("*.py")
    ]
    for path in sources:
        text = path.read_text(encoding="utf-8")
        for spec in ("METHOD", "PROTOCOLS", "ARCHITECTURE"):  # split so this file passes too
            assert spec + ".md" not in text, path
        for cited in ("docs/method.md", "docs/protocols.md", "docs/architecture.md"):
            if cited in text:
                assert (PACKAGE.parents[1] / cited).is_file(), cited


# A new forward method whose attention differs: one file of at most 40 lines (here, inline).
NEW_METHOD = '''
from dataclasses import dataclass

import torch.nn.functional as F

from clip_surgery import engine
from clip_surgery.methods import ForwardMethod


def key_query(q, k, v, context):
    """Each token's keys attend to the queries: softmax(k q^T / sqrt(d)) v."""
    return F.scaled_dot_product_attention(k, q, v)


@dataclass(frozen=True)
class KeyQueryOptions:
    """blocks: how many last blocks use k-q attention."""

    blocks: int = 1


class KeyQuery(ForwardMethod):
    """An example: k-q attention in the last blocks, residual and FFN kept."""

    name = "key_query"
    summary = "last blocks: k-q attention"
    citation = "an example in tests/test_architecture.py"
    Options = KeyQueryOptions

    def plan(self, options, tower):
        return engine.Plan(blocks=options.blocks, attention=key_query)
'''


def test_a_new_method_is_one_short_file(tmp_path, monkeypatch):
    assert len(NEW_METHOD.strip().splitlines()) <= 40
    path = tmp_path / "key_query.py"
    path.write_text(NEW_METHOD, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = __import__("key_query")
    monkeypatch.setitem(methods.METHODS, "key_query", module.KeyQuery())
    vit = make_vit(61)
    model = clip_surgery.wrap(vit)
    images = random_images(1, 224, 288, seed=2)
    result = model.explain(images, ["a", "b"], method="key_query", blocks=2, templates=None)
    assert result.maps.shape == (1, 2, 224, 288)
    with torch.no_grad():  # the same forward written out by hand
        x, grid = model.backbone.vision.embed(images, "bilinear")
        blocks = model.backbone.vision.blocks
        for block in blocks[:-2]:
            q, k, v = block.qkv(block.norm1(x), grid)
            x = block.ffn(x + block.out(F.scaled_dot_product_attention(q, k, v)))
        for block in blocks[-2:]:
            q, k, v = block.qkv(block.norm1(x), grid)
            x = block.ffn(x + block.out(F.scaled_dot_product_attention(k, q, v)))
        tokens = F.normalize(vit.visual.ln_post(x) @ vit.visual.proj, dim=-1)
    text = model.encode_text(["a", "b"], templates=None)
    assert relative_error(result.similarity, tokens[:, 1:] @ text.T) < 1e-5
    assert "key_query" in [row["name"] for row in (m.describe() for m in methods.METHODS.values())]


@pytest.fixture(scope="module")
def model():
    return clip_surgery.wrap(make_vit(62))


def test_redundant_feature_uses_the_call_templates(model):
    """Before the fix, feature_surgery="redundant" took "" from the default templates."""
    images = random_images(1, 224, 224, seed=3)
    texts = ["a red ball", "a tree"]
    result = model.explain(images, texts, templates=None, feature_surgery="redundant")
    tokens = F.normalize(model.encode_image(images), dim=-1)
    text = model.encode_text(texts, templates=None)
    expected = feature_surgery(tokens, text, model.redundant_feature(None))[:, 1:]
    assert relative_error(result.similarity, expected) < 1e-5
    wrong = feature_surgery(tokens, text, model.redundant_feature())[:, 1:]
    assert relative_error(result.similarity, wrong) > 1e-3


def test_every_route_to_surgery_tokens_is_the_method(model):
    images = random_images(2, 224, 224, seed=4)
    trace = model.encode(images, "clip_surgery", depth=3)
    assert isinstance(trace, engine.Trace) and trace.grid == (14, 14)
    assert torch.equal(model.encode_image(images, depth=3), trace.tokens)
    assert torch.equal(model.encode_image(images, method="clip_surgery", depth=3), trace.tokens)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        tokens, grid = model.encode_image_with_grid(images, 3)
    assert torch.equal(tokens, trace.tokens) and grid == (14, 14)
    plain = model.encode(images, "raw")
    assert torch.equal(model.encode_image(images, surgery=False), plain.tokens)


@pytest.mark.parametrize("name", methods.names())
def test_multilabel_scores_for_every_method(model, name):
    images = random_images(2, 224, 224, seed=5)
    labels = ["cat", "dog", "tree"]
    scores = class_scores(model, images, labels, method=name)
    found = model.explain(images, labels, method=name)
    scale = model.logit_scale
    expected = (scale * found.cosine).softmax(dim=-1)
    if name != "raw":
        dense = found.token_scores
        if methods.get(name).gradient:
            share = dense.clamp_min(0) / dense.clamp_min(0).sum(-1, keepdim=True).clamp_min(1e-12)
        else:
            share = (scale * dense).softmax(dim=-1)
        expected = expected + share.max(dim=1).values
    assert scores.shape == (2, 3) and torch.isfinite(scores).all()
    assert relative_error(scores, expected) < 1e-5


def test_explanation_maps_at_and_deprecated_logits(model):
    images = random_images(2, 224, 224, seed=6)
    result = model.explain(images, ["a", "b", "c"], templates=None)
    assert torch.equal(
        result.maps_at((50, 70)), clip_surgery.similarity_map(result.similarity, (50, 70), (14, 14))
    )
    assert torch.equal(result.maps_at((50, 70), image=1), result.maps_at((50, 70))[1])
    assert torch.equal(result.maps_at(30, image=0, texts=[2]), result.maps_at(30)[0, 2:])
    with pytest.warns(DeprecationWarning):
        assert torch.equal(result.logits, result.token_scores)


@dataclass
class _Family:
    has_blocks: bool


def test_backbones_matrix_from_capabilities():
    names = {f.name: [m for m in methods.names() if methods.get(m).supports(f)] for f in
             clip_surgery.backbones.FAMILIES}  # fmt: skip
    assert names["open_clip ModifiedResNet"] == ["raw", "clip_surgery", "gradcam"]
    assert names["open_clip ViT"] == names["transformers CLIP"] == methods.names()
