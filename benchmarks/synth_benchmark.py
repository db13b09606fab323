"""Every method on tiny-synth's held-out test scenes, against exact masks.

Exports the test scenes in the VOC layout (dataset ``synthetic``), then reports the model's
zero-shot accuracy, the time of one forward, and for every method in the registry the pointing
game (``synth.pointing_game``: for each shape present, is its map's peak on that shape's exact
mask; all shapes and shapes of at least 200 visible pixels; share of peaks on the background;
a uniformly random point and an oracle map on the model's token grid as references; where the
peaks land, on the shape, the background or another shape, for the largest shape and the rest),
RISE's deletion and insertion areas (``eval.faithfulness``: CLIP's own probability of each
present shape among the five, ``--steps`` steps, mean-colour deletion and blurred insertion),
the paper's explainability mIoU / mSC (at the model's native input size, class set = the five
shapes), segmentation mIoU (preset ``sclip`` for all methods) without and with PAMR
refinement, and the time of one ``explain`` per scene (batch 1, five texts), as a Markdown
table, a JSON file and a figure of overlays. Run:
``.venv/bin/python benchmarks/synth_benchmark.py`` (200 scenes; ``--count 10 --figure
build/synth-benchmark/methods.png`` for a quick check that leaves the README's figure alone).
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
from clip_surgery.loading import BUNDLED
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


def explain_ms(model, name: str, repeats: int = 5) -> float:
    """Median wall time of one ``explain`` of one native-size scene against the five shapes."""
    scene = synth.make_scene(synth.scene_seed("test", 1))
    image = synth._to_input(model, scene.image)[None]
    model.explain(image, list(synth.SHAPES), method=name)  # warm-up, text embeddings cached
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        model.explain(image, list(synth.SHAPES), method=name)
        times.append(time.perf_counter() - started)
    return float(np.median(times) * 1000)


def method_row(model, name: str, folder: str, count: int, steps: int) -> dict:
    """Every figure of one method on the exported scenes."""
    game = synth.pointing_game(model, name, "test", count)
    explain = runner.evaluate_explainability(
        model, "synthetic", folder, name, size=None, progress=False
    )
    faithful = runner.evaluate_faithfulness(
        model, "synthetic", folder, name, steps=steps, progress=False
    )
    segment = runner.evaluate_segmentation(
        model, "synthetic", folder, name, preset="sclip", progress=False
    )
    refined = runner.evaluate_segmentation(
        model, "synthetic", folder, name, preset="sclip", progress=False, refine="pamr"
    )
    return {
        "method": name,
        "pointing": game["all"],
        "pointing_large": game["large"],
        "background_peak": game["background_peak"],
        "peaks": game["peaks"],
        "deletion_auc": faithful["deletion_auc"],
        "insertion_auc": faithful["insertion_auc"],
        "expl_miou": explain["miou"],
        "msc": explain["msc"],
        "threshold": explain["threshold"],
        "seg_miou": segment["miou"],
        "seg_miou_pamr": refined["miou"],
        "explain_ms": explain_ms(model, name),
        "game": game,
    }


def main() -> None:
    """Run the benchmark; print the table; write JSON and the figure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-synth", choices=BUNDLED, help="a bundled model")
    parser.add_argument("--count", type=int, default=200, help="test scenes")
    parser.add_argument("--out", type=Path, default=Path("build/synth-benchmark"))
    parser.add_argument("--figure", type=Path, default=Path("docs/tiny_synth_methods.png"))
    parser.add_argument("--steps", type=int, default=20, help="deletion/insertion steps")
    args = parser.parse_args()
    torch.manual_seed(0)
    synth.DESIGN = synth.bundled_design(args.model)  # every scene below: the model's own design
    started = time.perf_counter()
    model = clip_surgery.load(args.model)
    forward = forward_ms(model)
    accuracy = synth.zero_shot_accuracy(model, "test", 1000)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        synth.export_voc(folder, "test", args.count)
        for name in applicable(model):
            rows.append(method_row(model, name, folder, args.count, args.steps))
    game = rows[-1]["game"]  # pair counts and chance rates: the same for every method
    rows = [{key: value for key, value in row.items() if key != "game"} for row in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    figure(model, args.figure)
    report = {
        "model": args.model,
        "design": synth.DESIGN,
        "weights": model.weights_hash,
        "test_scenes": args.count,
        "faithfulness_steps": args.steps,
        "faithfulness_baselines": {"deletion": "mean", "insertion": "blur"},
        "zero_shot_accuracy_1000": accuracy,
        "forward_ms": forward,
        "forward_threads": torch.get_num_threads(),
        "pointing_pairs": game["pairs"],
        "pointing_large_pairs": game["large_pairs"],
        "pointing_random": game["random"],
        "pointing_random_large": game["random_large"],
        "pointing_grid_oracle": game["oracle"],
        "pointing_grid_oracle_large": game["oracle_large"],
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
        f"{game['large_pairs']} of >= 200 px; deletion / insertion areas over the same pairs "
        f"({args.steps} steps, mean-colour deletion, blurred insertion); explainability at "
        f"{model.native_size} px (class set of the 5 shapes); segmentation with preset sclip, "
        f"without and with PAMR; explain time of one scene, {torch.get_num_threads()} threads"
    )
    print(
        "| method | pointing | pointing >= 200 px | peak on background | deletion AUC | "
        "insertion AUC | explainability mIoU | mSC | threshold | segmentation mIoU | "
        "+ PAMR | ms / image |"
    )
    print("| --- " * 12 + "|")
    print(f"| random point | {game['random']:.2f} | {game['random_large']:.2f} |" + " |" * 9)
    oracle = f"| token-grid oracle | {game['oracle']:.2f} | {game['oracle_large']:.2f} |"
    print(oracle + " |" * 9)
    for row in rows:
        print(
            f"| {row['method']} | {row['pointing']:.2f} | {row['pointing_large']:.2f} | "
            f"{row['background_peak']:.2f} | {row['deletion_auc']:.3f} | "
            f"{row['insertion_auc']:.3f} | {row['expl_miou']:.1f} | {row['msc']:.1f} | "
            f"{row['threshold']:.2f} | {row['seg_miou']:.1f} | {row['seg_miou_pamr']:.1f} | "
            f"{row['explain_ms']:.1f} |"
        )
    peaks = game["peaks"]
    print(
        f"\nWhere the peaks land, for the scene's largest shape ({peaks['largest']['pairs']} "
        f"pairs) and for the other shapes present ({peaks['others']['pairs']} pairs):"
    )
    print(
        "| method | largest: own | largest: background | largest: another shape | "
        "others: own | others: background | others: another shape |"
    )
    print("| --- " * 7 + "|")
    for row in rows:
        shares = [row["peaks"][g][p] for g in ("largest", "others") for p in synth.PEAK_PLACES]
        print(f"| {row['method']} | " + " | ".join(f"{v:.2f}" for v in shares) + " |")
    print(f"({report['seconds']} s; figure: {args.figure})")
    assert np.isfinite([r["msc"] for r in rows]).all()


if __name__ == "__main__":
    main()
