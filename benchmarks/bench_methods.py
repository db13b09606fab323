"""Time per image of every explanation method, relative to open_clip's plain encode_image.

ViT-B/16 and RN50 with random weights (speed does not depend on them), CPU fp32, batch 1,
two texts (text embeddings cached before timing, as in any real run), maps at the input size.
Run: ``.venv/bin/python benchmarks/bench_methods.py`` (about 2 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import logging

import open_clip
import torch
from timing import median_seconds

import clip_surgery
from clip_surgery import backbones, methods

TEXTS = ["a cat", "the sky"]


def bench(architecture: str, size: int, repeats: int) -> list[dict]:
    """Every method that supports ``architecture``, against open_clip encode_image."""
    model = open_clip.create_model(
        architecture, pretrained=None, force_quick_gelu=True, force_image_size=size
    ).eval()
    wrapped = clip_surgery.wrap(model)
    images = torch.randn(1, 3, size, size)
    wrapped.encode_text(TEXTS, templates=None)

    def baseline():
        with torch.no_grad():
            model.encode_image(images)

    base = median_seconds(baseline, repeats)
    rows = [{"method": "open_clip encode_image", "seconds": base, "ratio": 1.0}]
    family = backbones.family(wrapped.family)
    for name in methods.names():
        if not methods.get(name).supports(family):
            continue

        def run(name=name):
            wrapped.explain(images, TEXTS, method=name, templates=None)

        seconds = median_seconds(run, repeats)
        rows.append({"method": name, "seconds": seconds, "ratio": seconds / base})
    return rows


def main() -> None:
    """Run the benchmark and print one Markdown table per architecture and size."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.ERROR)  # "no pretrained weights" is intended here
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU fp32, batch 1")
    results = {}
    for architecture, size in [("ViT-B-16", 224), ("ViT-B-16", 448), ("RN50", 224)]:
        rows = bench(architecture, size, args.repeats)
        results[f"{architecture}@{size}"] = rows
        print(f"\n{architecture} at {size}px (median of {args.repeats})")
        print("| method | time per image (s) | / encode_image |")
        print("| --- | --- | --- |")
        for row in rows:
            print(f"| {row['method']} | {row['seconds']:.3f} | {row['ratio']:.2f} |")
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
