"""Does a tiny-synth token know the shape under it? Linear probes at every depth of the tower.

For each patch token of an open_clip ViT (tiny-synth or a candidate), the label is the class
covering at least half of its patch (background or one of the five shapes; tokens without such
a class are left out). A multinomial logistic regression (L-BFGS, standardised features, light
L2) is fitted on the tokens of 1000 train scenes at each depth (the patch embedding after the
positions, i.e. ``ln_pre``'s output; each block's output; the projected tokens the maps are made
of) and scored on 400 validation scenes: accuracy over all tokens, over tokens on a shape, and
on the small / large shapes (tokens of a category that a small and the large shape of the
scene share are in neither of these two groups). The last line: on tokens of a shape, how
often the projected token's nearest text among the five shape names (85-template ensembles)
is its own shape. For the small shapes' tokens, also how often the probe takes them for the
background or for the scene's large shape. Run:
``.venv/bin/python scripts/probe_tokens.py`` (the bundled model) or ``... CONFIG.json
[WEIGHTS.safetensors]`` (an open_clip ViT tower with a CLS token; timm towers are refused).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

import clip_surgery
from clip_surgery import synth

CLASSES = len(synth.CLASSES)


def token_features(model, split: str, count: int) -> tuple[dict, torch.Tensor, ...]:
    """Patch-token features per depth, class shares and size groups over ``count`` scenes.

    Returns ``{name: [T, D]}``, ``[T, 6]``, ``[T]`` (``_token_labels``'s groups) and ``[T]``
    (the class of the scene's large shape)."""
    visual = model.clip.visual
    captured: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Callable:
        return lambda module, inputs, output: captured.__setitem__(name, output.detach())

    handles = [visual.ln_pre.register_forward_hook(keep("embedding"))]
    blocks = visual.transformer.resblocks
    handles += [b.register_forward_hook(keep(f"block {i + 1}")) for i, b in enumerate(blocks)]
    features: dict[str, list[torch.Tensor]] = {}
    shares, groups, larges = [], [], []
    try:
        for begin in range(0, count, 100):
            scenes = synth.scenes(split, min(100, count - begin), begin)
            images = torch.stack([model.preprocess(Image.fromarray(s.image)) for s in scenes])
            with torch.no_grad():
                model.clip.encode_image(images)
                last = captured[f"block {len(blocks)}"]
                captured["projected"] = visual.ln_post(last) @ visual.proj
            grid = int(round((captured["embedding"].shape[1] - 1) ** 0.5))
            for name, tokens in captured.items():
                patches = tokens[:, 1:]  # without CLS
                features.setdefault(name, []).append(patches.reshape(-1, patches.shape[-1]))
            for scene in scenes:
                share, group = _token_labels(scene, grid)
                shares.append(share)
                groups.append(group)
                large = next(o.shape for o in scene.objects if o.size == "large")
                larges.append(torch.full_like(group, synth.SHAPES.index(large) + 1))
    finally:
        for handle in handles:
            handle.remove()
    tokens = {k: torch.cat(v) for k, v in features.items()}
    return tokens, torch.cat(shares), torch.cat(groups), torch.cat(larges)


def _token_labels(scene: synth.Scene, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class shares ``[N, 6]`` of each token's patch, and its group: 1 where the token's majority
    class is a small shape's category only, 2 a large shape's only, 0 otherwise (background, or a
    category that a small and the large shape share: labels are per category, not per object)."""
    labels = torch.from_numpy(scene.labels.astype(np.int64))
    onehot = F.one_hot(labels, CLASSES).permute(2, 0, 1).float()[None]
    share = F.adaptive_avg_pool2d(onehot, grid)[0].flatten(1).T
    sizes = {
        "small": torch.zeros(CLASSES, dtype=torch.bool),
        "large": torch.zeros(CLASSES, dtype=torch.bool),
    }
    for obj in scene.objects:
        if obj.pixels:
            sizes[obj.size][synth.SHAPES.index(obj.shape) + 1] = True
    group = (sizes["small"] & ~sizes["large"]).long() + 2 * (
        sizes["large"] & ~sizes["small"]
    ).long()
    return share, group[share.argmax(1)]


def fit_probe(x: torch.Tensor, y: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """A multinomial logistic regression on standardised ``x``; returns its predictor."""
    mean, std = x.mean(0), x.std(0) + 1e-5
    weight = torch.zeros(x.shape[1], CLASSES, requires_grad=True)
    bias = torch.zeros(CLASSES, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=200, line_search_fn="strong_wolfe")
    standard = (x - mean) / std

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(standard @ weight + bias, y) + 1e-4 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return lambda z: ((z - mean) / std @ weight + bias).argmax(1)


def main() -> None:
    """Fit and score the probes; print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path, nargs="?", help="a candidate's config JSON")
    parser.add_argument("weights", type=Path, nargs="?", help="default: CONFIG.safetensors")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--design",
        choices=synth.DESIGNS,
        default=None,
        help="scenes; default: the model's own (CONFIG.metrics.json; none recorded: outline)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.design is None:
        args.design = (
            synth.recorded_design(args.config)
            if args.config
            else synth.bundled_design("tiny-synth")
        )
    if args.design is None:
        parser.error(f"{args.config.with_suffix('.metrics.json')} is missing: pass --design")
    synth.DESIGN = args.design  # every scene this script draws
    if args.config:
        open_clip.add_model_config(args.config)
        weights = args.weights or args.config.with_suffix(".safetensors")
        model = clip_surgery.load(args.config.stem, pretrained=str(weights))
    else:
        model = clip_surgery.load("tiny-synth")
    if not hasattr(model.clip.visual, "ln_pre"):
        parser.error("the probes read an open_clip ViT tower (ln_pre, blocks, proj, a CLS token)")
    train_x, train_share, _, _ = token_features(model, "train", 1000)
    val_x, val_share, val_group, val_large = token_features(model, "val", 400)
    train_keep, val_keep = train_share.max(1).values >= 0.5, val_share.max(1).values >= 0.5
    train_y, val_y = train_share.argmax(1), val_share.argmax(1)
    on_shape = val_keep & (val_y > 0)
    groups = {
        "all": val_keep,
        "shape": on_shape,
        "small shape": on_shape & (val_group == 1),
        "large shape": on_shape & (val_group == 2),
    }
    report = {}
    for name in train_x:
        predict = fit_probe(train_x[name][train_keep], train_y[train_keep])
        predicted = predict(val_x[name])
        right = predicted == val_y
        report[name] = {g: round(right[m].float().mean().item(), 3) for g, m in groups.items()}
        small = groups["small shape"]  # what the small shapes' tokens are taken for instead
        read_as = {"background": predicted == 0, "the large shape": predicted == val_large}
        for what, hit in read_as.items():
            report[name][f"small shape read as {what}"] = round(hit[small].float().mean().item(), 3)
    text = model.encode_text(list(synth.SHAPES))
    nearest = (F.normalize(val_x["projected"], dim=-1) @ text.T).argmax(1) + 1
    own = (nearest == val_y)[on_shape].float().mean().item()
    report["nearest text on shape tokens"] = round(own, 3)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
