"""Every method on tiny-synth's held-out test scenes, against exact masks.

Exports the test scenes in the VOC layout (dataset ``synthetic``), then reports the model's
zero-shot accuracy, the time of one forward, and for every method in the registry the pointing
game (``synth.pointing_game``: for each shape present, is its map's peak on that shape's exact
mask; all shapes and shapes of at least 200 visible pixels; share of peaks on the background),
the paper's explainability mIoU / mSC (at the model's native input size, class set = the five
shapes) and segmentation mIoU (preset ``sclip`` for all methods), as a Markdown table, a JSON
file and a figure of overlays. Run: ``.venv/bin/python benchmarks/synth_benchmark.py`` (a few
minutes).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import clip_surgery
from clip_surgery import backbones, methods, synth
from clip_surgery.eval import runner
from clip_surgery.viz import overlay, save_png

FIGURE_SCENES = (3, 7, 11, 20)


def figure(model, path: Path, scale: int = 4) -> Path:
    """Rows: test scenes; columns: the input, then each method's map of the scene's main shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = applicable(model)
    rows = [synth.make_scene(synth.scene_seed("test", i)) for i in FIGURE_SCENES]
    fig, axes = plt.subplots(
        len(rows), len(names) + 1, figsize=(1.6 * (len(names) + 1), 1.75 * len(rows))
    )
    for row, scene in enumerate(rows):
        picture = Image.fromarray(scene.image)
        big = picture.resize((64 * scale, 64 * scale), Image.NEAREST)
        axes[row, 0].imshow(big)
        axes[row, 0].set_title(scene.main_shape, fontsize=8)
        column = list(synth.SHAPES).index(scene.main_shape)
        for index, name in enumerate(names, start=1):
            result = model.explain(
                picture, list(synth.SHAPES), method=name, output_size=(64 * scale, 64 * scale)
            )
            axes[row, index].imshow(overlay(big, result.maps[0, column]))
            if row == 0:
                axes[row, index].set_title(name, fontsize=8)
    for axis in axes.flat:
        axis.axis("off")
    fig.tight_layout()
    return save_png(fig, path)


def applicable(model) -> list[str]:
    """The registered methods that apply to ``model``'s backbone family."""
    family = backbones.capabilities(model.backbone)
    return [name for name in methods.names() if methods.get(name).supports(family)]


def forward_ms(model, repeats: int = 50) -> float:
    """Median wall time of one plain forward (``encode_image``) of one native-size scene."""
    scene = synth.make_scene(synth.scene_seed("test", 0))
    image = synth._to_input(model, scene.image)[None]
    times = []
    for index in range(repeats + 5):
        started = time.perf_counter()
        model.encode_image(image, surgery=False)
        if index >= 5:  # warm-up excluded
            times.append(time.perf_counter() - started)
    return float(np.median(times) * 1000)


def main() -> None:
    """Run the benchmark; print the table; write JSON and the figure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-synth", help="tiny-synth or tiny-synth-siglip")
    parser.add_argument("--count", type=int, default=200, help="test scenes")
    parser.add_argument("--out", type=Path, default=Path("build/synth-benchmark"))
    parser.add_argument("--figure", type=Path, default=Path("docs/tiny_synth_methods.png"))
    args = parser.parse_args()
    torch.manual_seed(0)
    started = time.perf_counter()
    model = clip_surgery.load(args.model)
    forward = forward_ms(model)
    accuracy = synth.zero_shot_accuracy(model, "test", 1000)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        synth.export_voc(folder, "test", args.count)
        for name in applicable(model):
            game = synth.pointing_game(model, name, "test", args.count)
            explain = runner.evaluate_explainability(
                model, "synthetic", folder, name, size=None, progress=False
            )
            segment = runner.evaluate_segmentation(
                model, "synthetic", folder, name, preset="sclip", progress=False
            )
            rows.append(
                {
                    "method": name,
                    "pointing": game["all"],
                    "pointing_large": game["large"],
                    "background_peak": game["background_peak"],
                    "expl_miou": explain["miou"],
                    "msc": explain["msc"],
                    "threshold": explain["threshold"],
                    "seg_miou": segment["miou"],
                }
            )
    args.out.mkdir(parents=True, exist_ok=True)
    figure(model, args.figure)
    report = {
        "model": args.model,
        "weights": model.weights_hash,
        "test_scenes": args.count,
        "zero_shot_accuracy_1000": accuracy,
        "forward_ms": forward,
        "forward_threads": torch.get_num_threads(),
        "pointing_pairs": game["pairs"],
        "pointing_large_pairs": game["large_pairs"],
        "pointing_random": game["random"],
        "pointing_random_large": game["random_large"],
        "methods": rows,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (args.out / "synth_benchmark.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{args.model} zero-shot accuracy (largest shape, 1000 test scenes): {accuracy:.1%}")
    print(
        f"forward of one {model.native_size} px scene (encode_image, "
        f"{torch.get_num_threads()} threads, median of 50): {forward:.1f} ms"
    )
    print(
        f"{args.count} test scenes; pointing game over {game['pairs']} (scene, shape) pairs, "
        f"{game['large_pairs']} of >= 200 px; explainability at {model.native_size} px "
        "(class set of the 5 shapes); segmentation with preset sclip"
    )
    print(
        "| method | pointing | pointing >= 200 px | peak on background | "
        "explainability mIoU | mSC | threshold | segmentation mIoU |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| random point | {game['random']:.2f} | {game['random_large']:.2f} | | | | | |")
    for row in rows:
        print(
            f"| {row['method']} | {row['pointing']:.2f} | {row['pointing_large']:.2f} | "
            f"{row['background_peak']:.2f} | {row['expl_miou']:.1f} | {row['msc']:.1f} | "
            f"{row['threshold']:.2f} | {row['seg_miou']:.1f} |"
        )
    print(f"({report['seconds']} s; figure: {args.figure})")
    assert np.isfinite([r["msc"] for r in rows]).all()


if __name__ == "__main__":
    main()
