"""CUDA: autocast (fp16, bf16) against fp32. Runs where CUDA is present; skipped elsewhere."""

from __future__ import annotations

import pytest
import torch
from conftest import perturb, random_images

import clip_surgery

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


@pytest.fixture(scope="module")
def model():
    import open_clip

    torch.manual_seed(0)
    clip = perturb(open_clip.create_model("ViT-B-16", pretrained=None), 0)
    wrapped = clip_surgery.wrap(clip.cuda())
    wrapped.cache_dir = None
    return wrapped


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


@needs_cuda
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("method", ["clip_surgery", "raw", "sclip", "gradcam"])
def test_autocast_matches_fp32(model, precision, method):
    images = random_images(2, 448, 448, seed=1).cuda()
    texts = ["a cat", "a dog", "a tree", "a car"]
    model.precision = "fp32"
    reference = model.explain(images, texts, method=method)
    model.precision = precision
    result = model.explain(images, texts, method=method)
    model.precision = "fp16"
    assert torch.isfinite(result.maps).all()
    assert _pearson(result.maps, reference.maps) >= 0.99
    same = (result.maps.argmax(dim=1) == reference.maps.argmax(dim=1)).float().mean()
    assert same >= 0.99


def test_precision_names_are_checked(vit_model):
    model = clip_surgery.wrap(vit_model)
    with pytest.raises(clip_surgery.OptionError):
        model.precision = "fp8"
    model.precision = "bf16"
    assert model.precision == "bf16"  # on a CPU model it is kept for CUDA; CPU runs fp32
