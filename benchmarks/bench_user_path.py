"""A user's first run, measured against baselines in the same run (ViT-B/16, random weights).

1. ``clip-surgery --help`` wall time (target <= 0.5 s).
2. Text ensemble, 3 texts x 85 templates: the project's ``encode_text`` (prompts grouped by
   length, each group cut at its longest prompt) / open_clip ``encode_text`` of the same 255
   prompts at the full 77-token context (target <= 0.25).
3. A second process with a warm disk cache / the first process, time of ``encode_text`` (weights
   hash included) in each (target <= 0.05).
4. One image, three texts, end to end through the CLI as fresh processes: cold cache / a plain
   open_clip script doing ``encode_image`` + ``encode_text`` of the same inputs (target <= 0.4);
   warm cache / a plain open_clip script doing ``encode_image`` alone (target <= 1.3). Both
   sides pay the interpreter, the imports and the model load.
5. Peak RSS of the CLI on an 8000 x 6000 JPEG at 448 px minus the same on a 640 x 480 JPEG
   (target <= 300 MB); and of the image side alone (reading, three overlays, PNGs), whose
   peak the model's load otherwise hides.

Run: ``.venv/bin/python benchmarks/bench_user_path.py`` (about 5 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TEXTS = ["a cat", "a wooden chair", "the sky"]
PYTHON = sys.executable
CLI = [PYTHON, "-m", "clip_surgery.cli"]


def wall(command: list[str], env: dict | None = None) -> float:
    """Seconds a command takes as a fresh process (fails loudly on a non-zero exit)."""
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env=env)
    return time.perf_counter() - start


def peak_rss_mb(command: list[str], env: dict) -> float:
    """Peak resident memory of a command in its own process, in MB (via a wrapper's rusage)."""
    probe = (
        "import resource, subprocess, sys; "
        "subprocess.run(sys.argv[1:], check=True, capture_output=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run([PYTHON, "-c", probe, *command], check=True, capture_output=True, env=env)
    return int(out.stdout.strip()) / 1024


def make_checkpoint(folder: Path) -> Path:
    """A ViT-B/16 with seeded random weights, saved as an open_clip state dict."""
    import logging

    import open_clip
    import torch

    logging.getLogger().setLevel(logging.ERROR)
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", pretrained=None)
    path = folder / "vit-b-16.pt"
    torch.save(model.state_dict(), path)
    return path


def make_jpeg(path: Path, width: int, height: int) -> Path:
    """A smooth random JPEG (compresses like a photo)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (height // 100 + 2, width // 100 + 2, 3), dtype=np.uint8)
    Image.fromarray(small).resize((width, height), Image.BICUBIC).save(path, quality=90)
    return path


def bench_help(repeats: int) -> float:
    """Median wall time of ``clip-surgery --help``."""
    return statistics.median(wall([*CLI, "--help"]) for _ in range(repeats))


def bench_text_ensemble(checkpoint: Path) -> dict:
    """The project's 3 x 85 ensemble vs open_clip ``encode_text`` on the same prompts."""
    import open_clip
    import torch

    import clip_surgery
    from clip_surgery.text import DEFAULT_TEMPLATES

    model = clip_surgery.load("ViT-B-16", str(checkpoint))
    model.cache_dir = None
    prompts = [template.format(text) for text in TEXTS for template in DEFAULT_TEMPLATES]
    tokens = open_clip.get_tokenizer("ViT-B-16")(prompts)
    with torch.no_grad():
        start = time.perf_counter()
        full = torch.cat([model.clip.encode_text(chunk) for chunk in tokens.split(256)])
        baseline = time.perf_counter() - start
        start = time.perf_counter()
        ours = model.encode_text(TEXTS)
        project = time.perf_counter() - start
    full = torch.nn.functional.normalize(full, dim=-1).view(len(TEXTS), -1, full.shape[-1])
    expected = torch.nn.functional.normalize(full.mean(dim=1), dim=-1)
    difference = float((ours - expected).abs().max())
    return {"open_clip_s": baseline, "project_s": project, "max_difference": difference}


ENCODE_SCRIPT = """
import sys, time
import clip_surgery
model = clip_surgery.load("ViT-B-16", sys.argv[1])
start = time.perf_counter()
model.encode_text({texts!r})
print(time.perf_counter() - start)
"""


def bench_disk_cache(checkpoint: Path, cache: Path) -> dict:
    """``encode_text`` time in a first process (cold cache) and a second one (warm)."""
    env = {**os.environ, "CLIP_SURGERY_CACHE": str(cache)}
    script = ENCODE_SCRIPT.format(texts=TEXTS)
    times = []
    for _ in range(2):
        out = subprocess.run(
            [PYTHON, "-c", script, str(checkpoint)], check=True, capture_output=True, env=env
        )
        times.append(float(out.stdout.strip().splitlines()[-1]))
    return {"first_s": times[0], "second_s": times[1]}


PLAIN_SCRIPT = """
import sys
import open_clip, torch
from PIL import Image
model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-16", pretrained=sys.argv[1])
model.eval()
with torch.no_grad():
    model.encode_image(preprocess(Image.open(sys.argv[2]).convert("RGB"))[None])
    if sys.argv[3] == "text":
        from clip_surgery.text import DEFAULT_TEMPLATES
        texts = {texts!r}
        prompts = [t.format(x) for x in texts for t in DEFAULT_TEMPLATES]
        tokens = open_clip.get_tokenizer("ViT-B-16")(prompts)
        for chunk in tokens.split(256):
            model.encode_text(chunk)
"""


def bench_end_to_end(checkpoint: Path, image: Path, folder: Path) -> dict:
    """The CLI (cold and warm cache) against plain open_clip scripts, all fresh processes."""
    script = PLAIN_SCRIPT.format(texts=TEXTS)
    plain_both = wall([PYTHON, "-c", script, str(checkpoint), str(image), "text"])
    plain_image = wall([PYTHON, "-c", script, str(checkpoint), str(image), "image"])
    cache = folder / "cli-cache"
    command = [*CLI, "explain", str(image), "--text", *TEXTS, "--model", "ViT-B-16"]
    command += ["--checkpoint", str(checkpoint), "--cache-dir", str(cache), "--no-progress"]
    cold = wall([*command, "--out", str(folder / "out-cold")])
    warm = wall([*command, "--out", str(folder / "out-warm")])
    return {
        "plain_image_and_text_s": plain_both,
        "plain_image_s": plain_image,
        "cli_cold_s": cold,
        "cli_warm_s": warm,
    }


def bench_big_image(checkpoint: Path, folder: Path) -> dict:
    """Peak RSS of the CLI at 448 px on an 8000 x 6000 JPEG and on a 640 x 480 one."""
    big = make_jpeg(folder / "big.jpg", 8000, 6000)
    small = make_jpeg(folder / "small.jpg", 640, 480)
    env = {**os.environ, "CLIP_SURGERY_CACHE": str(folder / "rss-cache")}
    peaks = {}
    for name, image in (("small", small), ("big", big)):
        command = [*CLI, "explain", str(image), "--text", *TEXTS, "--size", "448"]
        command += ["--model", "ViT-B-16", "--checkpoint", str(checkpoint), "--no-progress"]
        peaks[name] = peak_rss_mb([*command, "--out", str(folder / f"rss-{name}")], env)
    return {"small_mb": peaks["small"], "big_mb": peaks["big"]}


IMAGE_SCRIPT = """
import sys
import torch
from pathlib import Path
from clip_surgery.images import open_image
from clip_surgery.defaults import DISPLAY_MAX_SIDE
from clip_surgery.viz import overlay, save_png
image = open_image(sys.argv[1], DISPLAY_MAX_SIDE)
for k in range(3):
    save_png(overlay(image, torch.rand(28, 28)), Path(sys.argv[2]) / f"{k}.png")
"""


def bench_image_path(folder: Path) -> dict:
    """Peak RSS of the CLI's image side alone (read, three overlays, PNGs): big vs small JPEG."""
    env = dict(os.environ)
    peaks = {}
    for name in ("small", "big"):
        command = [PYTHON, "-c", IMAGE_SCRIPT, str(folder / f"{name}.jpg"), str(folder)]
        peaks[name] = peak_rss_mb(command, env)
    return {"small_mb": peaks["small"], "big_mb": peaks["big"]}


def main() -> None:
    """Run every measurement and print the ratios (and JSON with ``--json``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    results: dict = {"threads": os.cpu_count()}
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        checkpoint = make_checkpoint(folder)
        image = make_jpeg(folder / "photo.jpg", 640, 480)
        results["help_s"] = bench_help(5)
        print(f"--help: {results['help_s']:.3f} s (target <= 0.5)", flush=True)
        text = results["text"] = bench_text_ensemble(checkpoint)
        print(
            f"text ensemble 3 x 85: project {text['project_s']:.2f} s / open_clip "
            f"{text['open_clip_s']:.2f} s = {text['project_s'] / text['open_clip_s']:.3f} "
            f"(target <= 0.25; max difference {text['max_difference']:.1e})",
            flush=True,
        )
        disk = results["disk_cache"] = bench_disk_cache(checkpoint, folder / "cache")
        print(
            f"warm disk cache: second process {disk['second_s']:.4f} s / first "
            f"{disk['first_s']:.2f} s = {disk['second_s'] / disk['first_s']:.4f} (target <= 0.05)",
            flush=True,
        )
        e2e = results["end_to_end"] = bench_end_to_end(checkpoint, image, folder)
        print(
            f"CLI cold {e2e['cli_cold_s']:.2f} s / plain image+text "
            f"{e2e['plain_image_and_text_s']:.2f} s = "
            f"{e2e['cli_cold_s'] / e2e['plain_image_and_text_s']:.3f} (target <= 0.4)\n"
            f"CLI warm {e2e['cli_warm_s']:.2f} s / plain image {e2e['plain_image_s']:.2f} s = "
            f"{e2e['cli_warm_s'] / e2e['plain_image_s']:.3f} (target <= 1.3)",
            flush=True,
        )
        rss = results["rss"] = bench_big_image(checkpoint, folder)
        print(
            f"peak RSS 8000x6000 {rss['big_mb']:.0f} MB - 640x480 {rss['small_mb']:.0f} MB = "
            f"{rss['big_mb'] - rss['small_mb']:.0f} MB (target <= 300)",
            flush=True,
        )
        alone = results["image_path_rss"] = bench_image_path(folder)
        print(
            f"image side alone (read, 3 overlays): 8000x6000 {alone['big_mb']:.0f} MB - "
            f"640x480 {alone['small_mb']:.0f} MB = {alone['big_mb'] - alone['small_mb']:.0f} MB",
            flush=True,
        )
    results["self_max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
