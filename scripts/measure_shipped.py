"""Measure a bundled model as shipped (fp16 weights loaded with ``clip_surgery.load``) and record
the figures the tests pin in its metrics JSON.

Zero-shot accuracy (largest shape among the five, 85-template ensembles) on 1000 test scenes and
the pointing game of raw and clip_surgery on test scenes 0-199 (``synth.pointing_game``), in the
scene design its metrics JSON records (``design``: the one it was trained on).
Run: ``.venv/bin/python scripts/measure_shipped.py --model tiny-synth-siglip``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from importlib.resources import files
from pathlib import Path

import clip_surgery
from clip_surgery import synth


def main() -> None:
    """Measure, print, and merge the figures into ``data/models/<model>.metrics.json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="tiny-synth", choices=["tiny-synth", "tiny-synth-siglip"]
    )
    parser.add_argument("--count", type=int, default=1000, help="test scenes for zero-shot")
    args = parser.parse_args()
    folder = Path(str(files("clip_surgery").joinpath("data/models")))
    weights = folder / f"{args.model}.safetensors"
    path = folder / f"{args.model}.metrics.json"
    metrics = json.loads(path.read_text()) if path.is_file() else {}
    design = synth.bundled_design(args.model)  # the scenes the model was trained on
    model = clip_surgery.load(args.model)
    model.cache_dir = None
    figures = {
        "eval_count": args.count,
        "shipped_test_zero_shot_accuracy": synth.zero_shot_accuracy(
            model, "test", args.count, design
        ),
        "shipped_val_zero_shot_accuracy": synth.zero_shot_accuracy(
            model, "val", args.count, design
        ),
        "weights_mib": round(weights.stat().st_size / 2**20, 2),
        "weights_sha256_16": hashlib.sha256(weights.read_bytes()).hexdigest()[:16],
        "shipped_pointing": {},
        "pointing_tolerance": 0.02,
        "reproduction_tolerance": 0.01,
    }
    games = synth.pointing_figures(model, ("raw", "clip_surgery"), design=design)
    for method, game in games.items():
        figures["shipped_pointing"][method] = {
            k: game[k] for k in ("all", "large", "background_peak", "pairs")
        }
    metrics.update(figures)
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
