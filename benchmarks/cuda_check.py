"""CUDA check of the methods added in issue 14 (and PAMR): autocast fp16 / bf16 against fp32.

For each method, on a random ViT-B/16 at 448 px, two images and four texts: whether the maps
are finite, their Pearson correlation with the fp32 maps, the share of pixels whose top text
is the same, and the wall time of one ``explain``; then PAMR on CUDA against PAMR on the CPU.
Prints one JSON line per row. Needs a CUDA device; not run in CI.
Run: ``.venv/bin/python benchmarks/cuda_check.py``.
"""

from __future__ import annotations

import json
import logging
import time

import torch
from compare_official import random_vit_b16

import clip_surgery
from clip_surgery.refine import pamr

METHODS = ("resclip", "scclip", "cliper", "legrad", "naclip", "sclip")
TEXTS = ["a cat", "a dog", "a tree", "a car"]


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Correlation of two tensors' values."""
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def check(model, images, method: str, precision: str, reference) -> dict:
    """One method at one precision against the fp32 ``reference`` explanation."""
    model.precision = precision
    torch.cuda.synchronize()
    started = time.perf_counter()
    result = model.explain(images, TEXTS, method=method)
    torch.cuda.synchronize()
    same = (result.maps.argmax(dim=1) == reference.maps.argmax(dim=1)).float().mean()
    return {
        "method": method,
        "precision": precision,
        "finite": bool(torch.isfinite(result.maps).all()),
        "pearson": round(pearson(result.maps, reference.maps), 4),
        "same_top_text": round(float(same), 4),
        "seconds": round(time.perf_counter() - started, 3),
    }


def main() -> None:
    """Print the rows."""
    logging.getLogger().setLevel(logging.ERROR)  # "no pretrained weights" is intended here
    model = clip_surgery.wrap(random_vit_b16().cuda())
    model.cache_dir = None
    images = torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(1)).cuda()
    for method in METHODS:
        model.precision = "fp32"
        reference = model.explain(images, TEXTS, method=method)
        for precision in ("fp16", "bf16"):
            print(json.dumps(check(model, images, method, precision, reference)), flush=True)
    image = torch.randn(1, 3, 448, 448, device="cuda")
    scores = torch.randn(1, 60, 28, 28, device="cuda")
    on_cpu = pamr(image.cpu(), scores.cpu())
    difference = (pamr(image, scores).cpu() - on_cpu).abs().max() / on_cpu.abs().max()
    print(json.dumps({"method": "pamr", "cuda_vs_cpu": float(difference)}))


if __name__ == "__main__":
    main()
