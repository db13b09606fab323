"""Speed and memory of the surgery forward and of feature surgery, against baselines in one run.

1. CLIP Surgery's dual-path encode vs open_clip's plain ``encode_image`` on the same ViT-B/16
   (random weights; speed does not depend on them) at 448 px, batch 1 and 8, CPU fp32.
   Target: ratio <= 1.15 (the v-v attention adds about 11% of the FLOPs).
2. Feature surgery for 171 classes in O(B*N*T) vs the reference's materialised [B, N, T, D]
   tensor: time and peak memory, each measured in a fresh process.

Run: ``.venv/bin/python benchmarks/bench_surgery.py`` (about 3 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from timing import median_seconds


def bench_encode(size: int, batches: list[int], repeats: int) -> list[dict]:
    """Surgery encode vs open_clip encode_image on ViT-B/16 at ``size`` pixels."""
    import logging

    import open_clip

    import clip_surgery

    logging.getLogger().setLevel(logging.ERROR)  # "no pretrained weights" is intended here
    model = open_clip.create_model(
        "ViT-B-16", pretrained=None, force_quick_gelu=True, force_image_size=size
    ).eval()
    wrapped = clip_surgery.wrap(model)
    rows = []
    for batch in batches:
        images = torch.randn(batch, 3, size, size)

        def plain(images=images):
            with torch.no_grad():
                model.encode_image(images)

        def surgery(images=images):
            wrapped.encode_image(images)

        def ours_plain(images=images):
            wrapped.encode_image(images, surgery=False)

        base = median_seconds(plain, repeats)
        dual = median_seconds(surgery, repeats)
        ours = median_seconds(ours_plain, repeats)
        rows.append(
            {
                "batch": batch,
                "open_clip_s": base,
                "surgery_s": dual,
                "ours_plain_s": ours,
                "ratio": dual / base,
            }
        )
    return rows


def materialised_feature_surgery(f: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The reference's [B, N, T, D] form (class weights from the CLS token)."""
    prob = (2 * f[:, :1] @ t.T).softmax(dim=-1)
    weights = prob / prob.mean(dim=-1, keepdim=True)
    feats = f.unsqueeze(2) * t.view(1, 1, *t.shape)
    feats *= weights.unsqueeze(-1)
    feats = feats - feats.mean(dim=2, keepdim=True)
    return feats.sum(dim=-1)


def feature_child(kind: str, batch: int, tokens: int, classes: int, dim: int) -> None:
    """Run one feature-surgery variant in this (fresh) process and print time and peak memory."""
    from clip_surgery import feature_surgery

    generator = torch.Generator().manual_seed(0)
    f = F.normalize(torch.randn(batch, tokens, dim, generator=generator), dim=-1)
    t = F.normalize(torch.randn(classes, dim, generator=generator), dim=-1)
    function = feature_surgery if kind == "ours" else materialised_feature_surgery
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    result = function(f, t)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    checksum = float(result.double().abs().sum())
    print(json.dumps({"seconds": seconds, "peak_mib": peak / 1024, "checksum": checksum}))


def bench_feature_surgery(batch: int, tokens: int, classes: int, dim: int) -> dict:
    """Both variants, each in a fresh process, with their outputs compared."""
    results = {}
    for kind in ("ours", "materialised"):
        command = [sys.executable, __file__, "--feature-child", kind, "--batch", str(batch)]
        command += ["--tokens", str(tokens), "--classes", str(classes), "--dim", str(dim)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[kind] = json.loads(output.strip().splitlines()[-1])
    ours, materialised = results["ours"], results["materialised"]
    agreement = abs(ours["checksum"] - materialised["checksum"]) / materialised["checksum"]
    return {
        "batch": batch,
        "tokens": tokens,
        "classes": classes,
        "dim": dim,
        **{
            "ours_s": ours["seconds"],
            "materialised_s": materialised["seconds"],
            "ours_peak_mib": ours["peak_mib"],
            "materialised_peak_mib": materialised["peak_mib"],
            "checksum_rel_diff": agreement,
        },
    }


def main() -> None:
    """Parse options, run both benchmarks, print a table (and JSON with --json)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--classes", type=int, default=171)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--feature-child", choices=["ours", "materialised"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=1 + (448 // 16) ** 2)
    parser.add_argument("--dim", type=int, default=512)
    args = parser.parse_args()
    if args.feature_child:
        feature_child(args.feature_child, args.batch, args.tokens, args.classes, args.dim)
        return

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU fp32")
    encode = bench_encode(args.size, args.batches, args.repeats)
    print(
        f"\nViT-B/16 at {args.size}px: surgery encode vs open_clip encode_image (median of "
        f"{args.repeats})"
    )
    print("| batch | open_clip encode_image (s) | surgery encode (s) | ratio | our plain (s) |")
    print("| --- | --- | --- | --- | --- |")
    for row in encode:
        print(
            f"| {row['batch']} | {row['open_clip_s']:.3f} | {row['surgery_s']:.3f} | "
            f"{row['ratio']:.3f} | {row['ours_plain_s']:.3f} |"
        )

    tokens = 1 + (args.size // 16) ** 2
    feature = bench_feature_surgery(args.batch, tokens, args.classes, args.dim)
    print(
        f"\nFeature surgery, B={args.batch}, N={tokens}, T={args.classes}, D={args.dim} "
        "(fresh process each)"
    )
    print("| form | time (s) | peak memory above inputs (MiB) |")
    print("| --- | --- | --- |")
    print(f"| ours, O(B*N*T) | {feature['ours_s']:.3f} | {feature['ours_peak_mib']:.1f} |")
    print(
        f"| materialised [B, N, T, D] | {feature['materialised_s']:.3f} | "
        f"{feature['materialised_peak_mib']:.1f} |"
    )
    one_copy = args.batch * tokens * args.classes * 4 / 2**20
    print(f"(one [B, N, T] float32 tensor is {one_copy:.1f} MiB; RSS is measured in whole pages)")
    print(
        f"time ratio materialised/ours: {feature['materialised_s'] / feature['ours_s']:.0f}x; "
        f"outputs agree to {feature['checksum_rel_diff']:.1e} (relative, sum of |values|)"
    )
    if args.json:
        print(json.dumps({"encode": encode, "feature_surgery": feature}, indent=2))


if __name__ == "__main__":
    main()
