"""Presets of ResCLIP, SC-CLIP and CLIPer; PAMR refinement in segmentation (``--refine``);
the new methods through ``clip-surgery eval``."""

from __future__ import annotations

import dataclasses
import json

import pytest
import reference_recent as rr
import torch
from PIL import Image
from tiny_datasets import make_segmentation

import clip_surgery
from clip_surgery import OptionError
from clip_surgery.cli import main
from clip_surgery.eval import runner
from clip_surgery.eval.presets import PRESETS, preset_for
from clip_surgery.tasks import segment as seg

NEW = ("resclip", "scclip", "cliper", "legrad")


@pytest.fixture(autouse=True)
def few_templates(monkeypatch):
    """Three templates instead of 80 keep text encoding fast in tests."""
    original = runner.preset_for
    monkeypatch.setattr(
        runner, "preset_for", lambda *a, **k: dataclasses.replace(original(*a, **k), templates=3)
    )


def test_recent_presets_follow_the_official_configs():
    voc = preset_for("resclip", "voc21")
    assert (voc.short_side, voc.window, voc.prob_threshold, voc.logit_scale) == (336, None, 0.1, 40)
    assert voc.options == {
        "sfr_threshold": 0.5,
        "rcs_weight": 2.0,
        "rcs_mix": 0.3,
        "sfr_weight": 2.2,
        "sfr_mix": 0.7,
    }
    city = preset_for("resclip", "cityscapes")
    assert (city.short_side, city.window, city.options["rcs_mix"]) == (560, 224, 0.2)
    assert preset_for("resclip", "coco_stuff").short_side == 336  # not sclip's 448
    obj = preset_for("scclip", "coco_object")
    assert (obj.logit_scale, obj.prob_threshold, obj.window, obj.options) == (55.0, 0.35, 224, {})
    assert preset_for("scclip", "voc21").area_threshold == 0.1
    cliper = preset_for("cliper", "cityscapes")
    assert (cliper.short_side, cliper.window) == (560, None)
    assert cliper.options == {"logit_scale": 100.0, "attention_thr": 0.35}
    assert preset_for("cliper", "coco_stuff").options["logit_scale"] == 50.0
    for name in PRESETS:
        assert preset_for(name, "synthetic").refine is None  # none of them refines by default
        assert json.dumps(preset_for(name, "voc21").settings())
    assert preset_for("resclip", "synthetic").options == {}
    with pytest.raises(OptionError, match="unknown refinement"):
        seg.Preset("mine", refine="crf")


def test_preset_options_and_user_values():
    preset = preset_for("resclip", "voc21")
    assert seg.method_options("resclip", preset).sfr_threshold == 0.5
    assert seg.method_options("resclip", preset, {"sfr_threshold": "0.2"}).sfr_mix == 0.7
    assert seg.method_options("resclip", preset, {"sfr_threshold": "0.2"}).sfr_threshold == 0.2
    typed = clip_surgery.methods.get("resclip").options()
    assert seg.method_options("resclip", preset, typed) is typed
    assert seg.method_options("naclip", preset).gaussian_std == 5.0  # another method's preset


def test_pamr_refinement_in_segmentation(vit_model):
    model = clip_surgery.wrap(vit_model)
    image = Image.fromarray(
        torch.randint(0, 256, (40, 56, 3), generator=torch.Generator().manual_seed(2))
        .numpy()
        .astype("uint8")
    )
    queries = seg.ClassQueries.build(model, [["sky"], ["cat", "kitten"], ["tree"]], None)
    preset = seg.Preset("test", short_side=64, window=None, refine="pamr")
    labels, probabilities = seg.segment(model, image, queries, "naclip", None, preset)
    resized = seg.resize_for(image, preset)
    logits = seg.dense_logits(model, resized, queries, "naclip", model_options("naclip"), preset)
    logits = torch.nn.functional.interpolate(logits[None], size=(40, 56), mode="bilinear")
    guide = torch.nn.functional.interpolate(
        seg._normalise(model, resized)[None], size=(40, 56), mode="bilinear"
    )
    refined = (rr.pamr(guide, logits)[0] * preset.logit_scale).softmax(dim=0)
    expected = torch.stack([refined[0], refined[1:3].max(dim=0).values, refined[3]])
    assert torch.allclose(probabilities, expected, atol=1e-5)
    unrefined = dataclasses.replace(preset, refine=None)
    plain = seg.segment(model, image, queries, "naclip", None, unrefined)
    assert not torch.allclose(plain[1], probabilities, atol=1e-3)


def model_options(name):
    return clip_surgery.methods.get(name).options()


@pytest.mark.parametrize("name", NEW)
def test_new_methods_through_eval_cli(tmp_path, capsys, vit_checkpoint, name):
    make_segmentation(tmp_path / "data", "voc21", count=1)
    argv = ["eval", "--dataset", "voc21", "--root", str(tmp_path / "data"), "--method", name,
            "--checkpoint", vit_checkpoint, "--out", str(tmp_path / "out"), "--no-progress",
            "--refine", "pamr"]  # fmt: skip
    if name == "resclip":
        argv += ["--option", "sfr_threshold=0.3"]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("mIoU: ")
    preset = runner.default_preset(name)
    report = json.loads((tmp_path / f"out/voc21-{name}-{preset}+pamr.json").read_text())
    assert report["preset"]["refine"] == "pamr" and 0 <= report["miou"] <= 100
    if name == "resclip":  # the user's value over the preset's, the preset's for the rest
        assert report["options"]["sfr_threshold"] == 0.3 and report["options"]["sfr_weight"] == 2.2
    explain = ["eval", "--dataset", "voc21", "--root", str(tmp_path / "data"), "--method", name,
               "--checkpoint", vit_checkpoint, "--out", str(tmp_path / "out"), "--no-progress",
               "--task", "explainability", "--size", "64"]  # fmt: skip
    assert main(explain) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("mIoU: ")


def test_refine_flag_errors(tmp_path, capsys, vit_checkpoint):
    make_segmentation(tmp_path / "data", "voc21", count=1)
    base = ["eval", "--dataset", "voc21", "--root", str(tmp_path / "data"),
            "--checkpoint", vit_checkpoint, "--no-progress"]  # fmt: skip
    assert main([*base, "--task", "explainability", "--refine", "pamr"]) == 2
    assert "--refine does not apply to --task explainability" in capsys.readouterr().err
    assert main([*base, "--steps", "3"]) == 2
    assert "--steps does not apply to --task segmentation" in capsys.readouterr().err
    assert main([*base, "--task", "faithfulness", "--steps", "0"]) == 2
    assert "--steps must be positive" in capsys.readouterr().err


@pytest.mark.parametrize("name", NEW)
def test_new_methods_through_explain_cli(tmp_path, capsys, vit_checkpoint, name):
    image = tmp_path / "scene.png"
    Image.fromarray(
        torch.randint(0, 256, (48, 64, 3), generator=torch.Generator().manual_seed(3))
        .numpy()
        .astype("uint8")
    ).save(image)
    argv = ["explain", str(image), "-t", "a cat", "a dog", "--method", name, "--checkpoint",
            vit_checkpoint, "--out", str(tmp_path / "out"), "--json", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == name
    assert sorted(p.name for p in (tmp_path / "out").rglob("*.png")) == [
        "01-a-cat.png",
        "02-a-dog.png",
        "grid.png",
    ]
