"""Deletion and insertion areas (RISE): known answers, the exact object mask against its
inverse on synthetic scenes, and the faithfulness evaluation through the API and the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_datasets import make_segmentation

import clip_surgery
from clip_surgery import OptionError, synth
from clip_surgery.cli import main
from clip_surgery.eval import faithfulness, runner

COLOUR = torch.tensor([0.9, -0.4, 0.3]).view(3, 1, 1)


def square_scene(size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise with a constant-colour square; returns the image ``[3, S, S]`` and its mask."""
    image = torch.randn(3, size, size, generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[8:20, 6:22] = True
    return torch.where(mask, COLOUR, image), mask


def object_intact(mask: torch.Tensor):
    """A toy model: the share of object pixels that still have the object's colour."""

    def score(images: torch.Tensor) -> torch.Tensor:
        same = ((images - COLOUR).abs() < 1e-4).all(dim=1)  # [K, H, W]
        return (same & mask).flatten(1).sum(dim=1) / mask.sum()

    return score


def test_auc_is_the_normalised_trapezoid():
    assert faithfulness.auc(torch.tensor([1.0, 1.0, 1.0])) == 1.0
    assert faithfulness.auc(torch.tensor([1.0, 0.0])) == 0.5
    assert faithfulness.auc(torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0])) == pytest.approx(0.25)


def test_deletion_known_answer():
    image, mask = square_scene()
    steps = 16
    score = object_intact(mask)
    removed = faithfulness.curve(score, image, mask.float(), "deletion", "mean", steps)
    per_step, pixels = math.ceil(image[0].numel() / steps), int(mask.sum())
    expected = [max(0.0, 1 - i * per_step / pixels) for i in range(steps + 1)]
    assert torch.allclose(removed, torch.tensor(expected), atol=1e-6)


@pytest.mark.parametrize("baseline", ["rise", "blur", "mean"])
def test_the_object_mask_beats_its_inverse(baseline):
    image, mask = square_scene(seed=1)
    score = object_intact(mask)
    on = faithfulness.deletion_insertion(score, image, mask.float(), 12, baseline)
    off = faithfulness.deletion_insertion(score, image, (~mask).float(), 12, baseline)
    assert on[0] < off[0] and on[1] > off[1]
    assert all(0 <= area <= 1 for area in (*on, *off))


def test_blur_and_mean_baselines():
    image, _ = square_scene(seed=2)
    assert torch.equal(faithfulness.substrate(image, "mean"), torch.zeros_like(image))
    blurred = faithfulness.substrate(image, "blur")
    assert blurred.shape == image.shape and blurred.std() < image.std() / 2
    flat = torch.full((3, 40, 40), 0.5)  # away from the zero-padded border, a flat image stays
    assert torch.allclose(faithfulness.blurred(flat)[:, 10:30, 10:30], flat[:, 10:30, 10:30])
    with pytest.raises(OptionError, match="unknown baseline"):
        faithfulness.baselines("noise")
    with pytest.raises(OptionError, match="steps"):
        faithfulness.curve(lambda x: x.mean((1, 2, 3)), image, image[0], "deletion", "mean", 0)


@pytest.fixture(scope="module")
def tiny_synth():
    return clip_surgery.load("tiny-synth")


def test_tiny_synth_object_mask_beats_its_inverse(tiny_synth):
    """Scenes of one plain (constant-colour) shape: the shape's probability under CLIP."""
    chosen = [s for s in synth.scenes("test", 120) if len(s.objects) == 1]
    chosen = [s for s in chosen if s.objects[0].texture == "plain"][:6]
    assert len(chosen) == 6
    text = tiny_synth.query(list(synth.SHAPES))
    gaps = []
    for scene in chosen:
        column = list(synth.SHAPES).index(scene.main_shape)
        image = synth._to_input(tiny_synth, scene.image)
        mask = torch.from_numpy(scene.labels > 0).float()[None, None]
        mask = F.interpolate(mask, size=image.shape[-2:], mode="nearest")[0, 0]  # at input size

        def score(images, column=column):
            cosine = tiny_synth.score(images, text, "raw").cosine
            return (tiny_synth.logit_scale * cosine).softmax(dim=-1)[:, column]

        on = faithfulness.deletion_insertion(score, image, mask, 10)
        off = faithfulness.deletion_insertion(score, image, 1 - mask, 10)
        gaps.append((off[0] - on[0], on[1] - off[1]))
        assert all(0 <= area <= 1 for area in (*on, *off))
    deletion_gap, insertion_gap = np.mean(gaps, axis=0)
    assert deletion_gap > 0 and insertion_gap > 0, gaps


def test_faithfulness_eval_api_and_cli(tmp_path, capsys, vit_checkpoint):
    make_segmentation(tmp_path / "data", "voc21", count=2)
    model = clip_surgery.load(vit_checkpoint)
    results = runner.evaluate_faithfulness(
        model, "voc21", tmp_path / "data", method="legrad", steps=4, size=64, progress=False
    )
    assert results["pairs"] > 0 and results["steps"] == 4
    assert results["baseline"] == {"deletion": "mean", "insertion": "blur"}
    for key in ("deletion_auc", "insertion_auc", "pointing"):
        assert 0 <= results[key] <= 1
    argv = ["eval", "--dataset", "voc21", "--root", str(tmp_path / "data"), "--task",
            "faithfulness", "--checkpoint", vit_checkpoint, "--out", str(tmp_path / "out"),
            "--no-progress", "--steps", "3", "--baseline", "blur", "--method", "resclip",
            "--size", "64", "--limit", "1"]  # fmt: skip
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines[-3:]] == [
        "Deletion AUC",
        "Insertion AUC",
        "Pointing",
    ]
    report = json.loads((tmp_path / "out/voc21-resclip-faithfulness-limit1.json").read_text())
    assert report["baseline"] == {"deletion": "blur", "insertion": "blur"} and report["steps"] == 3
    assert report["seconds_per_image"] > 0
    for flag in (["--refine", "pamr"], ["--preset", "sclip"]):
        assert main([*argv, *flag]) == 2
        assert "does not apply to --task faithfulness" in capsys.readouterr().err
