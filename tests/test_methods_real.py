"""Every method on the real ViT-B/16 (224 and 448) and RN50 architectures, API and CLI."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from conftest import perturb, photo

import clip_surgery
from clip_surgery import backbones, cli, loading, methods

pytestmark = pytest.mark.slow
TEXTS = ["a cat", "the sky"]


@pytest.fixture(scope="module")
def vit_b16():
    model = open_clip.create_model("ViT-B-16", pretrained=None, force_quick_gelu=True)
    return clip_surgery.wrap(perturb(model, 61), name="ViT-B-16/random")


@pytest.fixture(scope="module")
def rn50():
    model = open_clip.create_model("RN50", pretrained=None, force_quick_gelu=True)
    return clip_surgery.wrap(perturb(model, 62), name="RN50/random")


def assert_valid_maps(maps: torch.Tensor, size: int) -> None:
    assert maps.shape == (1, len(TEXTS), size, size)
    assert torch.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1


@pytest.mark.parametrize("size", [224, 448])
@pytest.mark.parametrize("name", methods.names())
def test_every_method_on_vit_b16_api(vit_b16, name, size):
    result = vit_b16.explain(photo((300, 200)), TEXTS, method=name, size=size, templates=None)
    assert_valid_maps(result.maps, size)
    assert result.logits.shape == (1, (size // 16) ** 2, len(TEXTS))


@pytest.mark.parametrize("size", [224, 448])
@pytest.mark.parametrize("name", ["raw", "clip_surgery", "gradcam"])
def test_resnet_methods_on_rn50_api(rn50, name, size):
    result = rn50.explain(photo((300, 200)), TEXTS, method=name, size=size, templates=None)
    assert_valid_maps(result.maps, size)


@pytest.mark.parametrize("model_name", ["vit_b16", "rn50"])
def test_every_supported_method_through_the_cli(request, tmp_path, monkeypatch, capsys, model_name):
    model = request.getfixturevalue(model_name)
    monkeypatch.setattr(loading, "load", lambda *args, **kwargs: model)
    image = tmp_path / "img.png"
    photo((120, 90)).save(image)
    family = backbones.family(model.family)
    sizes = ["224", "448"] if model.is_vit else ["224"]
    for name in methods.names():
        if not methods.get(name).supports(family):
            continue
        for size in sizes:
            out = tmp_path / f"{name}-{size}"
            argv = [
                "explain",
                str(image),
                "-t",
                *TEXTS,
                "--method",
                name,
                "--out",
                str(out),
                "--json",
                "--no-progress",
                "--size",
                size,
            ]
            assert cli.main(argv) == 0, name
            report = json.loads(capsys.readouterr().out)
            assert report["method"] == name and report["settings"]["size"] == int(size)
            names = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
            assert names == ["001-img/01-a-cat.png", "001-img/02-the-sky.png", "001-img/grid.png"]


def test_real_checkpoint_through_cli_subprocess(tmp_path, vit_b16):
    import os
    import subprocess
    import sys

    checkpoint = tmp_path / "ViT-B-16-random.pt"
    torch.save(vit_b16.clip.state_dict(), checkpoint)
    image = tmp_path / "img.png"
    photo((64, 48)).save(image)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "clip_surgery.cli",
            "explain",
            str(image),
            "-t",
            "cat",
            "--checkpoint",
            str(checkpoint),
            "--quick-gelu",
            "--method",
            "naclip",
            "--option",
            "gaussian_std=3",
            "--out",
            str(tmp_path / "out"),
            "--json",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["settings"]["gaussian_std"] == 3.0 and report["method"] == "naclip"
