"""Test- or validation-split figures of a tiny-synth candidate (an open_clip config JSON, weights).

Zero-shot accuracy on 1000 scenes of ``--split`` (default test) and, on its scenes 0 to
``--count`` - 1 (default 200), the pointing game of raw, clip_surgery and clearclip
(``synth.pointing_game``: all shapes / shapes of >= 200 px, the share of peaks on the
background, where the peaks land for the largest shape and the others, hits per category),
and their explainability mIoU, mSC and segmentation mIoU (preset sclip) as the synthetic
benchmark measures them: for weights that are not (yet) in the package (the bundled model's
pinned figures come from ``scripts/measure_shipped.py``). Choose between candidates with
``--split val --count 400`` and look at the test split once. Run (the weights: the config's
name with ``.safetensors``): ``.venv/bin/python scripts/evaluate_candidate.py
scripts/checkpoints/tiny-synth-stem4-mix2-step3500.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import open_clip
import torch

import clip_surgery
from clip_surgery import synth
from clip_surgery.eval import runner


def main() -> None:
    """Load the candidate through ``clip_surgery.load`` and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path, help="the run's config JSON (pooling included)")
    parser.add_argument("--weights", type=Path, default=None, help="default: CONFIG.safetensors")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--split", choices=("test", "val"), default="test", help="the scenes of every figure"
    )
    parser.add_argument(
        "--count",
        type=int,
        default=200,
        help="scenes of the pointing game, explainability and segmentation (zero-shot: 1000)",
    )
    parser.add_argument(
        "--design",
        choices=synth.DESIGNS,
        default=None,
        help="scenes; default: the design CONFIG.metrics.json records (none recorded: outline)",
    )
    args = parser.parse_args()
    if args.count < 1:
        parser.error("--count must be at least 1")
    torch.set_num_threads(args.threads)
    weights = args.weights or args.config.with_suffix(".safetensors")
    design = args.design or synth.recorded_design(args.config)
    if design is None:
        parser.error(f"{args.config.with_suffix('.metrics.json')} is missing: pass --design")
    open_clip.add_model_config(args.config)  # registered under the file's stem
    model = clip_surgery.load(args.config.stem, pretrained=str(weights))
    model.cache_dir = None
    split, count = args.split, args.count
    figures = {f"zero_shot_{split}_1000": synth.zero_shot_accuracy(model, split, 1000, design)}
    methods = ("raw", "clip_surgery", "clearclip")
    figures.update(synth.pointing_figures(model, methods, split, count, design))
    with tempfile.TemporaryDirectory() as folder:  # the benchmark's protocols, the same scenes
        synth.export_voc(folder, split, count, design)
        for method in methods:
            explained = runner.evaluate_explainability(
                model, "synthetic", folder, method, size=None, progress=False
            )
            segmented = runner.evaluate_segmentation(
                model, "synthetic", folder, method, preset="sclip", progress=False
            )
            figures[method].update(
                explainability_miou=round(explained["miou"], 1),
                msc=round(explained["msc"], 1),
                segmentation_miou=round(segmented["miou"], 1),
            )
    print(json.dumps({"design": design, "split": split, "scenes": count} | figures, indent=2))


if __name__ == "__main__":
    main()
