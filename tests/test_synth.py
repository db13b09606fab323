"""The synthetic scenes, their export, and the shipped tiny-synth model."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import subprocess
import sys
from importlib.resources import files
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import clip_surgery
from clip_surgery import synth
from clip_surgery.eval.datasets import SEGMENTATION


def test_scenes_are_deterministic_and_splits_disjoint():
    first, again = (
        synth.make_scene(synth.scene_seed("train", 5)),
        synth.make_scene(synth.scene_seed("train", 5)),
    )
    assert np.array_equal(first.image, again.image) and first.caption == again.caption
    seeds = {
        split: {synth.scene_seed(split, i) for i in range(0, 9_999_999, 99_999)}
        for split in synth.SPLITS
    }
    assert not (seeds["train"] & seeds["val"]) and not (seeds["val"] & seeds["test"])


@pytest.mark.parametrize("design", synth.DESIGNS)
@pytest.mark.parametrize("index", range(20))
def test_labels_match_objects_and_captions(index, design):
    scene = synth.make_scene(synth.scene_seed("test", index), design=design)
    assert scene.image.shape == (64, 64, 3) and scene.image.dtype == np.uint8
    assert scene.labels.shape == (64, 64)
    present = {synth.CLASSES[c] for c in np.unique(scene.labels) if c}
    visible = {o.shape for o in scene.objects if o.pixels > 0}
    assert present == visible
    assert scene.main_shape in present
    mentioned = [shape for shape in synth.SHAPES if shape in scene.caption]
    assert mentioned and set(mentioned) <= present
    total = sum(o.pixels for o in scene.objects)
    assert total == int((scene.labels > 0).sum())


def test_the_largest_shape_is_never_a_near_tie():
    """The zero-shot target is well defined: the largest visible shape has at least 1.5 times
    the pixels of the next one, in every variant."""
    for index in range(300):
        for variant in (0, 1):
            scene = synth.make_scene(synth.scene_seed("test", index), variant)
            pixels = sorted((o.pixels for o in scene.objects), reverse=True)
            assert len(pixels) <= synth.MAX_OBJECTS
            assert pixels[0] >= 400 and (len(pixels) == 1 or pixels[0] >= 1.5 * pixels[1])
            assert scene.objects[0].size == "large" and scene.main_shape == scene.objects[0].shape


def _first_named(caption: str) -> str:
    """The first shape word of ``caption`` (whole words: "drawing" does not name a ring)."""
    return re.findall(rf"\b({'|'.join(synth.SHAPES)})\b", caption)[0]


@pytest.mark.parametrize(
    ("index", "some", "every"),
    [
        (0, "a blue cross in the scene", "a blue cross in the scene"),
        (
            5,
            "a picture of a large red triangle on a stripes background",
            "a picture of a large red triangle and a small cross on a stripes background",
        ),
    ],
)
def test_outline_captions_are_pinned(index, some, every):
    """The default captions (the k largest shapes) and "all" (every visible shape) of the
    outline design as generated since the scenes of issue 17: the training data of
    tiny-synth-siglip."""
    seed = synth.scene_seed("test", index)
    assert synth.make_scene(seed, design="outline").caption == some
    assert synth.make_scene(seed, captions="all", design="outline").caption == every


@pytest.mark.parametrize(
    ("index", "some", "every"),
    [
        (0, "a large cross in the scene", "a large cross in the scene"),
        (
            5,
            "a photo of the small large red triangle.",  # a template's "small", as in CLIP's list
            "a toy large red triangle and a small purple cross.",
        ),
    ],
)
def test_material_captions_are_pinned(index, some, every):
    """The default design's captions: the training data of the shipped tiny-synth."""
    seed = synth.scene_seed("test", index)
    assert synth.DESIGN == "material"
    assert synth.make_scene(seed).caption == some
    assert synth.make_scene(seed, captions="all").caption == every


@pytest.mark.parametrize(
    ("design", "index", "mean", "labels_sha"),
    [
        ("outline", 0, 146.451, "465088643ed08564"),
        ("outline", 1, 163.782, "f98f8bcec7779054"),
        ("outline", 2, 105.056, "5a1a8c7fdb668e4d"),
        ("material", 0, 146.564, "465088643ed08564"),
        ("material", 1, 164.264, "571690d32f33b67d"),
        ("material", 2, 114.659, "220f6bc3a9311396"),
    ],
)
def test_scene_pictures_are_pinned(design, index, mean, labels_sha):
    """Each design's pictures and label maps as generated since its model was trained (a change
    of the patterns or of the random stream moves the mean colour or the labels)."""
    scene = synth.make_scene(synth.scene_seed("test", index), design=design)
    assert hashlib.sha256(scene.labels.tobytes()).hexdigest()[:16] == labels_sha
    assert float(scene.image.mean()) == pytest.approx(mean, abs=0.01)


def test_a_runs_design_is_read_beside_its_config(tmp_path):
    """``recorded_design``: the metrics JSON beside the config; a run older than the designs is
    "outline"; no metrics file: ``None`` (the scripts then ask for ``--design``)."""
    config = tmp_path / "run.json"
    assert synth.recorded_design(config) is None
    (tmp_path / "run.metrics.json").write_text(json.dumps({"steps": 3}))
    assert synth.recorded_design(config) == "outline"
    (tmp_path / "run.metrics.json").write_text(json.dumps({"design": "material"}))
    assert synth.recorded_design(config) == "material"


def test_bundled_models_name_their_design():
    assert synth.bundled_design("tiny-synth") == "material"
    assert synth.bundled_design("tiny-synth-siglip") == "outline"
    with pytest.raises(ValueError, match="not a bundled model"):
        synth.bundled_design("ViT-B-16")


def test_caption_modes_change_only_the_caption():
    """Caption mode "some" names the largest shape first; "area" draws the first named shape in
    proportion to the visible pixels (known shares 0.6 / 0.3 / 0.1); images and labels never
    change."""
    for index in range(10):
        seed = synth.scene_seed("train", index)
        some, area = synth.make_scene(seed), synth.make_scene(seed, captions="area")
        assert np.array_equal(some.image, area.image) and np.array_equal(some.labels, area.labels)
        assert _first_named(some.caption) == some.main_shape
    objects = [
        synth.SceneObject("circle", "red", "plain", "large", 600),
        synth.SceneObject("square", "blue", "plain", "small", 300),
        synth.SceneObject("ring", "green", "plain", "small", 100),
    ]
    draws = 3000
    firsts = [
        _first_named(synth._caption(objects, "dots", np.random.default_rng(i), "area"))
        for i in range(draws)
    ]
    for shape, share in (("circle", 0.6), ("square", 0.3), ("ring", 0.1)):
        tolerance = 4 * np.sqrt(share * (1 - share) / draws)
        assert abs(firsts.count(shape) / draws - share) < tolerance, shape
    firsts_some = {
        _first_named(synth._caption(objects, "dots", np.random.default_rng(i), "some"))
        for i in range(200)
    }
    assert firsts_some == {"circle"}
    with pytest.raises(ValueError, match="caption mode"):
        synth.make_scene(seed, captions="largest")


@pytest.mark.parametrize("design", synth.DESIGNS)
@pytest.mark.parametrize("index", range(8))
def test_variants_change_only_the_shapes(index, design):
    seed = synth.scene_seed("train", index)
    scene = synth.make_scene(seed, design=design)
    again = synth.make_scene(seed, variant=0, design=design)
    assert np.array_equal(scene.image, again.image) and scene.caption == again.caption
    variant = synth.make_scene(seed, variant=1 + index % 3, design=design)
    repeat = synth.make_scene(seed, variant=1 + index % 3, design=design)
    assert np.array_equal(variant.image, repeat.image)
    assert variant.background == scene.background
    # same colours, textures and sizes in drawing order; other shape categories
    keep = [(o.colour, o.texture, o.size) for o in scene.objects]
    assert [(o.colour, o.texture, o.size) for o in variant.objects] == keep or (
        len(variant.objects) != len(scene.objects)  # an object can be hidden in one of them
    )
    assert [o.shape for o in variant.objects] != [o.shape for o in scene.objects]
    # pixels no shape covers in either rendering are identical (same background and noise)
    free = (scene.labels == 0) & (variant.labels == 0)
    assert np.array_equal(scene.image[free], variant.image[free])
    present = {synth.CLASSES[c] for c in np.unique(variant.labels) if c}
    assert present == {o.shape for o in variant.objects if o.pixels > 0}
    # variant 5 shows the large shape as its own category again: same pattern, period and phase
    same = synth.make_scene(seed, variant=5, design=design)
    large = synth.SHAPES.index(scene.objects[0].shape) + 1
    both = (scene.labels == large) & (same.labels == large)
    assert both.sum() > 100 and np.array_equal(scene.image[both], same.image[both])


def test_each_category_has_a_material_of_its_own():
    """With the same draws the five categories get five different fills; each fill repeats with
    its period along both axes (it tells the category, not the position); its pattern stands out
    on every colour; the captions of material scenes name no texture."""
    draws = np.array([0.0, 0.25, 0.25])  # period 4 px, phase 2 px
    for colour in synth.COLOURS.values():
        rgb = np.array(colour, np.float32)
        fills = {shape: synth._material(shape, rgb, draws) for shape in synth.SHAPES}
        for first, second in itertools.combinations(synth.SHAPES, 2):
            assert (fills[first] != fills[second]).any(-1).mean() > 0.2, (first, second)
        for shape, fill in fills.items():
            assert (fill[4:] == fill[:-4]).all(-1).mean() > 0.99, shape
            assert (fill[:, 4:] == fill[:, :-4]).all(-1).mean() > 0.99, shape
            luminance = np.unique(fill @ np.array([0.299, 0.587, 0.114], np.float32))
            assert len(luminance) == 2 and np.ptp(luminance) > 60, (shape, colour)
    for index in range(30):
        scene = synth.make_scene(synth.scene_seed("test", index), design="material")
        assert {o.texture for o in scene.objects} == {"plain"}
        assert not set(synth.TEXTURES[1:]) & set(scene.caption.split())
    with pytest.raises(ValueError, match="scene design"):
        synth.make_scene(0, design="photo")


def test_export_is_readable_by_the_harness(tmp_path):
    keys = synth.export_voc(tmp_path, "test", 5)
    spec = SEGMENTATION["synthetic"]
    samples = spec.samples(tmp_path)
    assert [s.key for s in samples] == keys
    label = spec.read_label(samples[2].label)
    assert np.array_equal(label, synth.make_scene(synth.scene_seed("test", 2)).labels)
    assert spec.classes[1:] == [[shape] for shape in synth.SHAPES]


BUNDLED = ["tiny-synth", "tiny-synth-siglip"]


def _stated(name: str = "tiny-synth") -> dict:
    return json.loads(
        files("clip_surgery").joinpath(f"data/models/{name}.metrics.json").read_text()
    )


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_model_loads_offline_and_reaches_its_stated_accuracy(name):
    stated = _stated(name)
    model = clip_surgery.load(name)
    assert model.native_size == (160 if name == "tiny-synth" else 64) and model.is_vit
    weights = files("clip_surgery").joinpath(f"data/models/{name}.safetensors")
    assert weights.stat().st_size <= 16 * 2**20
    accuracy = synth.zero_shot_accuracy(model, "test", stated["eval_count"], stated["design"])
    assert accuracy == pytest.approx(stated["shipped_test_zero_shot_accuracy"], abs=0.01)
    # far above the 20% of guessing among five shapes; tiny-synth: issue 17's bar
    assert accuracy >= {"tiny-synth": 0.85}.get(name, 0.4)


def test_tiny_synth_siglip_is_a_map_head_model():
    model = clip_surgery.load("tiny-synth-siglip")
    assert model.family == "open_clip SigLIP" and model.backbone.vision.prefix == 0


@pytest.mark.parametrize("name", BUNDLED)
@pytest.mark.parametrize("method", ["raw", "clip_surgery"])
def test_bundled_model_points_at_the_shapes_as_stated(name, method):
    """The pointing game on the 200 test scenes, pinned within the stated tolerance."""
    stated = _stated(name)
    pinned = stated["shipped_pointing"][method]
    tolerance = stated["pointing_tolerance"]
    model = clip_surgery.load(name)
    game = synth.pointing_game(model, method, "test", 200, design=stated["design"])
    assert game["pairs"] == pinned["pairs"]
    assert game["all"] == pytest.approx(pinned["all"], abs=tolerance)
    assert game["large"] == pytest.approx(pinned["large"], abs=tolerance)
    assert game["background_peak"] == pytest.approx(pinned["background_peak"], abs=tolerance)


def test_bundled_model_explains_a_scene():
    model = clip_surgery.load("tiny-synth")
    scene = synth.make_scene(synth.scene_seed("test", 0))
    image = model.preprocess(__import__("PIL.Image").Image.fromarray(scene.image))
    result = model.explain(image, list(synth.SHAPES))
    assert result.maps.shape == (1, 5, 160, 160) and result.grid == (20, 20)  # the input's size
    assert torch.isfinite(result.maps).all()
    assert result.maps_at((64, 64)).shape == (1, 5, 64, 64)  # the scene's


def test_the_pointing_game_reports_a_token_grid_oracle():
    """An oracle map on the model's 20 x 20 grid (each token's share of the shape) points at
    nearly every shape: the grid is not what limits a method's pointing."""
    game = synth.pointing_game(clip_surgery.load("tiny-synth"), "raw", "test", 100)
    assert 0.9 <= game["oracle"] <= 1 and game["oracle_large"] >= game["oracle"]
    assert game["oracle"] > game["random"] + 0.5
    peaks = game["peaks"]  # the breakdown of where the peaks land agrees with the hit rates

    def pairs_at(place: str) -> float:
        return sum(peaks[g][place] * peaks[g]["pairs"] for g in ("largest", "others"))

    assert pairs_at("own") == pytest.approx(game["all"] * game["pairs"])
    assert pairs_at("background") == pytest.approx(game["background_peak"] * game["pairs"])


class _LabelMapModel:
    """A stand-in model whose maps are chosen masks of the scenes it is shown (known answers).

    The map of each class is ``pick(labels, category)`` at pixel resolution.
    """

    def __init__(self, pick):
        self.pick, self.shown = pick, 0

    def preprocess(self, image):
        return torch.from_numpy(np.array(image)).permute(2, 0, 1).float()

    def explain(self, images, texts, method):
        chunk = synth.scenes("test", len(images), start=self.shown)
        self.shown += len(images)
        maps = []
        for scene in chunk:
            labels = torch.from_numpy(scene.labels.astype(np.int64))
            maps.append(torch.stack([self.pick(labels, c + 1) for c in range(len(texts))]))
        similarity = torch.stack(maps).float().flatten(2).transpose(1, 2)  # [B, N, T]
        return SimpleNamespace(similarity=similarity, grid=(synth.SIZE, synth.SIZE))


def _largest(labels):
    counts = torch.bincount(labels.flatten(), minlength=len(synth.CLASSES))[1:]
    return int(counts.argmax()) + 1


@pytest.mark.parametrize(
    ("pick", "largest", "others"),
    [
        (lambda labels, c: labels == c, "own", "own"),
        (lambda labels, c: labels == 0, "background", "background"),
        (lambda labels, c: labels == _largest(labels), "own", "other_shape"),
    ],
)
def test_the_pointing_game_says_where_the_peaks_land(pick, largest, others):
    """Maps that are each shape's own mask, the background, or the largest shape's mask put
    every peak there: on the shape itself, the background, or (for the shapes other than the
    largest) another shape."""
    game = synth.pointing_game(_LabelMapModel(pick), "stub", "test", 30, batch=10)
    peaks = game["peaks"]
    assert peaks["largest"]["pairs"] == 30  # one largest category per scene
    assert peaks["largest"]["pairs"] + peaks["others"]["pairs"] == game["pairs"]
    assert peaks["others"]["pairs"] > 5
    assert peaks["largest"][largest] == 1.0 and peaks["others"][others] == 1.0
    for group in ("largest", "others"):
        assert sum(peaks[group][p] for p in synth.PEAK_PLACES) == pytest.approx(1.0)


@pytest.mark.parametrize("hit", [*synth.SHAPES, "none"])
def test_the_pointing_game_counts_hits_per_shape(hit):
    """Maps that are the own mask for one category (``hit``) and the background for the others:
    that category hits all its pairs of >= 200 px, the others none, and every category's pairs
    are the scenes' own count of >= 200 px masks."""
    hit_label = synth.SHAPES.index(hit) + 1 if hit in synth.SHAPES else -1

    def pick(labels, c):
        return labels == (c if c == hit_label else 0)

    game = synth.pointing_game(_LabelMapModel(pick), "stub", "test", 30, batch=10)
    counts = np.zeros(len(synth.CLASSES), int)
    for scene in synth.scenes("test", 30):
        counts += np.bincount(scene.labels.flatten(), minlength=len(synth.CLASSES)) >= 200
    by_shape = game["large_by_shape"]
    assert list(by_shape) == list(synth.SHAPES)
    assert [row["pairs"] for row in by_shape.values()] == counts[1:].tolist()
    assert sum(row["pairs"] for row in by_shape.values()) == game["large_pairs"]
    assert min(counts[1:]) > 0
    for shape, row in by_shape.items():
        assert row["hits"] == (row["pairs"] if shape == hit else 0), shape


def test_pointing_figures_are_the_games_figures_rounded():
    """Maps that are the largest shape's mask (non-round rates): every figure is the game's,
    rounded to 4 decimals, peak shares included."""

    def stub():
        return _LabelMapModel(lambda labels, c: labels == _largest(labels))

    game = synth.pointing_game(stub(), "stub", "test", 30)
    figures = synth.pointing_figures(stub(), ("stub",), count=30)["stub"]
    assert 0 < game["all"] < 1 and game["all"] != round(game["all"], 4)
    for key in ("all", "large", "background_peak"):
        assert figures[key] == round(game[key], 4)
    assert figures["pairs"] == game["pairs"]
    assert figures["large_by_shape"] == game["large_by_shape"]
    for group in ("largest", "others"):
        for place in synth.PEAK_PLACES:
            assert figures["peaks"][group][place] == round(game["peaks"][group][place], 4)


def _evaluate_candidate(*options: str) -> subprocess.CompletedProcess:
    script = Path(__file__).parents[1] / "scripts/evaluate_candidate.py"
    return subprocess.run(
        [sys.executable, str(script), *options], capture_output=True, text=True, timeout=600
    )


def test_evaluate_candidate_reports_the_validation_games_figures(tmp_path):
    """``--split val --count 4`` on a copy of the bundled model: its pointing figures are the
    package's pointing game on validation scenes 0-3, per-shape hits included."""
    models = files("clip_surgery").joinpath("data/models")
    config = tmp_path / "candidate-copy.json"
    config.write_text(models.joinpath("tiny-synth.json").read_text())
    metrics = models.joinpath("tiny-synth.metrics.json").read_text()  # records the design
    config.with_suffix(".metrics.json").write_text(metrics)
    weights = str(models.joinpath("tiny-synth.safetensors"))
    done = _evaluate_candidate(str(config), "--weights", weights, "--split", "val", "--count", "4")
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert (printed["design"], printed["split"], printed["scenes"]) == ("material", "val", 4)
    assert 0.9 <= printed["zero_shot_val_1000"] <= 1.0
    model = clip_surgery.load("tiny-synth")
    game = synth.pointing_game(model, "clip_surgery", "val", 4, design="material")
    assert printed["clip_surgery"]["all"] == round(game["all"], 4)
    assert printed["clip_surgery"]["large_by_shape"] == game["large_by_shape"]
    assert 0 <= printed["clip_surgery"]["explainability_miou"] <= 100


def test_evaluate_candidate_refuses_an_empty_count(tmp_path):
    """``--count 0`` exits 2 with argparse's one error line, before loading anything."""
    done = _evaluate_candidate(str(tmp_path / "missing.json"), "--count", "0")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].endswith("--count must be at least 1")


def test_evaluate_candidate_passes_the_split_to_every_figure(tmp_path, monkeypatch, capsys):
    """Zero-shot (1000 scenes), the pointing game and the exported scenes of explainability and
    segmentation all come from ``--split``; ``--count`` sets all but zero-shot."""
    import importlib.util

    from clip_surgery.eval import runner

    script = Path(__file__).parents[1] / "scripts/evaluate_candidate.py"
    spec = importlib.util.spec_from_file_location("evaluate_candidate", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    calls = {}

    def record(name, result):
        def called(*args, **kwargs):
            calls[name] = args
            return result

        return called

    monkeypatch.setattr(module.open_clip, "add_model_config", lambda path: None)
    monkeypatch.setattr(module.clip_surgery, "load", lambda *a, **k: SimpleNamespace())
    monkeypatch.setattr(synth, "zero_shot_accuracy", record("zero_shot", 0.5))
    figures = {m: {} for m in ("raw", "clip_surgery", "clearclip")}
    monkeypatch.setattr(synth, "pointing_figures", record("pointing", figures))
    monkeypatch.setattr(synth, "export_voc", record("export", []))
    scores = {"miou": 1.0, "msc": 2.0}
    monkeypatch.setattr(runner, "evaluate_explainability", record("explain", scores))
    monkeypatch.setattr(runner, "evaluate_segmentation", record("segment", scores))
    config = tmp_path / "candidate.json"
    options = [str(config), "--design", "material", "--split", "val", "--count", "7"]
    monkeypatch.setattr(sys, "argv", ["evaluate_candidate.py", *options])
    module.main()
    assert calls["zero_shot"][1:] == ("val", 1000, "material")
    assert calls["pointing"][2:] == ("val", 7, "material")
    assert calls["export"][1:] == ("val", 7, "material")
    printed = json.loads(capsys.readouterr().out)
    assert (printed["split"], printed["scenes"], printed["zero_shot_val_1000"]) == ("val", 7, 0.5)
