"""Regenerate the README's main picture and task pictures with tiny-synth (offline, seconds).

Run: ``.venv/bin/python docs/make_figures.py`` (the methods figure comes from
``benchmarks/synth_benchmark.py``).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import clip_surgery  # noqa: E402
from clip_surgery import synth  # noqa: E402
from clip_surgery.points import points_from_map  # noqa: E402
from clip_surgery.tasks.classify import class_scores  # noqa: E402
from clip_surgery.tasks.sam import TextMask, grid_maps, mask_overlay  # noqa: E402
from clip_surgery.tasks.words import explain_words, word_figure  # noqa: E402
from clip_surgery.viz import save_png  # noqa: E402

HERE = Path(__file__).parent
SCALE = 4
EXAMPLE_SCENES = (3, 7, 11, 20)


def scene_image(index: int) -> tuple[synth.Scene, Image.Image, Image.Image]:
    """A test scene, its picture (what the model sees, as in the benchmark) and the picture
    upscaled for display only (nearest neighbour)."""
    scene = synth.make_scene(synth.scene_seed("test", index))
    picture = Image.fromarray(scene.image)
    return scene, picture, picture.resize((64 * SCALE, 64 * SCALE), Image.NEAREST)


def points_figure(model) -> Path:
    """Point prompts from CLIP Surgery's map of each scene's main shape (what SAM receives)."""
    figure, axes = plt.subplots(1, 3, figsize=(9, 3.2))
    for axis, index in zip(axes, (7, 11, 20), strict=True):
        scene, picture, shown = scene_image(index)
        maps = grid_maps(model, picture, [scene.main_shape], "clip_surgery", None)
        points, labels = points_from_map(maps[0], (shown.height, shown.width))
        prompts = TextMask(
            scene.main_shape,
            np.zeros((shown.height, shown.width), bool),
            0.0,
            points,
            labels,
            None,
            [],
        )
        axis.imshow(mask_overlay(shown, prompts))
        axis.set_title(
            f'"{scene.main_shape}": {int(labels.sum())} + / {int((labels == 0).sum())} - points',
            fontsize=9,
        )
        axis.axis("off")
    figure.tight_layout()
    return save_png(figure, HERE / "tiny_synth_points.png")


def classify_figure(model) -> Path:
    """Class scores of one scene, plain CLIP and with surgery."""
    scene, picture, shown = scene_image(7)
    labels = list(synth.SHAPES)
    plain = class_scores(model, picture, labels, surgery=False)[0].numpy()
    surgery = class_scores(model, picture, labels, surgery=True)[0].numpy()
    present = {o.shape for o in scene.objects if o.pixels}
    figure, (left, right) = plt.subplots(
        1, 2, figsize=(8, 3.2), gridspec_kw={"width_ratios": [1, 1.6]}
    )
    left.imshow(shown)
    left.axis("off")
    left.set_title("present: " + ", ".join(sorted(present)), fontsize=9)
    positions = np.arange(len(labels))
    right.bar(positions - 0.2, plain, 0.4, label="plain CLIP")
    right.bar(positions + 0.2, surgery, 0.4, label="with surgery (global + best patch)")
    right.set_xticks(positions, labels)
    right.legend(fontsize=8)
    right.set_ylabel("score")
    figure.tight_layout()
    return save_png(figure, HERE / "tiny_synth_classify.png")


def words_figure(model) -> Path:
    """Word importances and per-word maps for a short caption of scene 7."""
    _, picture, shown = scene_image(7)
    result = explain_words(model, picture, "a small blue ring and a large red cross")
    return save_png(word_figure(shown, result), HERE / "tiny_synth_words.png")


def example_scenes() -> list[Path]:
    """The test scenes of ``examples/scenes`` (3, 7, 11, 20), written from the generator."""
    folder = HERE.parent / "examples/scenes"
    paths = []
    for index in EXAMPLE_SCENES:
        path = folder / f"test_{index:05d}.png"
        Image.fromarray(synth.make_scene(synth.scene_seed("test", index)).image).save(path)
        paths.append(path)
    return paths


def main_figure() -> Path:
    """The README's first picture: the grid the main command writes for test scene 7."""
    import shutil
    import tempfile

    from clip_surgery.cli import main as cli

    with tempfile.TemporaryDirectory() as folder:
        command = ["explain", str(HERE.parent / "examples/scenes/test_00007.png")]
        command += ["--model", "tiny-synth", "--text", *synth.SHAPES, "--out", folder]
        if cli([*command, "--no-progress"]) != 0:
            raise SystemExit("the main command failed")
        (grid,) = Path(folder).glob("*-test-00007/grid.png")  # the CLI's NNN-stem folder
        return Path(shutil.copy(grid, HERE / "main_example.png"))


def main() -> None:
    """Write the main picture and the three task pictures next to this script."""
    model = clip_surgery.load("tiny-synth")
    for path in (
        *example_scenes(),
        main_figure(),
        points_figure(model),
        classify_figure(model),
        words_figure(model),
    ):
        print(path)


if __name__ == "__main__":
    main()
